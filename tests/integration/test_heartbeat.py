"""A long job keeps its claim while its worker lives, even when the handler hogs the event loop."""

from __future__ import annotations

from conveyor.v1 import event_pb2, job_pb2
from tests.integration.conftest import Producer, StartWorker
from tests.integration.test_producer_worker import enqueue, watch_all

E = event_pb2


async def test_a_cpu_bound_job_longer_than_the_visibility_timeout_is_not_stolen(
    producer: Producer, start_worker: StartWorker
) -> None:
    await start_worker(visibility_timeouts=(("default", 1.0),), worker_id="owner")
    job = await enqueue(producer, "test.spin", payload={"seconds": 3}, retry=job_pb2.RetryPolicy(max_attempts=1))
    # A second worker is ready to take over anything idle for more than a second.
    await start_worker(visibility_timeout_s=1.0, worker_id="thief")
    events = await watch_all(producer, job.job_id)
    assert [(e.type, e.worker) for e in events if e.type == E.EVENT_TYPE_ACTIVE] == [(E.EVENT_TYPE_ACTIVE, "owner")]
    assert events[-1].type == E.EVENT_TYPE_SUCCEEDED and events[-1].attempt == 1
