"""CancelJob and dead letters, through real Redis and gRPC (issue #3)."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.common.keys import queue_keys
from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import event_pb2, job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.integration.test_producer_worker import enqueue, watch_all
from tests.support import handlers as test_handlers
from tests.support.wait import wait_for

E = event_pb2
ONCE = job_pb2.RetryPolicy(max_attempts=1)


async def cancel(producer: Producer, job_id: str, reason: str = "") -> p.CancelJobResponse:
    return await producer.stub.CancelJob(p.CancelJobRequest(job_id=job_id, reason=reason))


async def test_a_cancelled_queued_job_never_runs(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    job = await enqueue(producer, "test.count")
    reply = await cancel(producer, job.job_id, "changed my mind")
    assert reply.state == job_pb2.JOB_STATE_CANCELLED and not reply.cancel_requested
    assert await redis_client.xlen(queue_keys("default").band(5)) == 0
    events = await watch_all(producer, job.job_id)
    assert [e.type for e in events] == [E.EVENT_TYPE_QUEUED, E.EVENT_TYPE_CANCELLED]
    assert events[-1].error.message == "changed my mind" and events[-1].job.type == "test.count"
    marker = await enqueue(producer, "test.count")
    await start_worker()
    await wait_for(lambda: _ran(marker.job_id), "a later job to run")
    assert job.job_id not in test_handlers.runs
    again = await cancel(producer, job.job_id)  # repeating is harmless
    assert again.state == job_pb2.JOB_STATE_CANCELLED


async def _ran(job_id: str) -> bool:
    return job_id in test_handlers.runs


async def test_a_cancelled_delayed_job_never_runs(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    job = await enqueue(producer, "test.count", delay=duration_pb2.Duration(nanos=300_000_000))
    assert (await cancel(producer, job.job_id)).state == job_pb2.JOB_STATE_CANCELLED
    events = await watch_all(producer, job.job_id)
    assert [e.type for e in events] == [E.EVENT_TYPE_DELAYED, E.EVENT_TYPE_CANCELLED]
    marker = await enqueue(producer, "test.count", delay=duration_pb2.Duration(nanos=400_000_000))
    await wait_for(lambda: _ran(marker.job_id), "a later delayed job to run")
    assert job.job_id not in test_handlers.runs


async def test_a_running_async_job_is_cancelled_cooperatively(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker(visibility_timeout_s=3.0)
    job = await enqueue(producer, "test.gate", retry=ONCE)
    await wait_for(lambda: _started(job.job_id), "the job to start")
    reply = await cancel(producer, job.job_id, "stop now")
    assert reply.state == job_pb2.JOB_STATE_ACTIVE and reply.cancel_requested
    events = await watch_all(producer, job.job_id)
    assert [e.type for e in events][-1] == E.EVENT_TYPE_CANCELLED
    assert events[-1].error.kind == "Cancelled" and events[-1].error.message == "stop now"
    assert events[-1].attempt == 1
    got = (await producer.stub.GetJob(p.GetJobRequest(job_id=job.job_id))).job
    assert got.state == job_pb2.JOB_STATE_CANCELLED


async def _started(job_id: str) -> bool:
    return job_id in test_handlers.started


async def test_a_running_sync_job_sees_ctx_cancelled(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker(visibility_timeout_s=3.0)
    job = await enqueue(producer, "test.sync_until_cancelled", retry=ONCE)
    await wait_for(lambda: _started(job.job_id), "the job to start")
    assert (await cancel(producer, job.job_id)).cancel_requested
    final = (await watch_all(producer, job.job_id))[-1]
    assert final.type == E.EVENT_TYPE_CANCELLED


def _precondition_subject(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    return failure.violations[0].subject


async def test_cancel_errors(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    done = await enqueue(producer, "demo.echo")
    await watch_all(producer, done.job_id)
    with pytest.raises(grpc.aio.AioRpcError) as finished:
        await cancel(producer, done.job_id)
    assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SUCCEEDED" in (finished.value.details() or "")
    assert _precondition_subject(finished.value) == done.job_id
    for job_id, code in [
        ("default/01ARZ3NDEKTSV4RRFFQ69G5FAV", grpc.StatusCode.NOT_FOUND),
        ("nonsense", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await cancel(producer, job_id)
        assert info.value.code() == code


async def test_final_failures_become_dead_letters_that_can_be_retried_and_purged(
    producer: Producer, start_worker: StartWorker
) -> None:
    await start_worker()
    jobs = [await enqueue(producer, "demo.fail", payload={"message": f"bad {i}"}, retry=ONCE) for i in range(5)]
    for job in jobs:
        await watch_all(producer, job.job_id)

    pages: list[a.DeadLetter] = []
    token = ""
    while True:
        page = await producer.admin.ListDeadLetters(
            a.ListDeadLettersRequest(queue="default", page_size=2, page_token=token)
        )
        pages += page.dead_letters
        token = page.next_page_token
        if not token:
            break
    assert [d.job.id for d in pages] == [j.job_id for j in jobs]
    first = pages[0]
    assert first.job.payload["message"] == "bad 0" and first.event.type == E.EVENT_TYPE_FAILED
    assert first.event.error.message == "bad 0" and first.dead_at.seconds > 0

    retried = await producer.admin.RetryDeadLetters(a.RetryDeadLettersRequest(queue="default", job_id=jobs[0].job_id))
    assert list(retried.job_ids) == [jobs[0].job_id]
    events = await watch_all(producer, jobs[0].job_id, after=first_final_id(await watch_all(producer, jobs[0].job_id)))
    assert [e.type for e in events] == [E.EVENT_TYPE_QUEUED, E.EVENT_TYPE_ACTIVE, E.EVENT_TYPE_FAILED]
    assert events[1].attempt == 2  # a new attempt of the same job

    purged = await producer.admin.PurgeDeadLetters(a.PurgeDeadLettersRequest(queue="default", job_id=jobs[1].job_id))
    assert purged.purged == 1
    everything = await producer.admin.PurgeDeadLetters(a.PurgeDeadLettersRequest(queue="default", all=True))
    assert everything.purged == 4  # jobs 2-4, and job 0 which failed again
    left = await producer.admin.ListDeadLetters(a.ListDeadLettersRequest(queue="default"))
    assert list(left.dead_letters) == []

    with pytest.raises(grpc.aio.AioRpcError) as not_dead:
        await producer.admin.RetryDeadLetters(a.RetryDeadLettersRequest(queue="default", job_id=jobs[2].job_id))
    assert not_dead.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as both:
        await producer.admin.RetryDeadLetters(
            a.RetryDeadLettersRequest(queue="default", job_id=jobs[2].job_id, all=True)
        )
    assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def first_final_id(events: list[event_pb2.JobEvent]) -> str:
    return next(e.id for e in events if e.type == E.EVENT_TYPE_FAILED)


async def test_retry_all_dead_letters(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    jobs = [await enqueue(producer, "test.flaky", payload={"succeed_on": 2}, retry=ONCE) for _ in range(3)]
    for job in jobs:
        assert (await watch_all(producer, job.job_id))[-1].type == E.EVENT_TYPE_FAILED
    retried = await producer.admin.RetryDeadLetters(a.RetryDeadLettersRequest(queue="default", all=True))
    assert sorted(retried.job_ids) == sorted(j.job_id for j in jobs)

    async def all_succeeded() -> bool:
        states = [(await producer.stub.GetJob(p.GetJobRequest(job_id=j.job_id))).job.state for j in jobs]
        return all(s == job_pb2.JOB_STATE_SUCCEEDED for s in states)

    await wait_for(all_succeeded, "retried dead letters to succeed")
