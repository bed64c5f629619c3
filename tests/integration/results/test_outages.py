"""Invariant 5 (DESIGN.md): PostgreSQL or Redis being down stops nobody, and nothing is lost or doubled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio
from structlog.testing import capture_logs

from conveyor.common.devstack.servers import PostgresServer, RedisServer
from conveyor.common.keys import RESULTS_GROUP
from conveyor.common.redis import make_redis
from conveyor.results.projector import Projector
from conveyor.results.queries import Queries
from conveyor.results.store import Store, open_pool
from conveyor.v1 import job_pb2, results_service_pb2
from tests.integration.results.conftest import Events, StartProjector, start_results_server, stored_events
from tests.support.wait import wait_for
from tests.unit.results.builders import JobHistory

# Durability across a crash is not under test here: a clean stop and start is.
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@pytest.fixture
async def own_pg() -> AsyncIterator[PostgresServer]:
    """A PostgreSQL of this test's own, to stop and start without disturbing other tests."""
    server = PostgresServer(settings=FAST_PG)
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.close)


async def counts(store_pool: Any) -> tuple[int, int, int]:
    async with store_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM jobs), 0, (SELECT count(*) FROM jobs WHERE state = %s)",
            (job_pb2.JOB_STATE_SUCCEEDED,),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), len(await stored_events(store_pool)), int(row[2])


async def test_postgres_down_keeps_events_pending_then_projects_them_exactly_once(
    own_pg: PostgresServer, events: Events, start_projector: StartProjector
) -> None:
    pool = await open_pool(own_pg.url, 2)
    store = Store(pool, connect_timeout_s=0.5)
    await store.migrate()
    client, stop_server = await start_results_server(Queries(pool, connect_timeout_s=0.5))
    try:
        before = [JobHistory() for _ in range(5)]
        for job in before:
            await events.add_all(job.lifecycle())
        running = await start_projector(store)
        await events.wait_caught_up()

        with capture_logs() as logs:
            await asyncio.to_thread(own_pg.stop)
            during = [JobHistory() for _ in range(10)]
            for job in during:
                await events.add_all(job.lifecycle())

            async def writer_retried() -> bool:
                return sum(1 for e in logs if e["event"] == "postgres_unavailable") >= 3

            await wait_for(writer_retried, "the writer retrying", within=20)
            # Invariant 3: none of the 40 new entries is acked (some delivered, the rest waiting
            # behind the projector's full queue), and the projector is still running.
            pending, lag = await events.unacked()
            assert pending > 0
            assert pending + lag == 40
            assert not running.task.done()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=before[0].job_id))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            await asyncio.to_thread(own_pg.start)
            await events.wait_caught_up(within=30)

        assert await counts(pool) == (15, 60, 15)
        assert not running.task.done()
        response = await client.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=during[-1].job_id))
        assert response.job.state == job_pb2.JOB_STATE_SUCCEEDED
    finally:
        await stop_server()
        await pool.close()


async def test_redis_restart_is_survived_and_projection_resumes(
    store: Store, pool: Any, redis_client: redis.asyncio.Redis
) -> None:
    with RedisServer(appendonly=True) as own_redis:
        client = make_redis(own_redis.url)
        blocking = make_redis(own_redis.url, blocking=True)
        projector = Projector(client, blocking, store, consumer="results-redis-test", refresh_s=0.1, block_ms=100)
        stop = asyncio.Event()
        task = asyncio.create_task(projector.run(stop))
        own_events = Events(make_redis(own_redis.url))
        try:
            first = JobHistory()
            await own_events.add_all(first.lifecycle())
            await own_events.wait_caught_up()

            with capture_logs() as logs:
                await asyncio.to_thread(own_redis.stop)

                async def reader_retried() -> bool:
                    return any(e["event"] == "redis_unavailable" for e in logs)

                await wait_for(reader_retried, "the reader noticing Redis is down")
                assert not task.done()
                await asyncio.to_thread(own_redis.start)

            second = JobHistory()
            await own_events.add_all(second.lifecycle())
            await own_events.wait_caught_up(within=20)
            assert await counts(pool) == (2, 8, 2)
            pending = await own_events.client.xpending(own_events.stream, RESULTS_GROUP)
            assert pending["pending"] == 0
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            await client.aclose()
            await blocking.aclose()
            await own_events.client.aclose()


async def test_stopping_while_postgres_is_down_returns_promptly_and_acks_nothing(
    own_pg: PostgresServer, events: Events, start_projector: StartProjector
) -> None:
    pool = await open_pool(own_pg.url, 2)
    store = Store(pool, connect_timeout_s=0.5)
    await store.migrate()
    try:
        await asyncio.to_thread(own_pg.stop)
        jobs = [JobHistory() for _ in range(10)]
        for job in jobs:
            await events.add_all(job.lifecycle())
        # Small batches fill the projector's queue, so the reader is blocked handing one over.
        running = await start_projector(store, batch_size=2)
        await wait_for(lambda: _delivered(events, 6), "the reader blocked behind a full queue")

        with capture_logs() as logs:
            await asyncio.wait_for(running.stop(), 10)
        assert any(e["event"] == "batch_abandoned" for e in logs)
        pending, lag = await events.unacked()
        assert pending + lag == 40  # nothing was acked

        await asyncio.to_thread(own_pg.start)
        await start_projector(store, claim_idle_ms=0)  # takes over the stopped consumer's entries
        await events.wait_caught_up(within=30)
        assert await counts(pool) == (10, 40, 10)
    finally:
        await pool.close()


async def _delivered(events: Events, at_least: int) -> bool:
    try:
        pending, _ = await events.unacked()
    except (AssertionError, redis.ResponseError):  # the projector has not created the group yet
        return False
    return pending >= at_least


async def test_a_reader_that_fails_unexpectedly_takes_the_projector_down(
    store: Store, events: Events, start_projector: StartProjector, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Projector, out: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Projector, "_read_once", broken)
    running = await start_projector(store)
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(running.task, 10)
