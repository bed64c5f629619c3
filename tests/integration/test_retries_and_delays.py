"""Retries with backoff and delayed jobs, through real Redis and gRPC (issue #3)."""

from __future__ import annotations

import asyncio

from google.protobuf import duration_pb2, timestamp_pb2

from conveyor.common.defaults import DEFAULT_RETRY
from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.integration.test_producer_worker import enqueue, watch_all
from tests.support import handlers as test_handlers
from tests.support.wait import wait_for

E = event_pb2
FAST = job_pb2.RetryPolicy(
    max_attempts=3,
    backoff=job_pb2.BACKOFF_EXPONENTIAL,
    base=duration_pb2.Duration(nanos=50_000_000),
    cap=duration_pb2.Duration(nanos=200_000_000),
)


async def test_a_failed_attempt_is_retried_after_its_backoff(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    job = await enqueue(producer, "test.flaky", payload={"succeed_on": 3}, retry=FAST)
    events = await watch_all(producer, job.job_id)
    assert [(e.type, e.attempt) for e in events] == [
        (E.EVENT_TYPE_QUEUED, 0),
        (E.EVENT_TYPE_ACTIVE, 1),
        (E.EVENT_TYPE_RETRY_SCHEDULED, 1),
        (E.EVENT_TYPE_QUEUED, 0),
        (E.EVENT_TYPE_ACTIVE, 2),
        (E.EVENT_TYPE_RETRY_SCHEDULED, 2),
        (E.EVENT_TYPE_QUEUED, 0),
        (E.EVENT_TYPE_ACTIVE, 3),
        (E.EVENT_TYPE_SUCCEEDED, 3),
    ]
    retry = events[2]
    assert retry.error.kind == "ConnectionError" and "attempt 1" in retry.error.message
    # Each attempt starts no sooner than the time its retry event announced.
    for scheduled, started in [(events[2], events[4]), (events[5], events[7])]:
        assert started.time.ToMilliseconds() >= scheduled.next_run_at.ToMilliseconds()
    assert events[-1].result.number_value == 3
    assert test_handlers.runs[job.job_id] == 3


async def test_the_last_allowed_failure_is_final(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    job = await enqueue(producer, "demo.fail", payload={"message": "always"}, retry=FAST)
    events = await watch_all(producer, job.job_id)
    assert [e.type for e in events].count(E.EVENT_TYPE_RETRY_SCHEDULED) == 2
    assert events[-1].type == E.EVENT_TYPE_FAILED and events[-1].attempt == 3
    got = (await producer.stub.GetJob(p.GetJobRequest(job_id=job.job_id))).job
    assert got.state == job_pb2.JOB_STATE_FAILED and got.attempt == 3 and got.error.message == "always"


async def test_a_job_enqueued_without_a_policy_follows_the_default_one(
    producer: Producer, start_worker: StartWorker
) -> None:
    # Redis stores no policy for it (ADR 0010): the worker must still apply 3 attempts, 1 s then 2 s.
    await start_worker()
    job = await enqueue(producer, "demo.fail", payload={"message": "always"})
    events = await watch_all(producer, job.job_id)
    retries = [e for e in events if e.type == E.EVENT_TYPE_RETRY_SCHEDULED]
    waits_ms = [r.next_run_at.ToMilliseconds() - r.time.ToMilliseconds() for r in retries]
    assert len(waits_ms) == DEFAULT_RETRY.max_attempts - 1 == 2
    assert 1000 <= waits_ms[0] <= 1101 and 2000 <= waits_ms[1] <= 2201  # base 1 s doubling, jitter 0.1
    assert events[-1].type == E.EVENT_TYPE_FAILED and events[-1].attempt == 3


async def test_a_permanent_error_is_not_retried(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    job = await enqueue(producer, "demo.fail", payload={"permanent": True}, retry=FAST)
    events = await watch_all(producer, job.job_id)
    assert [e.type for e in events] == [E.EVENT_TYPE_QUEUED, E.EVENT_TYPE_ACTIVE, E.EVENT_TYPE_FAILED]
    assert not events[-1].error.retryable


async def test_a_delayed_job_waits_then_an_idle_worker_wakes_for_it(
    producer: Producer, start_worker: StartWorker
) -> None:
    # A long poll interval: only the wake-up signal and the due time can start the job early.
    await start_worker(poll_interval_s=60.0)
    await asyncio.sleep(0)  # let the worker block first
    job = await enqueue(producer, "test.count", delay=duration_pb2.Duration(nanos=300_000_000))
    assert job.state == job_pb2.JOB_STATE_DELAYED
    parked = (await producer.stub.GetJob(p.GetJobRequest(job_id=job.job_id))).job
    assert parked.state == job_pb2.JOB_STATE_DELAYED and parked.run_at.ToMilliseconds() > 0
    events = await asyncio.wait_for(watch_all(producer, job.job_id), 10)
    assert [e.type for e in events] == [
        E.EVENT_TYPE_DELAYED,
        E.EVENT_TYPE_QUEUED,
        E.EVENT_TYPE_ACTIVE,
        E.EVENT_TYPE_SUCCEEDED,
    ]
    assert events[2].time.ToMilliseconds() >= events[0].next_run_at.ToMilliseconds()


async def test_run_at_in_the_past_runs_now(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    past = timestamp_pb2.Timestamp(seconds=1)
    job = await enqueue(producer, "test.count", run_at=past)
    assert job.state == job_pb2.JOB_STATE_QUEUED
    await wait_for(lambda: _ran(job.job_id), "the job to run")


async def _ran(job_id: str) -> bool:
    return test_handlers.runs[job_id] >= 1


async def test_due_jobs_are_promoted_once_whatever_the_number_of_workers(
    producer: Producer, start_worker: StartWorker
) -> None:
    for _ in range(3):
        await start_worker(concurrency=20)
    reqs = [p.EnqueueRequest(queue="default", type="test.count", delay=duration_pb2.Duration(nanos=200_000_000))] * 300
    ids = {r.job_id for r in (await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=reqs))).results}

    async def all_ran() -> bool:
        return ids <= set(test_handlers.runs)

    await wait_for(all_ran, "every delayed job to run", within=20)
    assert sum(test_handlers.runs[j] for j in ids) == 300
