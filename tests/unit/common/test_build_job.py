"""build_job: the hand-encoded common case and the protobuf path make the same messages."""

from __future__ import annotations

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.common.codec import length_delimited, restore_job
from conveyor.common.defaults import DEFAULT_RETRY
from conveyor.common.enqueue import build_job
from conveyor.common.ids import ulid_time_ms
from conveyor.common.validate import validate_all
from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import producer_service_pb2 as p

NOW_NS = 1_795_619_270_889_123_456


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _expected(
    req: p.EnqueueRequest, priority: int, retry: job_pb2.RetryPolicy | None, trace: tuple[str, str] = ("", "")
) -> tuple[job_pb2.Job, event_pb2.JobEvent]:
    job = job_pb2.Job(
        traceparent=trace[0],
        tracestate=trace[1],
        type=req.type,
        priority=priority,
        retry=retry,
        labels=req.labels,
        idempotency_key=req.idempotency_key,
        rate_key=req.rate_key,
        payload_json=req.payload_json or b"{}",
    )
    if req.HasField("timeout"):
        job.timeout.CopyFrom(req.timeout)
    event = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_QUEUED)
    event.time.FromNanoseconds(NOW_NS)
    event.job.type = req.type
    event.job.priority = priority
    return job, event


@pytest.mark.parametrize(
    "req",
    [
        p.EnqueueRequest(queue="q", type="demo.noop", payload_json=b'{"a":1}'),
        p.EnqueueRequest(queue="q", type="emails.send", idempotency_key="order-42", rate_key="tenant-7"),
        p.EnqueueRequest(queue="q", type="t", rate_key="k" * 128, payload_json=b'{"x":"' + b"y" * 300 + b'"}'),
        # Not the common case: the protobuf path.
        p.EnqueueRequest(queue="q", type="t", labels={"team": "a"}, timeout=Duration(seconds=30)),
        p.EnqueueRequest(queue="q", type="t", retry=job_pb2.RetryPolicy(max_attempts=7), rate_key="r"),
    ],
)
@pytest.mark.parametrize("priority", [1, 5, 9])
# Tracing off (nothing written), and on: the W3C context of the job's send span (ADR 0018).
@pytest.mark.parametrize(
    "trace", [("", ""), (TRACEPARENT, ""), (TRACEPARENT, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")]
)
def test_both_paths_encode_the_same_job_and_event(req: p.EnqueueRequest, priority: int, trace: tuple[str, str]) -> None:
    (valid,) = validate_all([req], 1 << 20, False)
    stored, queued = build_job(valid, priority, NOW_NS, *trace)
    # ADR 0010: neither created_at nor the default policy is stored; a policy of the job's own is.
    job, event = _expected(req, priority, valid.retry if req.HasField("retry") else None, trace)
    assert job_pb2.Job.FromString(stored) == job
    assert event_pb2.JobEvent.FromString(queued) == event
    # Byte for byte what protobuf writes, the payload appended last (fields in number order otherwise).
    payload = job.payload_json
    job.ClearField("payload_json")
    assert stored == job.SerializeToString() + length_delimited(b"\x2a", payload)
    assert queued == event.SerializeToString()


@pytest.mark.parametrize(
    "req",
    [
        p.EnqueueRequest(queue="q", type="t"),
        p.EnqueueRequest(queue="q", type="t", labels={"team": "a"}),  # the protobuf path
        # Names the default itself: stored as no policy, read back as the same one.
        p.EnqueueRequest(queue="q", type="t", retry=job_pb2.RetryPolicy(max_attempts=3, jitter=0.1)),
    ],
)
def test_a_job_with_the_default_policy_is_stored_without_it_and_read_back_with_it(req: p.EnqueueRequest) -> None:
    (valid,) = validate_all([req], 1000, False)
    stored, _ = build_job(valid, 5, NOW_NS)
    assert not job_pb2.Job.FromString(stored).HasField("retry")
    restored = restore_job(job_pb2.Job.FromString(stored), "q/01JAAAAAAAAAAAAAAAAAAAAAAA", "q")
    assert restored.retry == DEFAULT_RETRY
    assert restored.retry.max_attempts == 3 and restored.retry.jitter == 0.1


@pytest.mark.parametrize(
    "policy",
    [
        job_pb2.RetryPolicy(max_attempts=7),
        job_pb2.RetryPolicy(max_attempts=3),  # no jitter: not the default (which has 0.1)
        job_pb2.RetryPolicy(max_attempts=1, backoff=job_pb2.BACKOFF_FIXED, jitter=0.5),
    ],
)
def test_a_policy_of_the_jobs_own_is_stored_and_read_back_as_given(policy: job_pb2.RetryPolicy) -> None:
    req = p.EnqueueRequest(queue="q", type="t", retry=policy)
    (valid,) = validate_all([req], 1000, False)
    stored, _ = build_job(valid, 5, NOW_NS)
    job = job_pb2.Job.FromString(stored)
    assert job.HasField("retry") and job.retry == valid.retry != DEFAULT_RETRY
    assert restore_job(job, "q/01JAAAAAAAAAAAAAAAAAAAAAAA", "q").retry == valid.retry


def test_a_request_without_a_policy_shares_the_default_and_cannot_change_it() -> None:
    (a,) = validate_all([p.EnqueueRequest(queue="q", type="t")], 1000, False)
    (b,) = validate_all([p.EnqueueRequest(queue="q", type="t")], 1000, False)
    assert a.retry is b.retry is DEFAULT_RETRY
    assert DEFAULT_RETRY.max_attempts == 3 and DEFAULT_RETRY.base.ToMilliseconds() == 1000


@pytest.mark.parametrize(
    "req",
    [
        p.EnqueueRequest(queue="q", type="t"),
        p.EnqueueRequest(queue="q", type="t", labels={"team": "a"}, retry=job_pb2.RetryPolicy(max_attempts=7)),
    ],
)
def test_created_at_is_not_stored_and_reads_back_as_the_ulids_millisecond(req: p.EnqueueRequest) -> None:
    (valid,) = validate_all([req], 1000, False)
    stored, queued = build_job(valid, 5, NOW_NS)
    assert not job_pb2.Job.FromString(stored).HasField("created_at")
    ulid = "01JC9ZQ0Q9AAAAAAAAAAAAAAAA"
    restored = restore_job(job_pb2.Job.FromString(stored), f"q/{ulid}", "q")
    assert restored.created_at.ToMilliseconds() == ulid_time_ms(ulid)
    assert restored.created_at.nanos % 1_000_000 == 0
    # The QUEUED event keeps the producer's full-precision time.
    assert event_pb2.JobEvent.FromString(queued).time.ToNanoseconds() == NOW_NS


def test_a_job_stored_with_created_at_before_adr_0010_keeps_it() -> None:
    old = job_pb2.Job(type="t", retry=DEFAULT_RETRY, payload_json=b"{}")
    old.created_at.FromNanoseconds(NOW_NS)
    restored = restore_job(job_pb2.Job.FromString(old.SerializeToString()), "q/01JC9ZQ0Q9AAAAAAAAAAAAAAAA", "q")
    assert restored.created_at.ToNanoseconds() == NOW_NS and restored.retry == DEFAULT_RETRY


def test_tracing_off_adds_no_byte_to_the_stored_job() -> None:
    (valid,) = validate_all([p.EnqueueRequest(queue="q", type="t", payload_json=b'{"a":1}')], 1000, False)
    stored, _ = build_job(valid, 5, NOW_NS)
    traced, _ = build_job(valid, 5, NOW_NS, TRACEPARENT)
    assert b"traceparent" not in stored and TRACEPARENT.encode() not in stored
    assert len(traced) == len(stored) + 2 + 1 + len(TRACEPARENT)  # tag (2 bytes), length, value
    assert job_pb2.Job.FromString(traced).traceparent == TRACEPARENT
