"""build_job: the hand-encoded common case and the protobuf path make the same messages."""

from __future__ import annotations

import pytest
from google.protobuf.duration_pb2 import Duration

from conveyor.producer.enqueue import build_job
from conveyor.producer.validate import DEFAULT_RETRY, validate_all
from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import producer_service_pb2 as p

NOW_NS = 1_795_619_270_889_123_456


def _expected(
    req: p.EnqueueRequest, priority: int, retry: job_pb2.RetryPolicy
) -> tuple[job_pb2.Job, event_pb2.JobEvent]:
    job = job_pb2.Job(
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
    job.created_at.FromNanoseconds(NOW_NS)
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
def test_both_paths_encode_the_same_job_and_event(req: p.EnqueueRequest, priority: int) -> None:
    (valid,) = validate_all([req], 1 << 20, False)
    stored, queued = build_job(valid, priority, NOW_NS)
    retry = DEFAULT_RETRY if not req.HasField("retry") else valid.retry
    job, event = _expected(req, priority, retry)
    assert job_pb2.Job.FromString(stored) == job
    assert event_pb2.JobEvent.FromString(queued) == event


def test_a_request_without_a_policy_shares_the_default_and_cannot_change_it() -> None:
    (a,) = validate_all([p.EnqueueRequest(queue="q", type="t")], 1000, False)
    (b,) = validate_all([p.EnqueueRequest(queue="q", type="t")], 1000, False)
    assert a.retry is b.retry is DEFAULT_RETRY
    assert DEFAULT_RETRY.max_attempts == 3 and DEFAULT_RETRY.base.ToMilliseconds() == 1000
