"""Fixtures for the results service: a fresh results schema per test, projectors, and an in-process server.

The results tests use their own database ("results_test") on the session PostgreSQL, so that
they can drop and recreate its schema per test without touching anyone else's tables.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
import redis.asyncio
from psycopg_pool import AsyncConnectionPool

from conveyor.common import server
from conveyor.common.devstack.servers import PostgresServer
from conveyor.common.keys import QUEUES, RESULTS_GROUP, queue_keys
from conveyor.common.redis import REDIS_UNAVAILABLE, make_redis
from conveyor.results import pgerrors
from conveyor.results.projector import Projector
from conveyor.results.queries import Queries
from conveyor.results.servicer import ResultsServicer
from conveyor.results.setaside import SetAsideRows
from conveyor.results.store import Store, open_pool, unpack_events
from conveyor.v1 import event_pb2, results_service_pb2, results_service_pb2_grpc
from tests.support.wait import wait_for
from tests.unit.results.builders import stored

RESULTS_DB = "results_test"


async def stored_events(pool: AsyncConnectionPool[Any], job_id: str | None = None) -> list[tuple[str, str, int]]:
    """Every distinct event in job_events (of ``job_id``, or all): (job_id, "ms-seq", type), by job then id.

    History rows pack several events, and a replay may store an event twice; readers merge by
    event id, and so does this.
    """
    async with pool.connection() as conn:
        if job_id is None:
            cur = await conn.execute("SELECT job_id, events FROM job_events")
        else:
            cur = await conn.execute("SELECT job_id, events FROM job_events WHERE job_id = %s", (job_id,))
        rows = await cur.fetchall()
    found = {(jid, ms, seq): data for jid, packed in rows for ms, seq, data in unpack_events(packed)}
    return [
        (jid, f"{ms}-{seq}", event_pb2.JobEvent.FromString(found[jid, ms, seq]).type) for jid, ms, seq in sorted(found)
    ]


async def reset_database(admin_url: str, db_url: str, database: str) -> None:
    """Create ``database`` if needed and give it an empty public schema."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if await cur.fetchone() is None:
            await conn.execute(f'CREATE DATABASE "{database}"'.encode())
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")


def database_url_of(pg: PostgresServer, database: str) -> str:
    return pg.url.rsplit("/", 1)[0] + "/" + database


@pytest.fixture
async def results_db(pg_server: PostgresServer) -> str:
    """URL of a results database with an empty schema (no migrations applied)."""
    url = database_url_of(pg_server, RESULTS_DB)
    await reset_database(pg_server.url, url, RESULTS_DB)
    return url


@pytest.fixture
async def pool(results_db: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """A pool on the freshly migrated results database."""
    p = await open_pool(results_db, 4)
    await Store(p).migrate()
    yield p
    await p.close()


@pytest.fixture
def store(pool: AsyncConnectionPool[Any]) -> Store:
    return Store(pool)


@pytest.fixture
def queries(pool: AsyncConnectionPool[Any]) -> Queries:
    return Queries(pool)


@dataclass
class RunningProjector:
    projector: Projector
    stop_event: asyncio.Event
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 15)


StartProjector = Callable[..., Awaitable[RunningProjector]]


@pytest.fixture
async def start_projector(redis_client: redis.asyncio.Redis, redis_url: str) -> AsyncIterator[StartProjector]:
    """Factory: start a Projector on the session Redis writing through ``store``; stopped at teardown."""
    started: list[tuple[RunningProjector, list[redis.asyncio.Redis]]] = []

    async def start(store: Store, **options: Any) -> RunningProjector:
        options.setdefault("consumer", f"results-test-{len(started) + 1}")
        options.setdefault("refresh_s", 0.1)
        options.setdefault("block_ms", 100)
        client = make_redis(redis_url)
        blocking = make_redis(redis_url, blocking=True)
        projector = Projector(client, blocking, store, **options)
        stop = asyncio.Event()
        running = RunningProjector(projector, stop, asyncio.create_task(projector.run(stop)))
        started.append((running, [client, blocking]))
        return running

    yield start
    for running, clients in started:
        if not running.task.done():
            await running.stop()
        for c in clients:
            await c.aclose()


class Events:
    """Builds JobEvents for one queue and XADDs them into its events stream like the producer and workers do."""

    def __init__(self, client: redis.asyncio.Redis, queue: str = "default") -> None:
        self.client = client
        self.queue = queue
        self.stream = queue_keys(queue).events

    async def add(self, event: event_pb2.JobEvent, entry_id: str = "*") -> str:
        """XADD ``event`` (SADDing the queue first, as the producer does); returns its stream id."""
        await self.client.sadd(QUEUES, self.queue)  # type: ignore[misc]
        ulid = event.job_id.rpartition("/")[2]
        raw = await self.client.xadd(self.stream, {b"j": ulid.encode(), b"e": stored(event)}, id=entry_id)
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def add_all(self, events: list[event_pb2.JobEvent]) -> list[str]:
        return [await self.add(e) for e in events]

    async def pending(self) -> int:
        """Entries delivered to group ``results`` and not acked yet."""
        info = await self.client.xpending(self.stream, RESULTS_GROUP)
        return int(info["pending"])

    async def unacked(self) -> tuple[int, int]:
        """(pending, lag) of group ``results``: delivered but not acked, and not delivered yet."""
        for g in await self.client.xinfo_groups(self.stream):
            if g["name"] in (RESULTS_GROUP, RESULTS_GROUP.encode()):
                return int(g["pending"]), int(g["lag"])
        raise AssertionError(f"no group {RESULTS_GROUP} on {self.stream}")

    async def caught_up(self) -> bool:
        """Whether group ``results`` has read every entry of the stream and acked it."""
        try:
            groups = await self.client.xinfo_groups(self.stream)
        except redis.ResponseError:
            return False
        for g in groups:
            if g["name"] in (RESULTS_GROUP, RESULTS_GROUP.encode()):
                return bool(g["lag"] == 0 and g["pending"] == 0)
        return False

    async def wait_caught_up(self, within: float = 10.0) -> None:
        await wait_for(self.caught_up, f"results group caught up on {self.stream}", within)


@pytest.fixture
def events(redis_client: redis.asyncio.Redis) -> Events:
    return Events(redis_client)


@dataclass
class ResultsClient:
    stub: results_service_pb2_grpc.ResultsServiceAsyncStub
    channel: grpc.aio.Channel


async def start_results_server(queries: Queries) -> tuple[ResultsClient, Callable[[], Awaitable[None]]]:
    import psycopg_pool

    running = await server.start(
        "127.0.0.1:0",
        [
            server.Service(
                results_service_pb2_grpc.add_ResultsServiceServicer_to_server,
                ResultsServicer(queries, SetAsideRows(queries.pool, Store(queries.pool))),
                results_service_pb2.DESCRIPTOR.services_by_name["ResultsService"].full_name,
            )
        ],
        unavailable=(*REDIS_UNAVAILABLE, psycopg.OperationalError, psycopg_pool.PoolTimeout),
        classify=[pgerrors.client_error],
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")

    async def stop() -> None:
        await channel.close()
        await running.stop(0.5)

    return ResultsClient(results_service_pb2_grpc.ResultsServiceStub(channel), channel), stop


@pytest.fixture
async def results(queries: Queries) -> AsyncIterator[ResultsClient]:
    """A ResultsService on 127.0.0.1:0 over the test database, behind a real channel."""
    client, stop = await start_results_server(queries)
    yield client
    await stop()
