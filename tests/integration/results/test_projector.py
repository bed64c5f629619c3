"""The projector against real Redis and PostgreSQL: one row per job, monotonic state, acks after commit."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
import redis.asyncio
from psycopg_pool import AsyncConnectionPool

from conveyor.common.keys import QUEUES, RESULTS_GROUP, queue_keys
from conveyor.results.queries import Queries
from conveyor.results.store import Store
from conveyor.v1 import event_pb2, job_pb2
from tests.integration.results.conftest import Events, StartProjector, stored_events
from tests.support.wait import wait_for
from tests.unit.results.builders import BASE_S, JobHistory


async def fetch(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(query.encode(), params)
        found: list[tuple[Any, ...]] = await cur.fetchall()
        return found


async def job_row(pool: AsyncConnectionPool[Any], job_id: str) -> dict[str, Any] | None:
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute("SELECT * FROM jobs WHERE job_id = %s", (job_id,))
        found: dict[str, Any] | None = await cur.fetchone()
        return found


async def test_lifecycle_projects_one_row_with_final_state(
    store: Store, pool: AsyncConnectionPool[Any], events: Events, start_projector: StartProjector
) -> None:
    job = JobHistory(payload={"n": 42, "s": "x"}, labels={"team": "a"})
    ids = await events.add_all(job.lifecycle(start=10.0, result={"answer": [1, 2]}))
    await start_projector(store)
    await events.wait_caught_up()

    row = await job_row(pool, job.job_id)
    assert row is not None
    assert row["state"] == job_pb2.JOB_STATE_SUCCEEDED
    assert row["queue"] == "default"
    assert row["type"] == "demo.echo"
    assert row["payload"] == {"n": 42, "s": "x"}
    assert row["result"] == {"answer": [1, 2]}
    assert row["labels"] == {"team": "a"}
    assert row["attempts"] == 1
    assert row["max_attempts"] == 3
    assert row["worker"] == "w1"
    assert row["progress_percent"] == 50.0 and row["progress_message"] == "half way"
    assert row["created_at"].timestamp() == BASE_S  # from the job, not the ULID
    assert row["started_at"].timestamp() == BASE_S + 11
    assert row["finished_at"].timestamp() == BASE_S + 13
    assert row["updated_at"].timestamp() == BASE_S + 13
    last_ms, last_seq = (int(x) for x in ids[-1].split("-"))
    assert (row["last_event_ms"], row["last_event_seq"]) == (last_ms, last_seq)
    stored = await stored_events(pool)
    assert [s[1] for s in stored] == sorted(ids)
    assert [s[2] for s in stored] == [
        event_pb2.EVENT_TYPE_QUEUED,
        event_pb2.EVENT_TYPE_ACTIVE,
        event_pb2.EVENT_TYPE_PROGRESS,
        event_pb2.EVENT_TYPE_SUCCEEDED,
    ]


async def test_replaying_all_events_leaves_one_row_and_no_duplicate_events(
    store: Store,
    pool: AsyncConnectionPool[Any],
    events: Events,
    redis_client: redis.asyncio.Redis,
    start_projector: StartProjector,
) -> None:
    jobs = [JobHistory() for _ in range(20)]
    for i, job in enumerate(jobs):
        await events.add_all(job.lifecycle(start=float(i)))
    running = await start_projector(store, batch_size=7)  # several batches, jobs split across them
    await events.wait_caught_up()
    before = await fetch(pool, "SELECT * FROM jobs ORDER BY job_id")
    await running.stop()

    # A crash before XACK replays entries; resetting the group replays all of them.
    await redis_client.xgroup_setid(events.stream, RESULTS_GROUP, "0")
    await start_projector(store, batch_size=5)
    await events.wait_caught_up()

    assert await fetch(pool, "SELECT * FROM jobs ORDER BY job_id") == before
    assert len(before) == 20
    assert len(await stored_events(pool)) == 80
    # A replay may store an event a second time; reads merge by id and return each event once.
    for job in jobs:
        listed = await Queries(pool).list_events(job.job_id, None, 100)
        assert len(listed) == 4 and len({e.id for e in listed}) == 4


async def test_late_active_does_not_overwrite_succeeded(
    store: Store,
    pool: AsyncConnectionPool[Any],
    events: Events,
    redis_client: redis.asyncio.Redis,
    start_projector: StartProjector,
) -> None:
    job = JobHistory()
    await events.add(job.queued(0))
    await events.add(job.active(1, worker="first"))
    # A results process reads QUEUED and ACTIVE, then dies before committing them.
    await redis_client.xgroup_create(events.stream, RESULTS_GROUP, id="0", mkstream=True)
    await redis_client.xreadgroup(RESULTS_GROUP, "dead", {events.stream: ">"}, count=10)
    succeeded_id = await events.add(job.succeeded(3, {"ok": 1}, worker="second"))

    first = await start_projector(store)
    await wait_for(lambda: job_row(pool, job.job_id), "the outcome projected")
    await first.stop()
    row = await job_row(pool, job.job_id)
    assert row is not None and row["state"] == job_pb2.JOB_STATE_SUCCEEDED

    # Another takes the dead one's entries over (XAUTOCLAIM) and projects QUEUED/ACTIVE late.
    await start_projector(store, claim_idle_ms=0)
    await events.wait_caught_up()
    after = await job_row(pool, job.job_id)
    assert after == row
    assert after is not None
    assert f"{after['last_event_ms']}-{after['last_event_seq']}" == succeeded_id
    assert after["worker"] == "second"
    assert len(await stored_events(pool, job.job_id)) == 3


async def test_consumers_of_dead_processes_are_removed_once_nothing_is_pending(
    store: Store, events: Events, redis_client: redis.asyncio.Redis, start_projector: StartProjector
) -> None:
    await events.add(JobHistory().queued())
    await redis_client.xgroup_create(events.stream, RESULTS_GROUP, id="0", mkstream=True)
    await redis_client.xreadgroup(RESULTS_GROUP, "dead-holding", {events.stream: ">"}, count=1)
    await redis_client.xgroup_createconsumer(events.stream, RESULTS_GROUP, "dead-idle")
    # claim_idle_ms high: the entry of "dead-holding" is not taken over, so that consumer must stay.
    running = await start_projector(store, stale_consumer_ms=0, claim_idle_ms=3_600_000)

    async def consumers() -> set[bytes]:
        return {c["name"] for c in await redis_client.xinfo_consumers(events.stream, RESULTS_GROUP)}

    async def idle_one_deleted() -> bool:
        return b"dead-idle" not in await consumers()

    await wait_for(idle_one_deleted, "the idle consumer deleted")
    assert b"dead-holding" in await consumers()
    await running.stop()


async def test_group_is_created_for_a_queue_without_stream(
    store: Store, pool: AsyncConnectionPool[Any], redis_client: redis.asyncio.Redis, start_projector: StartProjector
) -> None:
    await redis_client.sadd(QUEUES, "fresh")  # type: ignore[misc]
    await start_projector(store)
    stream = queue_keys("fresh").events

    async def group_exists() -> bool:
        try:
            return any(g["name"] == RESULTS_GROUP.encode() for g in await redis_client.xinfo_groups(stream))
        except redis.ResponseError:
            return False

    await wait_for(group_exists, "group results created with MKSTREAM")
    fresh = Events(redis_client, "fresh")
    job = JobHistory(queue="fresh")
    await fresh.add_all(job.lifecycle())
    await fresh.wait_caught_up()
    row = await job_row(pool, job.job_id)
    assert row is not None and row["state"] == job_pb2.JOB_STATE_SUCCEEDED


async def test_acked_events_are_trimmed_after_the_retention(
    store: Store, events: Events, redis_client: redis.asyncio.Redis, start_projector: StartProjector
) -> None:
    first_ids = await events.add_all(JobHistory().lifecycle())
    await start_projector(store, retention_s=0.001)
    await events.wait_caught_up()

    async def trimmed() -> bool:
        # Trimming runs after an ack, at most once per second per stream: keep adding to trigger it.
        await events.add(JobHistory().queued())
        oldest = await redis_client.xrange(events.stream, count=1)
        return oldest[0][0].decode() not in first_ids

    await wait_for(trimmed, "acked entries trimmed", within=10.0, interval=0.3)


async def test_stop_commits_and_acks_the_batches_in_flight(
    store: Store, pool: AsyncConnectionPool[Any], events: Events, start_projector: StartProjector
) -> None:
    jobs = [JobHistory() for _ in range(50)]
    for job in jobs:
        await events.add_all(job.lifecycle())
    running = await start_projector(store, batch_size=10)
    await wait_for(lambda: fetch(pool, "SELECT 1 FROM jobs LIMIT 1"), "a first batch committed")
    await running.stop()

    assert await events.pending() == 0  # whatever was read was committed and acked
    projected = len(await stored_events(pool))
    assert projected == running.projector.projected
    assert projected > 0


async def test_concurrent_migrations_apply_once(results_db: str) -> None:
    from conveyor.results.store import load_migrations, open_pool

    packaged = load_migrations()
    pools = [await open_pool(results_db, 2) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(Store(p).migrate() for p in pools))
        assert sorted(applied) == [[], [], [m.version for m in packaged]]
        assert await Store(pools[0]).migrate() == []
        rows = await fetch(pools[0], "SELECT version, name FROM schema_migrations ORDER BY version")
        assert rows == [(m.version, m.name) for m in packaged]
    finally:
        for p in pools:
            await p.close()


async def test_acked_events_leave_redis_after_the_retention_even_when_idle(
    store: Store, events: Events, redis_client: redis.asyncio.Redis, start_projector: StartProjector
) -> None:
    await events.add_all(JobHistory().lifecycle())
    await start_projector(store, retention_s=0.5, block_ms=200)
    await events.wait_caught_up()

    async def emptied() -> bool:
        # Nothing new arrives: only the idle path can trim.
        return await redis_client.xlen(events.stream) == 0

    await wait_for(emptied, "idle trimming of acked events", within=10.0, interval=0.2)


async def test_a_migration_changed_after_it_was_applied_stops_the_start(results_db: str) -> None:
    from conveyor.results.store import MigrationMismatch, open_pool

    pool = await open_pool(results_db, 2)
    try:
        await Store(pool).migrate()
        async with pool.connection() as conn:
            await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(MigrationMismatch, match=r"0001_init\.sql differs"):
            await Store(pool).migrate()
    finally:
        await pool.close()
