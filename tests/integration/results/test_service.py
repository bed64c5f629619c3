"""ResultsService through a real gRPC channel, over jobs projected from real Redis streams."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.results.store import Store
from conveyor.v1 import event_pb2, job_pb2, results_service_pb2
from tests.integration.results.conftest import Events, ResultsClient, StartProjector
from tests.unit.results.builders import BASE_S, JobHistory, ts


async def project(
    store: Store, events: Events, start_projector: StartProjector, *jobs: list[event_pb2.JobEvent]
) -> None:
    for history in jobs:
        await events.add_all(history)
    running = await start_projector(store)
    await events.wait_caught_up()
    await running.stop()


def bad_request_fields(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]  # an AioRpcError is the call
    assert status is not None
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


async def test_get_job_returns_the_projected_job(
    store: Store, events: Events, start_projector: StartProjector, results: ResultsClient
) -> None:
    job = JobHistory(payload={"n": 3, "nested": {"a": [1, "b"]}}, labels={"team": "a"}, created=5.0)
    await project(store, events, start_projector, job.lifecycle(start=5.0, result=[1, "two", None]))

    got = (await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job.job_id))).job
    assert got.id == job.job_id
    assert got.queue == "default" and got.type == "demo.echo"
    assert got.state == job_pb2.JOB_STATE_SUCCEEDED
    assert got.attempt == 1
    assert dict(got.payload) == {"n": 3.0, "nested": {"a": [1.0, "b"]}}
    assert not got.payload_json
    assert [v.WhichOneof("kind") for v in got.result.list_value.values] == [
        "number_value",
        "string_value",
        "null_value",
    ]
    assert got.progress.percent == 50.0 and got.progress.message == "half way"
    assert dict(got.labels) == {"team": "a"}
    assert got.retry.max_attempts == 3 and got.retry.backoff == job_pb2.BACKOFF_EXPONENTIAL
    assert got.timeout.seconds == 30
    assert got.idempotency_key == job.job.idempotency_key
    assert got.worker == "w1"
    assert got.created_at == ts(5.0)
    assert got.started_at == ts(6.0)
    assert got.finished_at == ts(8.0)
    assert got.updated_at == ts(8.0)


async def test_get_job_of_a_failed_job_carries_its_error(
    store: Store, events: Events, start_projector: StartProjector, results: ResultsClient
) -> None:
    job = JobHistory()
    history = [job.queued(0), job.active(1), job.retry(2, until=3), job.active(3, attempt=2), job.failed(4, attempt=2)]
    await project(store, events, start_projector, history)
    got = (await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job.job_id))).job
    assert got.state == job_pb2.JOB_STATE_FAILED
    assert got.attempt == 2
    assert (got.error.message, got.error.kind, got.error.retryable) == ("gave up", "ValueError", False)
    assert not got.HasField("result")
    assert got.run_at == ts(3)


async def test_get_job_unknown_is_not_found(results: ResultsClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await results.stub.GetJob(
            results_service_pb2.ResultsServiceGetJobRequest(job_id="default/01JDQ4ZG0000000000000000AA")
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in (err.value.details() or "")


@pytest.mark.parametrize("job_id", ["", "nope", "default/not-a-ulid", "bad queue!/01JDQ4ZG0000000000000000AA"])
async def test_get_job_malformed_id_is_invalid_argument_naming_job_id(results: ResultsClient, job_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job_id))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(bad_request_fields(err.value)) == ["job_id"]


async def _all_pages(results: ResultsClient, page_size: int, **filters: object) -> tuple[list[str], list[int]]:
    ids: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page = await results.stub.ListJobs(
            results_service_pb2.ListJobsRequest(page_size=page_size, page_token=token, **filters)  # type: ignore[arg-type]
        )
        ids += [j.id for j in page.jobs]
        sizes.append(len(page.jobs))
        token = page.next_page_token
        if not token:
            return ids, sizes


async def test_list_jobs_pages_newest_first_completely_without_overlap(
    store: Store, events: Events, start_projector: StartProjector, results: ResultsClient
) -> None:
    # Groups of three share a created_at, so the job id must break ties for the order to be total.
    jobs = [JobHistory(created=float(i // 3)) for i in range(25)]
    await project(store, events, start_projector, *[[j.queued()] for j in jobs])

    ids, sizes = await _all_pages(results, 7)
    expected = [
        j.job_id for j in sorted(jobs, key=lambda j: (j.job.created_at.ToMicroseconds(), j.job_id), reverse=True)
    ]
    assert ids == expected
    assert sizes == [7, 7, 7, 4]
    # Stable: asking again gives the same pages.
    assert await _all_pages(results, 7) == (ids, sizes)
    # A page size that divides the total still ends with an empty token, not an empty page.
    assert (await _all_pages(results, 5))[1] == [5, 5, 5, 5, 5]
    # Default page size 100.
    assert (await _all_pages(results, 0))[1] == [25]


async def test_list_jobs_filters_by_queue_state_type_and_time(
    store: Store, events: Events, start_projector: StartProjector, results: ResultsClient
) -> None:
    done = [JobHistory(type="a", created=float(i)) for i in range(3)]
    waiting = [JobHistory(type="b", created=10.0 + i) for i in range(2)]
    other = JobHistory(queue="other", type="a", created=20.0)
    await project(store, events, start_projector, *[j.lifecycle(start=j.job.created_at.seconds - BASE_S) for j in done])
    await project(store, events, start_projector, *[[j.queued()] for j in waiting])
    other_events = Events(events.client, "other")
    await project(store, other_events, start_projector, [other.queued()])

    async def ids(**filters: object) -> set[str]:
        page = await results.stub.ListJobs(results_service_pb2.ListJobsRequest(**filters))  # type: ignore[arg-type]
        return {j.id for j in page.jobs}

    assert await ids(queue="other") == {other.job_id}
    assert await ids(queue="default") == {j.job_id for j in done + waiting}
    assert await ids(state=job_pb2.JOB_STATE_SUCCEEDED) == {j.job_id for j in done}
    assert await ids(state=job_pb2.JOB_STATE_QUEUED) == {j.job_id for j in [*waiting, other]}
    assert await ids(type="a") == {j.job_id for j in [*done, other]}
    assert await ids(type="a", queue="default", state=job_pb2.JOB_STATE_SUCCEEDED) == {j.job_id for j in done}
    assert await ids(created_after=ts(1.0), created_before=ts(11.0)) == {
        done[1].job_id,
        done[2].job_id,
        waiting[0].job_id,
    }
    assert await ids(created_after=ts(20.0)) == {other.job_id}
    assert await ids(created_before=ts(0.0)) == set()
    assert await ids(queue="nowhere") == set()


async def test_list_jobs_rejects_a_garbage_page_token(results: ResultsClient) -> None:
    for token in ["garbage", "!!!", base64.urlsafe_b64encode(b'{"c": "x"}').decode()]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.ListJobs(results_service_pb2.ListJobsRequest(page_token=token))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(bad_request_fields(err.value)) == ["page_token"]


async def test_list_jobs_rejects_a_page_token_used_with_other_filters(
    store: Store, events: Events, start_projector: StartProjector, results: ResultsClient
) -> None:
    jobs = [JobHistory(created=float(i)) for i in range(5)]
    await project(store, events, start_projector, *[[j.queued()] for j in jobs])
    first = await results.stub.ListJobs(results_service_pb2.ListJobsRequest(queue="default", page_size=2))
    assert first.next_page_token
    decoded = json.loads(base64.urlsafe_b64decode(first.next_page_token + "=="))
    assert decoded["j"] == first.jobs[-1].id

    for changed in [{"queue": "other"}, {"queue": "default", "type": "x"}, {}]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.ListJobs(
                results_service_pb2.ListJobsRequest(page_token=first.next_page_token, page_size=2, **changed)  # type: ignore[arg-type]
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(bad_request_fields(err.value)) == ["page_token"]
    # The same filters with another page size are fine.
    second = await results.stub.ListJobs(
        results_service_pb2.ListJobsRequest(queue="default", page_size=3, page_token=first.next_page_token)
    )
    assert [j.id for j in second.jobs] == [j.job_id for j in reversed(jobs)][2:5]
    assert not second.next_page_token


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": 1001}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"queue": "bad queue!"}, "queue"),
        ({"queue": ".."}, "queue"),
        ({"state": 99}, "state"),
    ],
)
async def test_list_jobs_rejects_bad_arguments(
    results: ResultsClient, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await results.stub.ListJobs(results_service_pb2.ListJobsRequest(**request_fields))  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(err.value)


async def test_list_job_events_returns_history_oldest_first_and_resumes_after_an_id(
    store: Store, events: Events, start_projector: StartProjector, results: ResultsClient
) -> None:
    job = JobHistory(payload={"p": 1})
    ids = await events.add_all(job.lifecycle(result={"r": 2}))
    await events.add_all(JobHistory().lifecycle())  # another job's events interleave nowhere in the answer
    running = await start_projector(store)
    await events.wait_caught_up()
    await running.stop()

    page = await results.stub.ListJobEvents(results_service_pb2.ListJobEventsRequest(job_id=job.job_id))
    assert [e.id for e in page.events] == ids
    assert [e.type for e in page.events] == [
        event_pb2.EVENT_TYPE_QUEUED,
        event_pb2.EVENT_TYPE_ACTIVE,
        event_pb2.EVENT_TYPE_PROGRESS,
        event_pb2.EVENT_TYPE_SUCCEEDED,
    ]
    assert not page.has_more
    final = page.events[-1]
    assert not final.result_json and dict(final.result.struct_value) == {"r": 2.0}
    assert dict(final.job.payload) == {"p": 1.0} and not final.job.payload_json
    assert all(e.job_id == job.job_id for e in page.events)

    after = await results.stub.ListJobEvents(
        results_service_pb2.ListJobEventsRequest(job_id=job.job_id, after_event_id=ids[1], page_size=1)
    )
    assert [e.id for e in after.events] == [ids[2]]
    assert after.has_more
    rest = await results.stub.ListJobEvents(
        results_service_pb2.ListJobEventsRequest(job_id=job.job_id, after_event_id=ids[2])
    )
    assert [e.id for e in rest.events] == [ids[3]]
    assert not rest.has_more
    end = await results.stub.ListJobEvents(
        results_service_pb2.ListJobEventsRequest(job_id=job.job_id, after_event_id=ids[3])
    )
    assert list(end.events) == [] and not end.has_more


async def test_list_job_events_errors(results: ResultsClient) -> None:
    unknown = "default/01JDQ4ZG0000000000000000AA"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await results.stub.ListJobEvents(results_service_pb2.ListJobEventsRequest(job_id=unknown))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    for fields, field in [
        ({"job_id": "nope"}, "job_id"),
        ({"job_id": unknown, "after_event_id": "12-x"}, "after_event_id"),
        ({"job_id": unknown, "page_size": 5000}, "page_size"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await results.stub.ListJobEvents(results_service_pb2.ListJobEventsRequest(**fields))  # type: ignore[arg-type]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(bad_request_fields(err.value)) == [field]
