"""Watch through the shared tail: many watchers of one job, and a watcher that falls behind."""

from __future__ import annotations

import asyncio

import grpc
import redis.asyncio

from conveyor.common.keys import queue_keys
from conveyor.v1 import event_pb2, job_pb2, producer_service_pb2_grpc
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker, start_producer
from tests.support.wait import wait_for

E = event_pb2


async def _job_event_ids(redis_client: redis.asyncio.Redis, job_id: str) -> list[str]:
    queue, ulid = job_id.split("/")
    entries = await redis_client.xrange(queue_keys(queue).events)
    return [entry_id.decode() for entry_id, fields in entries if fields[b"j"].decode() == ulid]


async def test_many_watchers_of_one_job_each_get_every_event_once(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    job = await producer.stub.Enqueue(
        p.EnqueueRequest(queue="default", type="demo.sleep", payload_json=b'{"seconds": 0.2, "steps": 4}')
    )
    calls = [producer.stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=20) for _ in range(25)]
    # Every stream has its replay (QUEUED) before the job runs, so what follows is live and shared.
    for call in calls:
        first = await call.read()
        assert isinstance(first, p.WatchResponse) and first.event.type == E.EVENT_TYPE_QUEUED
    await start_worker()

    async def rest(call: grpc.aio.UnaryStreamCall[p.WatchRequest, p.WatchResponse]) -> list[event_pb2.JobEvent]:
        events = []
        while isinstance(response := await call.read(), p.WatchResponse):
            events.append(response.event)
        return events

    received = await asyncio.wait_for(asyncio.gather(*(rest(c) for c in calls)), 20)
    expected = (await _job_event_ids(redis_client, job.job_id))[1:]
    for events in received:
        assert [e.id for e in events] == expected
        assert [e.type for e in events] == [E.EVENT_TYPE_ACTIVE, *[E.EVENT_TYPE_PROGRESS] * 4, E.EVENT_TYPE_SUCCEEDED]
        # Converted for clients: the result is a Value, the final event's job has its payload as a Struct.
        assert events[-1].result.struct_value["steps"] == 4 and not events[-1].result_json
        assert events[-1].job.payload["steps"] == 4 and not events[-1].job.payload_json
    assert [await c.code() for c in calls] == [grpc.StatusCode.OK] * len(calls)


async def test_a_watch_that_falls_behind_ends_resource_exhausted_and_resumes_without_gap_or_repeat(
    redis_client: redis.asyncio.Redis, redis_url: str, start_worker: StartWorker
) -> None:
    buffer = 20
    producer, stop = await start_producer(redis_url, watch_buffer=buffer)
    # BDP probing off: gRPC keeps its default 64 KiB flow-control window, so the server's
    # inbox, not the client's transport, takes the backlog.
    channel = grpc.aio.insecure_channel(producer.addr, options=[("grpc.http2.bdp_probe", 0)])
    try:
        stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
        job = await producer.stub.Enqueue(
            p.EnqueueRequest(queue="default", type="test.chatty", payload_json=b'{"steps": 200, "size": 8192}')
        )
        call = stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=60)
        first = await call.read()
        assert isinstance(first, p.WatchResponse) and first.event.type == E.EVENT_TYPE_QUEUED
        received = [first.event]
        # The client stops reading while 200 progress events of 8 KiB each are recorded.
        await start_worker()

        async def succeeded() -> bool:
            got = await producer.stub.GetJob(p.GetJobRequest(job_id=job.job_id))
            return got.job.state == job_pb2.JOB_STATE_SUCCEEDED

        await wait_for(succeeded, "the chatty job to succeed", within=30)
        try:
            while isinstance(response := await call.read(), p.WatchResponse):
                received.append(response.event)
            raise AssertionError("the stream ended OK although its watcher fell behind")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"after_event_id={received[-1].id}" in (exc.details() or "")
        assert received[-1].type != E.EVENT_TYPE_SUCCEEDED
        # Resuming after the last event received delivers exactly the rest.
        resumed = [r.event async for r in stub.Watch(p.WatchRequest(job_id=job.job_id, after_event_id=received[-1].id))]
        assert resumed[-1].type == E.EVENT_TYPE_SUCCEEDED
        ids = [e.id for e in received + resumed]
        assert ids == await _job_event_ids(redis_client, job.job_id)
    finally:
        await channel.close()
        await stop()
