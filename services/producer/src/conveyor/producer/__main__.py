"""Producer process: `python -m conveyor.producer`. Wiring only (conveyor.producer.app)."""

from __future__ import annotations

import asyncio
import functools

from conveyor.common import logs, server
from conveyor.common.queue_registry import QueueSweeper
from conveyor.common.redis import REDIS_UNAVAILABLE
from conveyor.common.settings import ProducerSettings
from conveyor.producer.app import build


async def run() -> None:
    settings = ProducerSettings.from_env()
    logs.configure(service="producer", level=settings.log_level, fmt=settings.log_format)
    app = await build(settings)
    sweeper = QueueSweeper(app.admin_redis, settings.queue_idle_s, settings.queue_sweep_s)

    async def sweep_idle_queues(stop: asyncio.Event) -> None:
        await app.supervisor.run("queue-sweep", functools.partial(sweeper.run, stop), stop)

    await server.serve(
        settings.grpc_addr,
        app.services,
        grace=settings.shutdown_grace_s,
        unavailable=REDIS_UNAVAILABLE,
        max_message_bytes=settings.message_limit,
        background=[sweep_idle_queues],
        on_shutdown=app.closers,
        supervisor=app.supervisor,
    )


def main() -> None:
    server.run_process(run)


if __name__ == "__main__":
    main()
