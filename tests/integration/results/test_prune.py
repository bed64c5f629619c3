"""Finished jobs and their events leave PostgreSQL after CONVEYOR_PG_RETENTION_DAYS, in batches, one pruner at once."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from conveyor.common.settings import ResultsSettings
from conveyor.results.projector import Batch
from conveyor.results.prune import PRUNE_BATCH, PRUNE_LOCK, Pruner
from conveyor.results.store import Store
from conveyor.v1 import event_pb2
from tests.support.wait import wait_for
from tests.unit.results.builders import JobHistory, stored


async def write_jobs(store: Store, events: list[event_pb2.JobEvent]) -> None:
    batch = Batch()
    batch.add(
        "default",
        "conveyor:{default}:events",
        [
            (f"{1000 + i}-0".encode(), {b"j": e.job_id.rpartition("/")[2].encode(), b"e": stored(e)})
            for i, e in enumerate(events)
        ],
    )
    await store.write(batch.finish(), batch.events)


async def scalar(pool: AsyncConnectionPool[Any], query: str, *params: Any) -> Any:
    async with pool.connection() as conn:
        cur = await conn.execute(query.encode(), params)
        row = await cur.fetchone()
        return row[0] if row else None


async def backdate(pool: AsyncConnectionPool[Any], job_ids: list[str], days: int) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE jobs SET finished_at = now() - make_interval(days => %s) WHERE job_id = ANY(%s)", (days, job_ids)
        )


async def setup_jobs(store: Store, pool: AsyncConnectionPool[Any]) -> tuple[list[str], list[str], list[str]]:
    """Seven finished jobs backdated 40 days, two finished 10 days ago, two still running."""
    old = [JobHistory() for _ in range(7)]
    recent = [JobHistory() for _ in range(2)]
    running = [JobHistory() for _ in range(2)]
    events = [e for j in old + recent for e in j.lifecycle()] + [e for j in running for e in j.lifecycle()[:2]]
    await write_jobs(store, events)
    await backdate(pool, [j.job_id for j in old], 40)
    await backdate(pool, [j.job_id for j in recent], 10)
    return [j.job_id for j in old], [j.job_id for j in recent], [j.job_id for j in running]


async def test_prunes_old_finished_jobs_with_their_events_in_batches(
    store: Store, pool: AsyncConnectionPool[Any]
) -> None:
    old, recent, running = await setup_jobs(store, pool)
    pruner = Pruner(pool, 30, batch=3)
    assert await pruner.prune_once() == 7  # batches of 3, 3 and 1
    assert pruner.pruned == 7
    kept = await scalar(pool, "SELECT array_agg(job_id ORDER BY job_id) FROM jobs")
    assert kept == sorted(recent + running)
    assert await scalar(pool, "SELECT count(*) FROM job_events WHERE job_id = ANY(%s)", old) == 0
    assert await scalar(pool, "SELECT count(*) FROM job_events WHERE job_id = ANY(%s)", recent + running) == 4
    assert await pruner.prune_once() == 0


async def test_only_one_process_prunes_at_a_time(store: Store, pool: AsyncConnectionPool[Any], results_db: str) -> None:
    old, _, _ = await setup_jobs(store, pool)
    # Another results process is pruning: it holds the lock.
    async with await psycopg.AsyncConnection.connect(results_db, autocommit=True) as other:
        await other.execute("SELECT pg_advisory_lock(%s)", (PRUNE_LOCK,))
        assert await Pruner(pool, 30).prune_once() is None
        assert await scalar(pool, "SELECT count(*) FROM jobs WHERE job_id = ANY(%s)", old) == 7
        await other.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK,))
    assert await Pruner(pool, 30).prune_once() == 7


async def test_the_loop_prunes_until_stopped_and_zero_days_disables_it(
    store: Store, pool: AsyncConnectionPool[Any]
) -> None:
    old, _, _ = await setup_jobs(store, pool)
    assert not Pruner(pool, 0).enabled
    stop = asyncio.Event()
    await asyncio.wait_for(Pruner(pool, 0).run(stop), 5)  # returns at once: pruning is off
    assert await scalar(pool, "SELECT count(*) FROM jobs WHERE job_id = ANY(%s)", old) == 7
    pruner = Pruner(pool, 30, interval_s=0.05, batch=2)
    task = asyncio.create_task(pruner.run(stop))

    async def pruned() -> bool:
        return await scalar(pool, "SELECT count(*) FROM jobs WHERE job_id = ANY(%s)", old) == 0

    await wait_for(pruned, "the loop to prune the old jobs")
    new_old, _, _ = await setup_jobs(store, pool)  # a later round finds the next ones

    async def pruned_again() -> bool:
        return await scalar(pool, "SELECT count(*) FROM jobs WHERE job_id = ANY(%s)", new_old) == 0

    await wait_for(pruned_again, "a later round to prune newly old jobs")
    stop.set()
    await asyncio.wait_for(task, 5)


def test_settings() -> None:
    defaults = ResultsSettings.from_env({})
    assert (defaults.pg_retention_days, defaults.prune_interval_s, defaults.prune_batch) == (30.0, 600.0, 1000)
    assert defaults.db_lock_timeout_s == 5.0
    custom = ResultsSettings.from_env(
        {
            "CONVEYOR_PG_RETENTION_DAYS": "7",
            "CONVEYOR_PG_PRUNE_INTERVAL_SECONDS": "60",
            "CONVEYOR_PG_PRUNE_BATCH": "500",
            "CONVEYOR_DB_LOCK_TIMEOUT_SECONDS": "0",
        }
    )
    assert (custom.pg_retention_days, custom.prune_interval_s, custom.prune_batch) == (7.0, 60.0, 500)
    assert custom.db_lock_timeout_s == 0.0


async def test_a_round_reads_the_prune_index(pool: AsyncConnectionPool[Any]) -> None:
    # 80,000 jobs, half finished over the last day: finding the old ones must not scan the table.
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO jobs (job_id, queue, state, created_at, updated_at, finished_at, last_event_ms,"
            " last_event_seq)"
            " SELECT 'q' || (i % 20) || '/' || lpad(i::text, 26, '0'), 'q' || (i % 20),"
            "  CASE WHEN i % 2 = 0 THEN 5 ELSE 1 END, now(), now(),"
            "  CASE WHEN i % 2 = 0 THEN now() - (i || ' seconds')::interval END, 1, 0"
            " FROM generate_series(1, 80000) AS i"
        )
        await conn.execute("ANALYZE jobs")
        sql = PRUNE_BATCH.replace("%(age)s", "interval '30 days'").replace("%(batch)s", "1000")
        cur = await conn.execute(("EXPLAIN " + sql).encode())
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert "jobs_finished_idx" in plan, plan
    assert "Seq Scan on jobs" not in plan, plan
