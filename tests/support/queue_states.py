"""Put one queue's jobs in every live state (for the statistics tests), with the counts to expect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf import duration_pb2

from conveyor.v1 import admin_service_pb2, job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.support.wait import wait_for

if TYPE_CHECKING:
    from conveyor.v1.admin_service_pb2_grpc import AdminServiceAsyncStub
    from conveyor.v1.producer_service_pb2_grpc import ProducerServiceAsyncStub

HOUR = duration_pb2.Duration(seconds=3600)
#: Retried after an hour: the job stays RETRY_SCHEDULED for the whole test.
SLOW_RETRY = job_pb2.RetryPolicy(max_attempts=5, backoff=job_pb2.BACKOFF_FIXED, base=HOUR, cap=HOUR)


@dataclass
class Setup:
    succeeded: list[str]
    failed: list[str]
    retry_scheduled: list[str]
    active: list[str]
    #: priority -> job ids waiting in that band
    queued: dict[int, list[str]]
    delayed: list[str]


async def _wait_state(stub: ProducerServiceAsyncStub, job_ids: list[str], state: int) -> None:
    async def reached() -> bool:
        for job_id in job_ids:
            if (await stub.GetJob(p.GetJobRequest(job_id=job_id))).job.state != state:
                return False
        return True

    await wait_for(reached, f"{len(job_ids)} job(s) in state {job_pb2.JobState.Name(state)}", within=20)


async def fill_every_state(stub: ProducerServiceAsyncStub, admin: AdminServiceAsyncStub, queue: str) -> Setup:
    """Needs one worker on ``queue`` with concurrency 3 running the test handlers, and the gate closed.

    Leaves: 4 succeeded, 1 failed (a dead letter), 1 retry-scheduled, 3 active (gated, filling the
    worker), queued 1 at priority 9, 3 at 5 and 2 at 1 (the worker has no free slot), 2 delayed,
    and the queue paused.
    """

    async def enqueue(type_: str, **kw: object) -> str:
        req = p.EnqueueRequest(queue=queue, type=type_, **kw)  # type: ignore[arg-type]
        return (await stub.Enqueue(req)).job_id

    succeeded = [await enqueue("test.count") for _ in range(4)]
    await _wait_state(stub, succeeded, job_pb2.JOB_STATE_SUCCEEDED)
    failed = [await enqueue("demo.fail", payload={"message": "no", "permanent": True})]
    await _wait_state(stub, failed, job_pb2.JOB_STATE_FAILED)
    retrying = [await enqueue("test.flaky", payload={"succeed_on": 99}, retry=SLOW_RETRY)]
    await _wait_state(stub, retrying, job_pb2.JOB_STATE_RETRY_SCHEDULED)
    active = [await enqueue("test.gate") for _ in range(3)]
    await _wait_state(stub, active, job_pb2.JOB_STATE_ACTIVE)
    queued = {
        band: [await enqueue("test.count", priority=band) for _ in range(n)] for band, n in ((9, 1), (5, 3), (1, 2))
    }
    delayed = [await enqueue("test.count", delay=HOUR) for _ in range(2)]
    await admin.PauseQueue(admin_service_pb2.PauseQueueRequest(queue=queue))
    return Setup(succeeded, failed, retrying, active, queued, delayed)


def assert_live_counts(stats: admin_service_pb2.QueueStats, queue: str, workers: int = 1) -> None:
    """The counts ``fill_every_state`` leaves."""
    assert stats.queue == queue
    assert stats.paused
    assert (stats.queued, stats.delayed, stats.retry_scheduled, stats.active, stats.dead_lettered) == (6, 2, 1, 3, 1)
    assert [(b.priority, b.queued, b.active) for b in stats.bands] == [(9, 1, 0), (5, 3, 3), (1, 2, 0)]
    assert stats.workers == workers
    assert stats.orphaned == 0  # the active jobs' worker is alive
    assert stats.HasField("oldest_queued_time") and stats.HasField("next_due_time")
    # The earliest due job is due in about an hour (the retry or the delayed ones).
    read_ms = stats.read_time.ToMilliseconds()
    assert 3_500_000 < stats.next_due_time.ToMilliseconds() - read_ms <= 3_600_000
    assert 0 <= read_ms - stats.oldest_queued_time.ToMilliseconds() < 60_000
