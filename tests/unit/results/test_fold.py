"""Folding a batch of stream entries into job rows (no sockets): the Python half of invariant 2."""

from __future__ import annotations

import json

from conveyor.common.defaults import DEFAULT_RETRY
from conveyor.common.ids import ulid_time_ms
from conveyor.common.keys import queue_keys
from conveyor.results.projector import Batch, Carry
from conveyor.results.store import unpack_events
from conveyor.v1 import event_pb2, job_pb2
from tests.unit.results.builders import BASE_S, JobHistory, stored

STREAM = queue_keys("default").events


def entries(events: list[event_pb2.JobEvent], start_ms: int = 1000) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return [
        (f"{start_ms + i}-{i % 2}".encode(), {b"j": e.job_id.rpartition("/")[2].encode(), b"e": stored(e)})
        for i, e in enumerate(events)
    ]


def history(batch: Batch) -> list[tuple[str, int, int, int]]:
    """(job_id, event_ms, event_seq, type) of every event in the batch's history rows, by id."""
    out = []
    for job_id, first_ms, first_seq, last_ms, last_seq, packed in batch.events:
        records = unpack_events(packed)
        assert (first_ms, first_seq) == min((ms, seq) for ms, seq, _ in records)
        assert (last_ms, last_seq) == max((ms, seq) for ms, seq, _ in records)
        out += [(job_id, ms, seq, event_pb2.JobEvent.FromString(data).type) for ms, seq, data in records]
    return sorted(out, key=lambda e: e[1:3])


def fold(events: list[event_pb2.JobEvent]) -> Batch:
    batch = Batch()
    batch.add("default", STREAM, entries(events))
    return batch


def test_lifecycle_folds_into_one_final_row() -> None:
    job = JobHistory(payload={"a": 1}, labels={"x": "y"}, created=2.0)
    batch = fold(job.lifecycle(start=2.0, result=[1, 2]))
    (row,) = batch.finish()
    assert row.job_id == job.job_id and row.queue == "default" and row.type == "demo.echo"
    assert row.state == job_pb2.JOB_STATE_SUCCEEDED
    assert json.loads(row.payload or "") == {"a": 1}
    assert json.loads(row.result or "") == [1, 2]
    assert json.loads(row.labels or "") == {"x": "y"}
    assert row.attempts == 1 and row.max_attempts == 3 and row.timeout_ms == 30_000
    assert row.worker == "w1"
    assert (row.progress_percent, row.progress_message) == (50.0, "half way")
    assert row.created_us == (BASE_S + 2) * 1_000_000
    assert row.started_us == (BASE_S + 3) * 1_000_000
    assert row.finished_us == row.updated_us == (BASE_S + 5) * 1_000_000
    assert (row.last_ms, row.last_seq) == (1003, 1)
    assert (row.queued_ms, row.queued_seq) == (1000, 0)
    assert [e[1:4] for e in history(batch)] == [
        (1000, 0, event_pb2.EVENT_TYPE_QUEUED),
        (1001, 1, event_pb2.EVENT_TYPE_ACTIVE),
        (1002, 0, event_pb2.EVENT_TYPE_PROGRESS),
        (1003, 1, event_pb2.EVENT_TYPE_SUCCEEDED),
    ]
    assert batch.acks == {STREAM: [b"1000-0", b"1001-1", b"1002-0", b"1003-1"]}


def test_events_after_a_final_state_are_ignored_but_kept_in_history() -> None:
    job = JobHistory()
    batch = fold([job.queued(0), job.active(1), job.succeeded(2, "ok"), job.active(3, worker="late")])
    (row,) = batch.finish()
    assert row.state == job_pb2.JOB_STATE_SUCCEEDED
    assert row.worker == "w1"
    assert row.last_ms == 1002
    assert len(history(batch)) == 4
    assert len(batch.events) == 1  # one history row per job and batch


def test_a_requeue_reopens_a_dead_letter_but_not_a_cancelled_job() -> None:
    dead, cancelled = JobHistory(), JobHistory()
    batch = fold(
        [
            dead.queued(0),
            dead.failed(1, event_pb2.EVENT_TYPE_DEAD_LETTERED),
            dead.queued(2, attempt=1),
            cancelled.queued(0),
            cancelled.failed(1, event_pb2.EVENT_TYPE_CANCELLED),
            cancelled.queued(2),
        ]
    )
    by_id = {r.job_id: r for r in batch.finish()}
    assert by_id[dead.job_id].state == job_pb2.JOB_STATE_QUEUED
    assert by_id[dead.job_id].finished_us is None
    assert by_id[dead.job_id].queued_ms == 1002
    assert by_id[cancelled.job_id].state == job_pb2.JOB_STATE_CANCELLED
    assert by_id[cancelled.job_id].finished_us is not None


def test_retry_and_delay_set_error_and_run_at() -> None:
    job = JobHistory()
    (row,) = fold([job.queued(0), job.active(1), job.retry(2, until=9, message="nope")]).finish()
    assert row.state == job_pb2.JOB_STATE_RETRY_SCHEDULED
    assert json.loads(row.error or "") == {"message": "nope", "kind": "RuntimeError", "retryable": True}
    assert row.run_at_us == (BASE_S + 9) * 1_000_000
    (row,) = fold([job.delayed(0, until=30)]).finish()
    assert row.state == job_pb2.JOB_STATE_DELAYED and row.run_at_us == (BASE_S + 30) * 1_000_000


def test_a_row_without_its_job_takes_created_at_from_the_ulid() -> None:
    job = JobHistory()
    (row,) = fold([job.active(1)]).finish()
    assert row.type is None and row.labels is None
    assert row.created_us == ulid_time_ms(job.job_id.rpartition("/")[2]) * 1000


def test_malformed_and_deleted_entries_are_acked_and_skipped() -> None:
    job = JobHistory()
    batch = Batch()
    batch.add(
        "default",
        STREAM,
        [
            (b"1-0", {b"j": b"X", b"e": b"\xff\xff not a protobuf"}),
            (b"2-0", {}),  # deleted while pending: XREADGROUP 0 returns no fields
            (b"3-0", {b"j": job.job_id.rpartition("/")[2].encode(), b"e": job.queued().SerializeToString()}),
            (b"4-0", {b"j": b"", b"e": event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_ACTIVE).SerializeToString()}),
        ],
        deleted=[b"0-5"],
    )
    assert [r.job_id for r in batch.finish()] == [job.job_id]
    assert sorted(batch.acks[STREAM]) == [b"0-5", b"1-0", b"2-0", b"3-0", b"4-0"]
    assert batch.size == 5


def test_unknown_event_types_are_kept_in_history_only() -> None:
    job = JobHistory()
    future = event_pb2.JobEvent(job_id=job.job_id, type=77)  # type: ignore[arg-type]
    batch = fold([future])
    assert batch.finish() == []
    assert [e[3] for e in history(batch)] == [77]


def test_job_id_comes_from_the_queue_and_entry_ulid_else_from_the_event() -> None:
    from_entry, from_event = JobHistory(), JobHistory()
    batch = Batch()
    batch.add(
        "default",
        STREAM,
        [
            (b"1-0", {b"j": from_entry.job_id.rpartition("/")[2].encode(), b"e": stored(from_entry.queued())}),
            (b"2-0", {b"e": from_event.queued().SerializeToString()}),  # no j field: the event's own id
        ],
    )
    assert sorted(r.job_id for r in batch.finish()) == sorted([from_entry.job_id, from_event.job_id])
    assert {e[0] for e in history(batch)} == {from_entry.job_id, from_event.job_id}


def test_a_final_event_whose_stored_job_has_no_policy_projects_the_default_one() -> None:
    job = JobHistory()
    job.job.ClearField("retry")  # as the producer stores a job enqueued without a policy (ADR 0010)
    job.job.ClearField("created_at")
    (row,) = fold([job.queued(0)]).finish()
    assert row.retry is None and row.max_attempts is None  # a QUEUED event names no policy
    (row,) = fold([job.queued(0), job.active(1), job.succeeded(2, {})]).finish()
    assert job_pb2.RetryPolicy.FromString(row.retry or b"") == DEFAULT_RETRY
    assert row.max_attempts == DEFAULT_RETRY.max_attempts
    assert row.created_us == ulid_time_ms(job.job_id.rpartition("/")[2]) * 1000  # ADR 0010
    (row,) = fold([job.failed(2, event_pb2.EVENT_TYPE_DEAD_LETTERED)]).finish()
    assert job_pb2.RetryPolicy.FromString(row.retry or b"") == DEFAULT_RETRY


def test_a_final_event_whose_stored_job_has_a_policy_projects_that_one() -> None:
    job = JobHistory()
    job.job.retry.CopyFrom(job_pb2.RetryPolicy(max_attempts=8, backoff=job_pb2.BACKOFF_FIXED))
    (row,) = fold([job.active(1), job.succeeded(2, {})]).finish()
    assert job_pb2.RetryPolicy.FromString(row.retry or b"") == job.job.retry and row.max_attempts == 8


def test_malformed_entries_are_kept_to_set_aside_and_acked_with_the_batch() -> None:
    good = JobHistory()
    batch = Batch()
    batch.add(
        "default",
        STREAM,
        [
            (b"1000-0", {b"j": b"01JDQ4ZG0000000000000000AA", b"e": b"\xff\xff"}),
            *entries([good.queued(0)], start_ms=1001),
        ],
    )
    assert [(m.job_id, m.entry_id, m.event, m.sqlstate) for m in batch.malformed] == [
        ("default/01JDQ4ZG0000000000000000AA", "1000-0", b"\xff\xff", "")
    ]
    assert "malformed event" in batch.malformed[0].error
    assert batch.acks[STREAM] == [b"1000-0", b"1001-0"]
    assert [r.job_id for r in batch.finish()] == [good.job_id]


def test_finished_names_each_final_job_with_its_final_event_id() -> None:
    done, running = JobHistory(), JobHistory()
    # done: QUEUED 1000-0, ACTIVE 1001-1, PROGRESS 1002-0, SUCCEEDED 1003-1, then a stray PROGRESS 1004-0.
    batch = fold([*done.lifecycle(), done.progress(9, 99.0), running.queued(0), running.active(1)])
    batch.finish()
    assert batch.finished() == {"default": [(done.job_id.rpartition("/")[2], "1003-1")]}


# -- keeping back unfinished jobs for their outcome (ADR 0020) -----------------------------------------


def test_a_job_left_unfinished_is_kept_back_with_its_history_and_entry_ids() -> None:
    waiting, done = JobHistory(), JobHistory()
    carry: Carry = {}
    batch = Batch(carry)
    batch.add("default", STREAM, entries([waiting.queued(0), done.queued(0), done.active(1), done.succeeded(2, "ok")]))
    batch.settle(now=100.0, window_s=1.0, max_jobs=100)

    # The finished job is written now, alone; the waiting one is kept back whole, nothing of it acked.
    assert [r.job_id for r in batch.finish()] == [done.job_id]
    assert {e[0] for e in history(batch)} == {done.job_id}
    assert batch.acks == {STREAM: [b"1001-1", b"1002-0", b"1003-1"]}
    assert batch.size == 3
    assert list(carry) == [waiting.job_id]
    assert carry[waiting.job_id].born == 100.0 and carry[waiting.job_id].row.state == job_pb2.JOB_STATE_QUEUED
    assert batch.finished() == {"default": [(done.job_id.rpartition("/")[2], "1003-1")]}


def test_a_kept_job_that_finishes_in_a_later_read_is_written_once_as_its_final_row() -> None:
    job, other = JobHistory(payload={"a": 1}), JobHistory()
    carry: Carry = {}
    first = Batch(carry)
    first.add("default", STREAM, entries([job.queued(0)], start_ms=1000))
    first.settle(now=100.0, window_s=1.0, max_jobs=100)
    assert not first  # nothing left to write or ack now

    second = Batch(carry)
    second.add("default", STREAM, entries([job.active(1), other.queued(0)], start_ms=2000))
    second.settle(now=100.3, window_s=1.0, max_jobs=100)
    assert not second and list(carry) == [job.job_id, other.job_id]
    assert carry[job.job_id].born == 100.0  # kept since it was first left unfinished

    third = Batch(carry)
    third.add("default", STREAM, entries([job.succeeded(2, "ok")], start_ms=3000))
    third.settle(now=100.6, window_s=1.0, max_jobs=100)
    assert list(carry) == [other.job_id]
    (row,) = third.finish()
    assert row.state == job_pb2.JOB_STATE_SUCCEEDED
    assert row.type == "demo.echo" and json.loads(row.payload or "") == {"a": 1}  # from the QUEUED event
    assert (row.queued_ms, row.queued_seq) == (1000, 0) and (row.last_ms, row.last_seq) == (3000, 0)
    assert len(third.events) == 1  # one history row holding all three events
    assert [e[1:4] for e in history(third)] == [
        (1000, 0, event_pb2.EVENT_TYPE_QUEUED),
        (2000, 0, event_pb2.EVENT_TYPE_ACTIVE),
        (3000, 0, event_pb2.EVENT_TYPE_SUCCEEDED),
    ]
    assert sorted(third.acks[STREAM]) == [b"1000-0", b"2000-0", b"3000-0"] and third.size == 3


def test_a_kept_job_is_written_unfinished_once_its_window_ends() -> None:
    job, later = JobHistory(), JobHistory()
    carry: Carry = {}
    first = Batch(carry)
    first.add("default", STREAM, entries([job.queued(0)], start_ms=1000))
    first.settle(now=100.0, window_s=1.0, max_jobs=100)
    second = Batch(carry)
    second.add("default", STREAM, entries([job.active(1), later.queued(0)], start_ms=2000))
    second.settle(now=100.5, window_s=1.0, max_jobs=100)

    due = Batch(carry)  # nothing read: the window of the first job ended
    due.settle(now=101.0, window_s=1.0, max_jobs=100)
    (row,) = due.finish()
    assert row.job_id == job.job_id and row.state == job_pb2.JOB_STATE_ACTIVE
    assert due.acks == {STREAM: [b"1000-0", b"2000-0"]} and due.size == 2
    assert list(carry) == [later.job_id]


def test_keeping_back_is_bounded_and_off_at_zero() -> None:
    jobs = [JobHistory() for _ in range(5)]
    carry: Carry = {}
    batch = Batch(carry)
    batch.add("default", STREAM, entries([j.queued(0) for j in jobs]))
    batch.settle(now=1.0, window_s=1.0, max_jobs=2)
    assert list(carry) == [jobs[0].job_id, jobs[1].job_id]  # the oldest kept back (nearest their outcome)
    assert [r.job_id for r in batch.finish()] == [j.job_id for j in jobs[2:]]
    assert batch.size == 3

    carry = {}
    batch = Batch(carry)
    batch.add("default", STREAM, entries([j.queued(0) for j in jobs]))
    batch.settle(now=1.0, window_s=0.0, max_jobs=100)
    assert not carry and len(batch.finish()) == 5


def test_a_batch_without_a_carry_keeps_nothing_back() -> None:
    job = JobHistory()
    batch = fold([job.queued(0)])
    batch.settle(now=1.0, window_s=1.0, max_jobs=100)
    assert [r.job_id for r in batch.finish()] == [job.job_id] and batch.acks == {STREAM: [b"1000-0"]}


def test_fields_as_redis_sends_them_fold_as_the_same_fields_as_a_dict() -> None:
    """The raw [k, v, ...] reply, in the scripts' order (the fast path) or any other, folds as a dict does."""
    jobs = [JobHistory(payload={"n": i}) for i in range(3)]
    events = [e for job in jobs for e in job.lifecycle(start=1.0, result=None)]
    as_dicts = entries(events)
    as_lists: list[tuple[bytes, list[bytes]]] = []
    for i, (entry_id, fields) in enumerate(as_dicts):
        ordered = [b"j", fields[b"j"], b"e", fields[b"e"]]
        as_lists.append((entry_id, ordered if i % 2 else [b"e", fields[b"e"], b"x", b"1", b"j", fields[b"j"]]))
    by_dict, by_list = Batch(), Batch()
    by_dict.add("default", STREAM, as_dicts)
    by_list.add("default", STREAM, as_lists)
    rows_d = {r.job_id: {k: getattr(r, k) for k in r.__slots__} for r in by_dict.finish()}
    rows_l = {r.job_id: {k: getattr(r, k) for k in r.__slots__} for r in by_list.finish()}
    assert rows_l == rows_d and len(rows_l) == 3
    assert sorted(by_list.events) == sorted(by_dict.events)
    assert by_list.acks == by_dict.acks and by_list.queues == {STREAM: "default"}
