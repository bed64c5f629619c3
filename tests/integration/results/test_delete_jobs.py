"""ResultsService.DeleteJobs through a real channel: finished jobs go with all their events, others are refused."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from psycopg_pool import AsyncConnectionPool

from conveyor.common.ids import new_ulid
from conveyor.results.store import Store
from conveyor.v1 import job_pb2, results_service_pb2
from tests.integration.results.conftest import Events, ResultsClient, StartProjector, stored_events
from tests.integration.results.test_service import bad_request_fields, project
from tests.unit.results.builders import JobHistory


async def test_deletes_finished_jobs_with_their_events_and_refuses_the_rest(
    store: Store,
    pool: AsyncConnectionPool[Any],
    events: Events,
    start_projector: StartProjector,
    results: ResultsClient,
) -> None:
    done = [JobHistory(created=float(i)) for i in range(3)]
    running = JobHistory(created=10.0)
    kept = JobHistory(created=11.0)
    await project(
        store,
        events,
        start_projector,
        *[j.lifecycle() for j in done],
        running.lifecycle()[:2],  # QUEUED, ACTIVE
        kept.lifecycle(),
    )
    unknown = f"default/{new_ulid()}"
    ids = [j.job_id for j in done] + [running.job_id, unknown, done[0].job_id]

    reply = await results.stub.DeleteJobs(results_service_pb2.DeleteJobsRequest(job_ids=ids))

    assert sorted(reply.deleted) == sorted(j.job_id for j in done)
    refused = {r.job_id: (r.state, r.reason) for r in reply.refused}
    assert refused[running.job_id][0] == job_pb2.JOB_STATE_ACTIVE
    assert "not finished (ACTIVE)" in refused[running.job_id][1]
    assert refused[unknown] == (job_pb2.JOB_STATE_UNSPECIFIED, "not found")
    assert len(reply.refused) == 2
    # Gone whole: no row, no event. The others are untouched.
    for job in done:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job.job_id))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert await stored_events(pool, job.job_id) == []
    assert len(await stored_events(pool, running.job_id)) == 2
    assert len(await stored_events(pool, kept.job_id)) == len(kept.lifecycle())
    got = await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=running.job_id))
    assert got.job.state == job_pb2.JOB_STATE_ACTIVE

    # Again: nothing left to delete, each reported.
    again = await results.stub.DeleteJobs(results_service_pb2.DeleteJobsRequest(job_ids=[done[1].job_id]))
    assert list(again.deleted) == [] and [r.reason for r in again.refused] == ["not found"]


async def test_bad_ids_are_invalid_argument_and_delete_nothing(
    store: Store, events: Events, start_projector: StartProjector, results: ResultsClient
) -> None:
    job = JobHistory()
    await project(store, events, start_projector, job.lifecycle())
    cases = [
        ([], "is required"),
        ([job.job_id, "not-a-job-id"], "not one: 'not-a-job-id'"),
        ([f"default/{new_ulid()}" for _ in range(1001)], "at most 1000"),
    ]
    for ids, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.DeleteJobs(results_service_pb2.DeleteJobsRequest(job_ids=ids))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in bad_request_fields(err.value)["job_ids"]
    got = await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job.job_id))
    assert got.job.state == job_pb2.JOB_STATE_SUCCEEDED
