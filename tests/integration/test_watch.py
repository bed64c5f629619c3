"""Watch through the shared tail: many watchers of one job, and a watcher that falls behind."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import redis.asyncio

from conveyor.common.keys import queue_keys
from conveyor.producer.watch import Watcher
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


async def test_watchers_reaching_a_final_event_together_share_one_read_of_the_live_record(
    producer: Producer, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a job's final event every watcher asks whether it is the job's current final event;
    those asking together share one read (1,000 streams made 1,000 reads in one burst), and an
    answer is never kept past its read."""
    asked: list[Watcher] = []
    reads: list[str] = []
    gate = asyncio.Event()
    ends_at, read_ends_at = Watcher._ends_at, Watcher._read_ends_at

    async def counted_ends_at(self: Watcher, keys: Any, ulid: str, key: tuple[int, int]) -> bool | None:
        asked.append(self)
        return await ends_at(self, keys, ulid, key)

    async def gated_read(self: Watcher, keys: Any, ulid: str, key: tuple[int, int]) -> bool | None:
        reads.append(ulid)
        await gate.wait()
        return await read_ends_at(self, keys, ulid, key)

    monkeypatch.setattr(Watcher, "_ends_at", counted_ends_at)
    monkeypatch.setattr(Watcher, "_read_ends_at", gated_read)
    job = await producer.stub.Enqueue(p.EnqueueRequest(queue="default", type="demo.noop"))
    calls = [producer.stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=20) for _ in range(10)]
    for call in calls:
        assert (await call.read()).event.type == E.EVENT_TYPE_QUEUED
    await start_worker()

    async def all_asked() -> bool:
        # The shared read's task may not have taken its first step yet when the last one asks.
        return len(asked) >= len(calls) and len(reads) >= 1

    await wait_for(all_asked, "every watcher to reach the final event", 15)
    assert (len(asked), len(reads)) == (len(calls), 1), (asked, reads)
    gate.set()

    async def rest(call: grpc.aio.UnaryStreamCall[p.WatchRequest, p.WatchResponse]) -> list[int]:
        types = []
        while isinstance(response := await call.read(), p.WatchResponse):
            types.append(response.event.type)
        return types

    for types in await asyncio.wait_for(asyncio.gather(*(rest(c) for c in calls)), 15):
        assert types == [E.EVENT_TYPE_ACTIVE, E.EVENT_TYPE_SUCCEEDED]
    assert [await c.code() for c in calls] == [grpc.StatusCode.OK] * len(calls)
    # Asked again after that read: read again (the job may have been re-run meanwhile).
    queue, ulid = job.job_id.split("/")
    assert await asked[0]._ends_at(queue_keys(queue), ulid, (0, 0)) is False
    assert len(reads) == 2
