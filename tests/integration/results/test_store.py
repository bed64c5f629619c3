"""The batch upsert against real PostgreSQL: merging batches gives what folding all events at once gives."""

from __future__ import annotations

import random
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from conveyor.common.keys import queue_keys
from conveyor.results.projector import Batch
from conveyor.results.queries import Queries
from conveyor.results.store import Store
from conveyor.v1 import event_pb2, job_pb2
from tests.unit.results.builders import JobHistory, stored

STREAM = queue_keys("default").events


def batch_of(entries: list[tuple[str, event_pb2.JobEvent]]) -> Batch:
    batch = Batch()
    batch.add(
        "default",
        STREAM,
        [(entry_id.encode(), {b"j": e.job_id.rpartition("/")[2].encode(), b"e": stored(e)}) for entry_id, e in entries],
    )
    return batch


async def write(store: Store, entries: list[tuple[str, event_pb2.JobEvent]]) -> None:
    batch = batch_of(entries)
    await store.write(batch.finish(), batch.events)


async def rows(pool: AsyncConnectionPool[Any]) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute("SELECT * FROM jobs ORDER BY job_id")
        found: list[dict[str, Any]] = await cur.fetchall()
        return found


async def reset(pool: AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn:
        await conn.execute("TRUNCATE jobs, job_events")


def numbered(events: list[event_pb2.JobEvent], start_ms: int = 1000) -> list[tuple[str, event_pb2.JobEvent]]:
    return [(f"{start_ms + i}-0", e) for i, e in enumerate(events)]


async def test_a_final_outcome_delivered_after_newer_events_still_wins(
    store: Store, pool: AsyncConnectionPool[Any]
) -> None:
    job = JobHistory()
    q, a, s, p = numbered([job.queued(0), job.active(1), job.succeeded(2, "ok"), job.progress(3, 99.0)])
    # A stray PROGRESS newer than the outcome is projected first, the outcome late (another consumer held it).
    await write(store, [q, a, p])
    await write(store, [s])
    (row,) = await rows(pool)
    assert row["state"] == job_pb2.JOB_STATE_SUCCEEDED
    assert row["result"] == "ok"
    assert row["finished_at"] is not None


async def test_a_newer_queued_reopens_a_dead_letter_but_not_a_success(
    store: Store, pool: AsyncConnectionPool[Any]
) -> None:
    dead, done = JobHistory(), JobHistory()
    await write(store, numbered([dead.queued(0), dead.active(1), dead.failed(2, event_pb2.EVENT_TYPE_DEAD_LETTERED)]))
    await write(store, numbered([done.queued(0), done.active(1), done.succeeded(2, 1)], start_ms=2000))
    await write(store, [("3000-0", dead.queued(10, attempt=1)), ("3000-1", done.queued(10, attempt=1))])

    by_id = {r["job_id"]: r for r in await rows(pool)}
    assert by_id[dead.job_id]["state"] == job_pb2.JOB_STATE_QUEUED
    assert by_id[dead.job_id]["finished_at"] is None
    assert (by_id[dead.job_id]["queued_event_ms"], by_id[dead.job_id]["queued_event_seq"]) == (3000, 0)
    assert by_id[done.job_id]["state"] == job_pb2.JOB_STATE_SUCCEEDED
    assert by_id[done.job_id]["last_event_ms"] == 2002

    # Replaying the dead letter's old outcome does not close it again.
    await write(store, numbered([dead.failed(2, event_pb2.EVENT_TYPE_DEAD_LETTERED)], start_ms=1002))
    by_id = {r["job_id"]: r for r in await rows(pool)}
    assert by_id[dead.job_id]["state"] == job_pb2.JOB_STATE_QUEUED


async def test_a_stray_event_after_a_failure_does_not_reopen_it(store: Store, pool: AsyncConnectionPool[Any]) -> None:
    job = JobHistory()
    await write(store, numbered([job.queued(0), job.active(1), job.failed(2)]))
    await write(store, numbered([job.active(3, worker="stale"), job.progress(4, 10.0)], start_ms=2000))
    (row,) = await rows(pool)
    assert row["state"] == job_pb2.JOB_STATE_FAILED
    assert row["worker"] == "w1"
    assert row["last_event_ms"] == 1002


async def test_a_row_first_seen_without_its_job_gets_the_job_fields_later(
    store: Store, pool: AsyncConnectionPool[Any]
) -> None:
    job = JobHistory(created=7.0, labels={"k": "v"})
    await write(store, [("1001-0", job.active(1))])
    (row,) = await rows(pool)
    assert row["type"] is None and row["state"] == job_pb2.JOB_STATE_ACTIVE
    assert row["created_at"] is not None  # from the ULID, so keyset paging stays total

    await write(store, [("1002-0", job.succeeded(2, {"x": 1}))])
    (row,) = await rows(pool)
    assert row["type"] == "demo.echo" and row["labels"] == {"k": "v"}
    assert row["created_at"].timestamp() == job.job.created_at.ToMicroseconds() / 1e6
    assert row["payload"] == {"n": 1}
    assert row["started_at"] is not None  # kept from the earlier batch


async def test_rows_refused_for_their_data_are_set_aside_and_the_rest_committed(
    store: Store, pool: AsyncConnectionPool[Any]
) -> None:
    good, bad, nul = JobHistory(), JobHistory(), JobHistory()
    poison = bad.succeeded(2, None)
    poison.result_json = b"{not json"  # 22P02
    nul_event = nul.progress(1, 50.0, "nul\x00message")  # 22021
    entries = numbered([good.queued(0), bad.queued(0), poison, nul.queued(0), nul_event, good.succeeded(3, {})])
    batch = batch_of(entries)
    set_aside = await store.write(batch.finish(), batch.events)
    assert {(s.job_id, s.sqlstate[:2]) for s in set_aside} == {(bad.job_id, "22"), (nul.job_id, "22")}
    # Every entry of a refused job is kept, as it was in the stream; the good job is projected.
    assert sorted(s.entry_id for s in set_aside) == sorted(e for e, ev in entries if ev.job_id != good.job_id)
    by_id = {r["job_id"]: r for r in await rows(pool)}
    assert set(by_id) == {good.job_id}
    assert by_id[good.job_id]["state"] == job_pb2.JOB_STATE_SUCCEEDED
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT job_id, entry_id, event, sqlstate FROM projection_set_aside ORDER BY id")
        kept = await cur.fetchall()
    assert {(r[0], r[1]) for r in kept} == {(s.job_id, s.entry_id) for s in set_aside}
    raw = dict(entries)
    assert all(bytes(r[2]) == stored(raw[r[1]]) for r in kept)
    # A redelivery of the same entries (a crash before the ack) finds the rows instead of adding more.
    again = batch_of(entries)
    await store.write(again.finish(), again.events)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM projection_set_aside")
        assert (await cur.fetchone()) == (len(kept),)


def random_history(rng: random.Random) -> list[event_pb2.JobEvent]:
    """A plausible life: attempts with progress and retries, an outcome, maybe a re-queue and stray events."""
    job = JobHistory(created=rng.random() * 100)
    t = 0.0
    out = [job.queued(t)]
    for life in range(rng.choice([1, 1, 2])):
        attempts = rng.randint(1, 3)
        for attempt in range(1, attempts + 1):
            t += 1
            out.append(job.active(t, attempt=attempt, worker=f"w{life}{attempt}"))
            for _ in range(rng.randint(0, 2)):
                t += 1
                out.append(job.progress(t, rng.random() * 100, f"p{t}", attempt=attempt))
            if attempt < attempts:
                t += 1
                out.append(job.retry(t, until=t + 5, attempt=attempt))
        t += 1
        outcome = rng.choice(["ok", "fail", "dead", "cancel"])
        if outcome == "ok":
            out.append(job.succeeded(t, {"t": t}, attempt=attempts))
        elif outcome == "cancel":
            out.append(job.failed(t, event_pb2.EVENT_TYPE_CANCELLED, attempt=attempts))
        else:
            etype = event_pb2.EVENT_TYPE_FAILED if outcome == "fail" else event_pb2.EVENT_TYPE_DEAD_LETTERED
            out.append(job.failed(t, etype, attempt=attempts))
            if life == 0 and rng.random() < 0.5:
                t += 1
                out.append(job.queued(t, attempt=attempts))  # re-queued dead letter
                continue
        if rng.random() < 0.5:
            t += 1
            out.append(job.active(t, attempt=attempts, worker="stale"))  # ignored: the job is final
        break
    return out


async def test_any_split_into_batches_with_replays_equals_folding_everything_at_once(
    store: Store, pool: AsyncConnectionPool[Any]
) -> None:
    rng = random.Random(20261125)
    histories = [random_history(rng) for _ in range(60)]
    # Interleave the jobs' events in one stream, as in a queue's events stream.
    entries: list[tuple[str, event_pb2.JobEvent]] = []
    cursors = [0] * len(histories)
    ms = 1_000
    while any(c < len(h) for c, h in zip(cursors, histories, strict=True)):
        i = rng.choice([i for i, h in enumerate(histories) if cursors[i] < len(h)])
        entries.append((f"{ms}-{rng.randint(0, 3)}", histories[i][cursors[i]]))
        cursors[i] += 1
        ms += rng.randint(1, 2)

    await write(store, entries)
    expected = await rows(pool)

    for trial in range(5):
        await reset(pool)
        cuts = sorted(rng.sample(range(1, len(entries)), len(entries) // (12 - 2 * trial)))
        batches = [entries[a:b] for a, b in zip([0, *cuts], [*cuts, len(entries)], strict=True)]
        for n, batch in enumerate(batches):
            await write(store, batch)
            if rng.random() < 0.5:
                # A crash before XACK replays an earlier batch (or this one) later.
                await write(store, batches[rng.randint(0, n)])
        assert await rows(pool) == expected, f"trial {trial}"


async def listed(pool: AsyncConnectionPool[Any], job_id: str, page: int) -> list[str]:
    """Every event id of ``job_id`` as ListJobEvents pages through them ``page`` at a time."""
    out: list[str] = []
    after: tuple[int, int] | None = None
    while True:
        events = await Queries(pool).list_events(job_id, after, page + 1)
        out += [e.id for e in events[:page]]
        if len(events) <= page:
            return out
        ms, _, seq = events[page - 1].id.partition("-")
        after = (int(ms), int(seq))


async def test_a_replay_with_other_batch_boundaries_loses_no_event_and_repeats_none(
    store: Store, pool: AsyncConnectionPool[Any]
) -> None:
    job = JobHistory()
    entries = numbered([job.queued(0), job.active(1), *[job.progress(2 + i, i, f"p{i}") for i in range(8)]])
    ids = [entry_id for entry_id, _ in entries]
    # Committed, not acked; then re-read with the same first entry but more after it (same history
    # row key: its records are appended), and with other boundaries (overlapping rows).
    await write(store, entries[:1])
    await write(store, entries[:3])
    await write(store, entries[2:6])
    await write(store, entries[1:4])
    await write(store, entries[5:])
    await write(store, entries[5:])  # an exact replay changes nothing
    for page in (1, 2, 3, 100):
        assert await listed(pool, job.job_id, page) == ids, f"page {page}"
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM job_events WHERE first_ms = 1005")
        assert await cur.fetchone() == (1,)
        cur = await conn.execute("SELECT length(events) FROM job_events WHERE first_ms = 1000")
        row = await cur.fetchone()
    assert row is not None
    single = len(stored(job.queued(0))) + 20
    assert row[0] < 5 * single  # [e0] then [e0, e1, e2] appended once, not on every replay


async def test_events_of_one_batch_share_one_history_row_per_job(store: Store, pool: AsyncConnectionPool[Any]) -> None:
    a, b = JobHistory(), JobHistory()
    await write(store, numbered([a.queued(0), b.queued(0), a.active(1), b.active(1), a.succeeded(2, "ok")]))
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT job_id, first_ms, last_ms FROM job_events ORDER BY job_id")
        rows = await cur.fetchall()
    assert sorted(rows) == sorted([(a.job_id, 1000, 1004), (b.job_id, 1001, 1003)])
    assert await listed(pool, a.job_id, 2) == ["1000-0", "1002-0", "1004-0"]
