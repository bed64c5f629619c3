"""ADR 0020: the projector keeps back a job a batch leaves unfinished, so that one finishing soon after is
written once, as its final row; real Redis and PostgreSQL, acks only after the commit."""

from __future__ import annotations

import time
from typing import Any

from psycopg_pool import AsyncConnectionPool

from conveyor.results.store import Store
from conveyor.v1 import event_pb2, job_pb2
from tests.integration.results.conftest import Events, StartProjector, stored_events
from tests.integration.results.test_projector import fetch, job_row
from tests.support.wait import wait_for
from tests.unit.results.builders import JobHistory


async def history_rows(pool: AsyncConnectionPool[Any], job_id: str) -> int:
    return len(await fetch(pool, "SELECT 1 FROM job_events WHERE job_id = %s", job_id))


async def test_a_job_finishing_within_the_window_is_written_once_as_its_final_row(
    store: Store, pool: AsyncConnectionPool[Any], events: Events, start_projector: StartProjector
) -> None:
    job = JobHistory(payload={"n": 7})
    # A long block: a quiet read (block_ms) writes what is held, and this test looks in between.
    await start_projector(store, defer_ms=5000, block_ms=3000)
    queued_id = await events.add(job.queued(0))
    await wait_for(lambda: _pending_is(events, 1), "the QUEUED event read and held back")

    # Held back: not in PostgreSQL, and so not acked either (invariant 3).
    assert await job_row(pool, job.job_id) is None
    assert await events.pending() == 1

    await events.add_all([job.active(1), job.succeeded(2, "done")])
    await events.wait_caught_up()
    row = await job_row(pool, job.job_id)
    assert row is not None and row["state"] == job_pb2.JOB_STATE_SUCCEEDED
    assert row["type"] == "demo.echo" and row["payload"] == {"n": 7} and row["result"] == "done"
    assert (row["queued_event_ms"], row["queued_event_seq"]) == tuple(int(x) for x in queued_id.split("-"))
    # Written by one transaction: the row was inserted final (never updated), one history row.
    (created,) = await fetch(pool, "SELECT xmin::text = (SELECT xmin::text FROM job_events WHERE job_id = %s) "
                             "FROM jobs WHERE job_id = %s", job.job_id, job.job_id)  # fmt: skip
    assert created == (True,)
    assert await history_rows(pool, job.job_id) == 1
    assert [t for _, _, t in await stored_events(pool, job.job_id)] == [
        event_pb2.EVENT_TYPE_QUEUED,
        event_pb2.EVENT_TYPE_ACTIVE,
        event_pb2.EVENT_TYPE_SUCCEEDED,
    ]


async def _pending_is(events: Events, n: int) -> bool:
    """Whether group ``results`` has read every entry and holds ``n`` of them unacked (False before it exists)."""
    try:
        pending, lag = await events.unacked()
    except AssertionError:
        return False
    return pending == n and lag == 0


async def test_a_job_still_waiting_is_written_once_the_stream_goes_quiet(
    store: Store, pool: AsyncConnectionPool[Any], events: Events, start_projector: StartProjector
) -> None:
    job = JobHistory()
    await start_projector(store, defer_ms=600_000, block_ms=300)
    await events.add(job.queued(0))
    await events.wait_caught_up()  # acked: committed first, long before the window
    row = await job_row(pool, job.job_id)
    assert row is not None and row["state"] == job_pb2.JOB_STATE_QUEUED

    # Its outcome later is the usual update of that row.
    await events.add_all([job.active(1), job.succeeded(2, "ok")])
    await events.wait_caught_up()
    row = await job_row(pool, job.job_id)
    assert row is not None and row["state"] == job_pb2.JOB_STATE_SUCCEEDED
    assert [t for _, _, t in await stored_events(pool, job.job_id)] == [
        event_pb2.EVENT_TYPE_QUEUED,
        event_pb2.EVENT_TYPE_ACTIVE,
        event_pb2.EVENT_TYPE_SUCCEEDED,
    ]


async def test_a_job_still_waiting_while_events_keep_coming_is_written_when_its_window_ends(
    store: Store, pool: AsyncConnectionPool[Any], events: Events, start_projector: StartProjector
) -> None:
    waiting, busy = JobHistory(), JobHistory()
    await start_projector(store, defer_ms=600, block_ms=3000)
    await events.add(waiting.queued(0))
    started = time.monotonic()
    await events.add(busy.queued(0))
    await events.add(busy.active(1))

    async def written_while_busy() -> bool:
        await events.add(busy.progress(1.5, 10, "still going"))  # never quiet: no read comes back empty
        return await job_row(pool, waiting.job_id) is not None

    await wait_for(written_while_busy, "the waiting job written at the end of its window", within=10.0, interval=0.05)
    waited = time.monotonic() - started
    assert 0.5 <= waited < 5.0, f"written after {waited:.2f} s, window 0.6 s"
    row = await job_row(pool, waiting.job_id)
    assert row is not None and row["state"] == job_pb2.JOB_STATE_QUEUED


async def test_stopping_writes_the_jobs_held_back(
    store: Store, pool: AsyncConnectionPool[Any], events: Events, start_projector: StartProjector
) -> None:
    jobs = [JobHistory() for _ in range(20)]
    running = await start_projector(store, defer_ms=600_000, block_ms=5000)
    for job in jobs:
        await events.add(job.queued(0))
    await wait_for(lambda: _pending_is(events, len(jobs)), "every QUEUED event read and held back")
    assert await fetch(pool, "SELECT 1 FROM jobs") == []

    await running.stop()
    assert await events.pending() == 0
    states = await fetch(pool, "SELECT state FROM jobs")
    assert sorted(states) == [(job_pb2.JOB_STATE_QUEUED,)] * len(jobs)


async def test_a_restarted_projector_projects_the_jobs_a_dead_one_held_back(
    store: Store, pool: AsyncConnectionPool[Any], events: Events, start_projector: StartProjector
) -> None:
    job = JobHistory()
    first = await start_projector(store, defer_ms=600_000, block_ms=3000, consumer="results-deferring")
    await events.add(job.queued(0))
    await wait_for(lambda: _pending_is(events, 1), "the QUEUED event read and held back")
    first.task.cancel()  # dies without its stop: what it held is pending for its consumer name
    await wait_for(lambda: _done(first.task), "the projector task cancelled")
    assert await job_row(pool, job.job_id) is None

    await start_projector(store, defer_ms=0, consumer="results-deferring")
    await events.wait_caught_up()
    row = await job_row(pool, job.job_id)
    assert row is not None and row["state"] == job_pb2.JOB_STATE_QUEUED


async def _done(task: Any) -> bool:
    return bool(task.done())
