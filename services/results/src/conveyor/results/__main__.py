"""Results process: `python -m conveyor.results`. Wiring only."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket

from conveyor.common import crypto, logs, server, tracing
from conveyor.common.auth import Authorizer
from conveyor.common.redis import REDIS_UNAVAILABLE, connect_redis, make_redis
from conveyor.common.settings import ResultsSettings
from conveyor.results import pgerrors
from conveyor.results.projector import Projector
from conveyor.results.prune import Pruner
from conveyor.results.queries import Queries
from conveyor.results.servicer import ResultsServicer
from conveyor.results.setaside import SetAsideRows
from conveyor.results.store import Store, open_pool
from conveyor.v1 import results_service_pb2, results_service_pb2_grpc


async def run() -> None:
    settings = ResultsSettings.from_env()
    # The keyring (ADR 0025): a bad one stops the start with one line saying what is wrong (exit 78).
    crypto.configure_from_env()
    # Read the token file now: a wrong one stops the start with one line saying what is wrong.
    authorizer = Authorizer.from_path(settings.auth_tokens_file)
    logs.configure(service="results", level=settings.log_level, fmt=settings.log_format)
    tracing.configure(service="conveyor-results")
    # psycopg_pool logs each failed reconnect as unstructured text; our own warnings cover outages.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    consumer = os.environ.get("CONVEYOR_RESULTS_CONSUMER") or f"results-{socket.gethostname()}-{os.getpid()}"
    # Started before Redis (or while it restarts): wait for it with backoff rather than crash-looping.
    redis = await connect_redis(settings.redis_url, wait=True)
    blocking = make_redis(settings.redis_url, blocking=True)
    pgerrors.register()
    supervisor = settings.supervisor()
    pool = await open_pool(settings.database_url, settings.pool_size, lock_timeout_s=settings.db_lock_timeout_s)
    store = Store(pool)
    await store.migrate()
    projector = Projector(
        redis,
        blocking,
        store,
        consumer=consumer,
        batch_size=settings.batch_size,
        retention_s=settings.retention_s,
        defer_ms=settings.projection_defer_ms,
        defer_max=settings.projection_defer_max,
        claim_idle_ms=int(settings.claim_idle_s * 1000),
        claim_interval_s=min(30.0, settings.claim_idle_s / 2),
        supervisor=supervisor,
    )

    pruner = Pruner(pool, settings.pg_retention_days, interval_s=settings.prune_interval_s, batch=settings.prune_batch)

    async def project(stop: asyncio.Event) -> None:
        await supervisor.run("projector", functools.partial(projector.run, stop), stop)

    async def prune(stop: asyncio.Event) -> None:
        await supervisor.run("prune", functools.partial(pruner.run, stop), stop)

    await server.serve(
        settings.grpc_addr,
        [
            server.Service(
                results_service_pb2_grpc.add_ResultsServiceServicer_to_server,
                ResultsServicer(Queries(pool), SetAsideRows(pool, store)),
                results_service_pb2.DESCRIPTOR.services_by_name["ResultsService"].full_name,
            )
        ],
        grace=settings.shutdown_grace_s,
        unavailable=REDIS_UNAVAILABLE,
        background=[project, prune],
        on_shutdown=[pool.close, redis.aclose, blocking.aclose],
        supervisor=supervisor,
        auth=authorizer,
        classify=[pgerrors.client_error],
        metrics_addr=settings.metrics_addr,
        tls=settings.server_tls,
        health_addr=settings.health_addr,
    )


def main() -> None:
    server.run_process(run)


if __name__ == "__main__":
    main()
