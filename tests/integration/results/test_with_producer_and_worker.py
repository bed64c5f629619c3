"""The real producer and worker write the events; the results service projects and serves them."""

from __future__ import annotations

from google.protobuf import struct_pb2

from conveyor.results.store import Store
from conveyor.v1 import event_pb2, job_pb2, results_service_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.integration.results.conftest import Events, ResultsClient, StartProjector
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
