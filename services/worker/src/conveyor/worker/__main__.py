"""Worker process: `python -m conveyor.worker`. Wiring only."""

from __future__ import annotations

import asyncio
import functools

from conveyor.common import crypto, logs, metrics, server, tracing
from conveyor.common.enqueue import Enqueuer
from conveyor.common.redis import REDIS_UNAVAILABLE, connect_redis, make_redis, make_sync_redis
from conveyor.common.scripts import Heartbeat, Scripts
from conveyor.common.settings import WorkerSettings
from conveyor.worker import isolate
from conveyor.worker.handlers import load_handlers
from conveyor.worker.runner import Runner
from conveyor.worker.scheduler import Scheduler

#: Templates were validated against the producer's payload limit when the schedule was saved.
SCHEDULED_PAYLOAD_LIMIT = 1 << 26


async def run() -> None:
    settings = WorkerSettings.from_env()
    # The keyring (ADR 0025): a bad one stops the start with one line saying what is wrong (exit 78).
    crypto.configure_from_env()
    logs.configure(service="worker", level=settings.log_level, fmt=settings.log_format)
    tracing.configure(service="conveyor-worker")
    handlers = load_handlers(settings.handlers)
    # The fork server for isolate=True handlers starts now, before any thread, importing their modules.
    isolate.prepare(handlers.isolated_modules())
    redis = await connect_redis(settings.redis_url, wait=True)
    wait_redis = make_redis(settings.redis_url, blocking=True)
    # A synchronous client for the heartbeat thread (it must not share the event loop).
    beat_redis = make_sync_redis(settings.redis_url)
    scripts = Scripts(redis)
    supervisor = settings.supervisor()
    runner = Runner(redis, wait_redis, scripts, handlers, settings, Heartbeat(beat_redis), supervisor)
    metrics.SLOTS.set(settings.concurrency)
    metrics.SLOTS_IN_USE.set_function(lambda: runner.slots.busy)

    async def close_beat() -> None:
        beat_redis.close()

    background = [runner.run]
    if settings.scheduler:
        # Fires schedule ticks through the producer's own validation and enqueue path (ADR 0006).
        enqueuer = Enqueuer(redis, scripts, SCHEDULED_PAYLOAD_LIMIT, 1)
        scheduler = Scheduler(redis, wait_redis, enqueuer)

        async def schedule(stop: asyncio.Event) -> None:
            await supervisor.run("scheduler", functools.partial(scheduler.run, stop), stop)

        background.append(schedule)

    # Health and reflection only: probes and grpcurl see a live worker.
    await server.serve(
        settings.grpc_addr,
        [],
        grace=1.0,
        unavailable=REDIS_UNAVAILABLE,
        background=background,
        on_shutdown=[redis.aclose, wait_redis.aclose, close_beat],
        supervisor=supervisor,
        metrics_addr=settings.metrics_addr,
        tls=settings.server_tls,
        health_addr=settings.health_addr,
    )


def main() -> None:
    server.run_process(run)


if __name__ == "__main__":
    main()
