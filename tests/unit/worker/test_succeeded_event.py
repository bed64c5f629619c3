"""The hand-encoded SUCCEEDED event is the JobEvent protobuf would make."""

from __future__ import annotations

import pytest

from conveyor.v1 import event_pb2, job_pb2
from conveyor.worker.execute import Attempt, succeeded_event


@pytest.mark.parametrize("attempt_no", [1, 2, 127, 128, 100_000])
@pytest.mark.parametrize("result", [b"null", b'{"sent":true}', b'"' + b"x" * 500 + b'"'])
def test_succeeded_event_matches_protobuf(attempt_no: int, result: bytes) -> None:
    job = job_pb2.Job(type="emails.send", priority=7, rate_key="tenant-1", payload_json=b'{"to":"a@b"}')
    job_bytes = job.SerializeToString()
    now_ns = 1_795_619_270_889_123_456
    got = succeeded_event(Attempt(job=job, job_bytes=job_bytes, attempt=attempt_no), "worker-ü-1", result, now_ns)
    want = event_pb2.JobEvent(
        type=event_pb2.EVENT_TYPE_SUCCEEDED, attempt=attempt_no, worker="worker-ü-1", result_json=result, job=job
    )
    want.time.FromNanoseconds(now_ns)
    assert event_pb2.JobEvent.FromString(got) == want
    assert got == want.SerializeToString()
