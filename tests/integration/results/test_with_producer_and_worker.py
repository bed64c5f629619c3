"""The real producer and worker write the events; the results service projects and serves them."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from conveyor.common.codec import FINAL_STATES
from conveyor.common.defaults import DEFAULT_RETRY
from conveyor.common.ids import ulid_time_ms
from conveyor.results.store import Store
from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import event_pb2, job_pb2, results_service_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.integration.results.conftest import Events, ResultsClient, StartProjector
from tests.integration.test_producer_worker import watch_all
from tests.support.wait import wait_for


async def test_jobs_run_by_a_worker_are_served_with_their_outcome_and_history(
    producer: Producer,
    start_worker: StartWorker,
    store: Store,
    events: Events,
    start_projector: StartProjector,
    results: ResultsClient,
) -> None:
    payload = struct_pb2.Struct()
    payload.update({"seconds": 0.05, "steps": 2})
    ok = await producer.stub.Enqueue(
        p.EnqueueRequest(queue="default", type="demo.sleep", payload=payload, labels={"team": "a"})
    )
    failing = struct_pb2.Struct()
    failing.update({"message": "no", "permanent": True})
    bad = await producer.stub.Enqueue(p.EnqueueRequest(queue="default", type="demo.fail", payload=failing))
    await start_worker()
    await start_projector(store)

    async def both_final() -> bool:
        for job_id in (ok.job_id, bad.job_id):
            try:
                got = await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job_id))
            except Exception:
                return False
            if got.job.state not in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED):
                return False
        return True

    await wait_for(both_final, "both jobs projected with their outcome", within=20)

    done = (await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=ok.job_id))).job
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert done.id == ok.job_id and done.queue == "default" and done.type == "demo.sleep"
    assert done.payload["steps"] == 2
    assert done.result.struct_value["slept"] == 0.05
    assert dict(done.labels) == {"team": "a"}
    assert done.attempt == 1 and done.worker == "test-worker-1"
    assert done.progress.percent == 100
    assert done.created_at.seconds > 0 and done.finished_at.ToNanoseconds() >= done.started_at.ToNanoseconds()

    failed = (await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=bad.job_id))).job
    assert failed.state == job_pb2.JOB_STATE_FAILED
    assert failed.error.message == "no" and not failed.error.retryable

    history = await results.stub.ListJobEvents(results_service_pb2.ListJobEventsRequest(job_id=ok.job_id))
    assert [e.type for e in history.events] == [
        event_pb2.EVENT_TYPE_QUEUED,
        event_pb2.EVENT_TYPE_ACTIVE,
        event_pb2.EVENT_TYPE_PROGRESS,
        event_pb2.EVENT_TYPE_PROGRESS,
        event_pb2.EVENT_TYPE_SUCCEEDED,
    ]
    assert all(e.job_id == ok.job_id for e in history.events)
    assert history.events[-1].job.id == ok.job_id and history.events[-1].job.payload["steps"] == 2

    listed = await results.stub.ListJobs(results_service_pb2.ListJobsRequest(queue="default"))
    assert [j.id for j in listed.jobs] == [bad.job_id, ok.job_id]  # newest first
    await events.wait_caught_up()


def _own_policy() -> job_pb2.RetryPolicy:
    own = job_pb2.RetryPolicy(max_attempts=5, backoff=job_pb2.BACKOFF_FIXED, jitter=0.25)
    own.base.FromSeconds(2)
    own.cap.FromSeconds(2)
    return own


def _assert_as_enqueued(job: job_pb2.Job, policy: job_pb2.RetryPolicy, where: str) -> None:
    """What ADR 0010 leaves out of Redis, as a client sees it: the policy, and created_at from the ULID."""
    assert job.retry == policy, where
    created_ms = ulid_time_ms(job.id.rpartition("/")[2])
    assert job.created_at.ToNanoseconds() == created_ms * 1_000_000, where


async def test_every_reader_shows_the_retry_policy_and_created_at_a_job_was_enqueued_with(
    producer: Producer,
    start_worker: StartWorker,
    store: Store,
    events: Events,
    start_projector: StartProjector,
    results: ResultsClient,
) -> None:
    def request(type: str, **kw: Any) -> p.EnqueueRequest:
        return p.EnqueueRequest(queue="default", type=type, **kw)

    failing = struct_pb2.Struct()
    failing.update({"message": "no", "permanent": True})
    cases = [
        (request("test.count"), DEFAULT_RETRY),  # the hand-encoded path
        (request("test.count", labels={"team": "a"}), DEFAULT_RETRY),  # the protobuf path
        (request("test.count", retry=_own_policy()), _own_policy()),
        (request("test.count", delay=duration_pb2.Duration(nanos=200_000_000)), DEFAULT_RETRY),  # parked
        (request("demo.fail", payload=failing), DEFAULT_RETRY),  # ends as a dead letter
    ]
    expected: dict[str, job_pb2.RetryPolicy] = {}
    for req, policy in cases:
        expected[(await producer.stub.Enqueue(req)).job_id] = policy
    dead_id = list(expected)[-1]

    for job_id, policy in expected.items():  # waiting: read from Redis
        live = (await producer.stub.GetJob(p.GetJobRequest(job_id=job_id))).job
        assert live.state in (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_DELAYED)
        _assert_as_enqueued(live, policy, "GetJob of a waiting job")

    watches = {job_id: asyncio.create_task(watch_all(producer, job_id)) for job_id in expected}
    await start_worker()
    await start_projector(store)
    for job_id, policy in expected.items():
        seen = await watches[job_id]
        assert seen[-1].type in (event_pb2.EVENT_TYPE_SUCCEEDED, event_pb2.EVENT_TYPE_FAILED)
        _assert_as_enqueued(seen[-1].job, policy, "Watch's final event")
        # The first event keeps the producer's full-precision time, no earlier than created_at.
        assert seen[0].time.ToNanoseconds() >= seen[-1].job.created_at.ToNanoseconds()
        done = (await producer.stub.GetJob(p.GetJobRequest(job_id=job_id))).job
        _assert_as_enqueued(done, policy, "GetJob of a finished job still in Redis")

    (letter,) = (await producer.admin.ListDeadLetters(a.ListDeadLettersRequest(queue="default"))).dead_letters
    assert letter.job.id == dead_id
    _assert_as_enqueued(letter.job, DEFAULT_RETRY, "ListDeadLetters")

    async def all_projected() -> bool:
        listed = await results.stub.ListJobs(results_service_pb2.ListJobsRequest(queue="default"))
        return len(listed.jobs) == len(expected) and all(j.state in FINAL_STATES for j in listed.jobs)

    await wait_for(all_projected, "every job projected with its outcome", within=20)
    listed = await results.stub.ListJobs(results_service_pb2.ListJobsRequest(queue="default"))
    for job in listed.jobs:
        _assert_as_enqueued(job, expected[job.id], "ListJobs")
    for job_id, policy in expected.items():
        got = (await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job_id))).job
        _assert_as_enqueued(got, policy, "ResultsService.GetJob")
        history = await results.stub.ListJobEvents(results_service_pb2.ListJobEventsRequest(job_id=job_id))
        _assert_as_enqueued(history.events[-1].job, policy, "ListJobEvents' final event")
    await events.wait_caught_up()
