"""What the worker's per-job bookkeeping was cut down to (ADR 0029) must still hold: the logging
context of every attempt, a crashed attempt letting go of its claim, and the job metrics."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import producer_service_pb2 as p
from conveyor.worker import runner as runner_module
from tests.integration.conftest import Producer, StartWorker
from tests.integration.test_producer_worker import enqueue, watch_all
from tests.support.wait import wait_for


@pytest.mark.parametrize("job_type", ["test.log_context", "test.log_context_sync"])
async def test_handler_logs_carry_the_job_queue_attempt_and_worker(
    producer: Producer, start_worker: StartWorker, job_type: str
) -> None:
    # queue and worker are bound once per loop, the rest per attempt: each job sees its own.
    await start_worker(queues=("default", "other"))
    jobs = [await enqueue(producer, job_type, queue=q) for q in ("default", "other", "default")]
    for job in jobs:
        events = await watch_all(producer, job.job_id)
        assert events[-1].type == event_pb2.EVENT_TYPE_SUCCEEDED
        bound = dict(events[-1].result.struct_value)
        assert bound == {
            "job_id": job.job_id,
            "queue": job.job_id.split("/")[0],
            "type": job_type,
            "attempt": 1,
            "worker": "test-worker-1",
        }


async def test_an_attempt_that_crashes_lets_go_of_its_claim_and_slot(
    producer: Producer, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = runner_module.run_attempt

    async def crash_on_fail(attempt, *args, **kwargs):  # type: ignore[no-untyped-def]
        if attempt.job.type == "demo.fail":
            raise RuntimeError("a bug in the worker")
        return await real(attempt, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_attempt", crash_on_fail)
    worker = await start_worker(concurrency=2)
    crashed = await enqueue(producer, "demo.fail")
    queue = worker.runner.queues[0]

    async def let_go() -> bool:
        return bool(queue.claims) and not queue.active and worker.runner.slots.busy == 0

    await wait_for(let_go, "the crashed attempt's claim and slot given back")
    # Its slot is free for the next job, and the crashed one is still ACTIVE (reclaimed later).
    ok = await enqueue(producer, "test.count")
    assert (await watch_all(producer, ok.job_id))[-1].type == event_pb2.EVENT_TYPE_SUCCEEDED
    state = (await producer.stub.GetJob(p.GetJobRequest(job_id=crashed.job_id))).job.state
    assert state == job_pb2.JOB_STATE_ACTIVE


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_job_metrics_are_counted_by_the_time_the_outcome_is_recorded(
    producer: Producer, start_worker: StartWorker
) -> None:
    labels = {"queue": "metered", "type": "test.count"}
    started = _sample("conveyor_jobs_total", {**labels, "event": "started"})
    succeeded = _sample("conveyor_jobs_total", {**labels, "event": "succeeded"})
    durations = _sample("conveyor_job_duration_seconds_count", {**labels, "outcome": "succeeded"})
    waits = _sample("conveyor_job_wait_seconds_count", {"queue": "metered"})
    await start_worker(queues=("metered",))
    jobs = [await enqueue(producer, "test.count", queue="metered") for _ in range(5)]
    for job in jobs:
        assert (await watch_all(producer, job.job_id))[-1].type == event_pb2.EVENT_TYPE_SUCCEEDED
    # The watch saw the outcome recorded: the in-process figures were flushed before that.
    assert _sample("conveyor_jobs_total", {**labels, "event": "started"}) == started + 5
    assert _sample("conveyor_jobs_total", {**labels, "event": "succeeded"}) == succeeded + 5
    assert _sample("conveyor_job_duration_seconds_count", {**labels, "outcome": "succeeded"}) == durations + 5
    assert _sample("conveyor_job_wait_seconds_count", {"queue": "metered"}) == waits + 5
