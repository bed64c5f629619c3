"""Producer process: `python -m conveyor.producer`. Wiring only (conveyor.producer.app)."""

from __future__ import annotations

import asyncio
import functools

from conveyor.common import crypto, logs, metrics, server, tracing
from conveyor.common.auth import Authorizer
from conveyor.common.process_group import ProcessGroup
from conveyor.common.queue_registry import QueueSweeper
from conveyor.common.redis import REDIS_UNAVAILABLE, make_sync_redis
from conveyor.common.settings import ProducerSettings
from conveyor.producer.app import build


async def run(settings: ProducerSettings) -> None:
    # Read the token file now: a wrong one stops the start with one line saying what is wrong.
    authorizer = Authorizer.from_path(settings.auth_tokens_file)
    logs.configure(service="producer", level=settings.log_level, fmt=settings.log_format)
    tracing.configure(service="conveyor-producer")
    app = await build(settings)
    # Queue depths for /metrics, read at scrape time in the exposition thread (a sync client).
    metrics_redis = make_sync_redis(settings.redis_url)
    metrics.register_queue_collector(metrics_redis, settings.metrics_max_queues)
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
        auth=authorizer,
        metrics_addr=settings.metrics_addr,
        share_port=settings.process_index >= 0,
        tls=settings.server_tls,
        health_addr=settings.health_addr,
    )
    metrics_redis.close()


def main() -> None:
    with server.exit_codes():
        settings = ProducerSettings.from_env()
        # The keyring (ADR 0025): a bad one stops the start, a group's before it starts members.
        crypto.configure_from_env()
        if settings.processes > 1 and settings.process_index < 0:
            # The group's parent: it serves nothing itself, it runs and watches the members.
            logs.configure(service="producer", level=settings.log_level, fmt=settings.log_format)
            if server.address_in_use(settings.grpc_addr):
                raise server.AddressInUse(settings.grpc_addr)
            group = ProcessGroup("conveyor.producer", settings.processes, grace_s=settings.shutdown_grace_s)
            raise SystemExit(group.run())
    server.run_process(functools.partial(run, settings))


if __name__ == "__main__":
    main()
