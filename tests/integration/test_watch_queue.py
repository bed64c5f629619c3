"""WatchQueue: every event of a queue, shared tail, resume, gaps, slow clients (real Redis, gRPC, workers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import cast

import grpc
import pytest
import redis.asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.common.client import ConveyorClient
from conveyor.common.codec import FINAL_STATES
from conveyor.common.keys import queue_keys
from conveyor.common.scripts import RESULTS_GROUP, Scripts
from conveyor.v1 import event_pb2, producer_service_pb2_grpc
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker, start_producer
from tests.support.wait import wait_for

E = event_pb2
Responses = AsyncIterator[p.WatchQueueResponse]


def _key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


async def enqueue(producer: Producer, queue: str = "default", type: str = "test.count", **kw: object) -> str:
    response = await producer.stub.Enqueue(p.EnqueueRequest(queue=queue, type=type, **kw))  # type: ignore[arg-type]
    return response.job_id


async def watch_job(producer: Producer, job_id: str) -> list[event_pb2.JobEvent]:
    return [r.event async for r in producer.stub.Watch(p.WatchRequest(job_id=job_id), timeout=20)]


async def take(call: Responses, n: int, within: float = 20.0) -> list[p.WatchQueueResponse]:
    """The next ``n`` responses of ``call``, failing after ``within`` seconds."""

    async def go() -> list[p.WatchQueueResponse]:
        out: list[p.WatchQueueResponse] = []
        async for response in call:
            out.append(response)
            if len(out) == n:
                break
        return out

    return await asyncio.wait_for(go(), within)


async def until_live(producer: Producer, call: Responses, queue: str = "default") -> p.WatchQueueResponse:
    """Enqueue marker jobs until a from-now stream shows one: from then on it is subscribed."""
    it = aiter(call)
    pending = asyncio.ensure_future(anext(it))
    deadline = time.monotonic() + 10
    while True:
        await enqueue(producer, queue, "test.marker")
        done, _ = await asyncio.wait({pending}, timeout=0.05)
        if done:
            return pending.result()
        assert time.monotonic() < deadline, "the stream never went live"


def _events(responses: list[p.WatchQueueResponse]) -> list[event_pb2.JobEvent]:
    assert all(r.WhichOneof("item") == "event" for r in responses), [r.WhichOneof("item") for r in responses]
    return [r.event for r in responses]


async def _all_final(producer: Producer, job_ids: list[str]) -> bool:
    for job_id in job_ids:
        job = (await producer.stub.GetJob(p.GetJobRequest(job_id=job_id))).job
        if job.state not in FINAL_STATES:
            return False
    return True


async def test_watch_queue_sees_every_event_of_every_job_in_order_and_nothing_else(
    producer: Producer, start_worker: StartWorker
) -> None:
    await start_worker(concurrency=4)
    await start_worker(concurrency=4)
    other = [await enqueue(producer, "other") for _ in range(3)]  # no worker serves "other"
    call = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default", replay=True), timeout=60)
    jobs = [await enqueue(producer, type="demo.sleep", payload={"seconds": 0.1, "steps": 2}) for _ in range(12)]
    await wait_for(lambda: _all_final(producer, jobs), "all jobs finished", within=30)
    per_job = {job_id: await watch_job(producer, job_id) for job_id in jobs}
    expected = sum(len(events) for events in per_job.values())
    seen = _events(await take(call, expected))
    call.cancel()

    assert {e.job_id for e in seen} == set(jobs), "only this queue's jobs, all of them"
    assert not {e.job_id for e in seen} & set(other)
    keys = [_key(e.id) for e in seen]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "queue order, no repeat"
    for job_id, events in per_job.items():
        mine = [e for e in seen if e.job_id == job_id]
        assert [(e.id, e.type) for e in mine] == [(e.id, e.type) for e in events], job_id
        assert mine == events  # the same messages Watch sends (payload as a Struct, result as a Value)
    assert {e.worker for e in seen if e.type == E.EVENT_TYPE_ACTIVE} == {"test-worker-1", "test-worker-2"}
    types = [e.type for e in seen if e.job_id == jobs[0]]
    assert types == [
        E.EVENT_TYPE_QUEUED,
        E.EVENT_TYPE_ACTIVE,
        E.EVENT_TYPE_PROGRESS,
        E.EVENT_TYPE_PROGRESS,
        E.EVENT_TYPE_SUCCEEDED,
    ]


async def test_watch_queue_starts_now_by_default(producer: Producer) -> None:
    before = await enqueue(producer)
    call = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default"), timeout=30)
    first = await until_live(producer, call)
    assert first.event.job_id != before
    after = await enqueue(producer)
    (next_one,) = _events(await take(call, 1))
    # Markers enqueued while the stream went live may come first; the new job follows in order.
    while next_one.job_id != after:
        (next_one,) = _events(await take(call, 1))
    call.cancel()
    assert next_one.type == E.EVENT_TYPE_QUEUED


async def test_resume_after_a_disconnect_gives_no_gap_and_no_repeat(
    producer: Producer, start_worker: StartWorker
) -> None:
    await start_worker(concurrency=4)
    call = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default", replay=True), timeout=60)
    jobs = [await enqueue(producer, type="demo.sleep", payload={"seconds": 0.3, "steps": 3}) for _ in range(6)]
    first = _events(await take(call, 8))
    call.cancel()  # the client drops the stream while the jobs run
    await wait_for(lambda: _all_final(producer, jobs), "all jobs finished", within=30)
    total = sum([len(await watch_job(producer, job_id)) for job_id in jobs])
    assert total > len(first) + 10
    resumed = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default", after_event_id=first[-1].id), timeout=30)
    rest = _events(await take(resumed, total - len(first)))
    resumed.cancel()
    full_call = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default", replay=True), timeout=30)
    full = _events(await take(full_call, total))
    full_call.cancel()
    assert [(e.id, e.type) for e in first + rest] == [(e.id, e.type) for e in full]


async def test_queue_and_job_watchers_share_one_redis_reader(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    async def readers() -> int:
        return sum(1 for c in await redis_client.client_list() if c.get("cmd") == "xread")

    baseline = await readers()
    job = await enqueue(producer, type="test.gate")
    watch = producer.stub.Watch(p.WatchRequest(job_id=job), timeout=30)
    (queued,) = [r.event for r in await asyncio.wait_for(_first(watch), 10)]
    assert queued.type == E.EVENT_TYPE_QUEUED  # replayed; the Watch now follows the tail
    a = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default"), timeout=30)
    b = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default", replay=True), timeout=30)
    await until_live(producer, a)
    await take(b, 2)  # the replayed QUEUED event of the gated job, then the first marker
    await producer.stub.CancelJob(p.CancelJobRequest(job_id=job, reason="done"))
    # All three streams see the CANCELLED event from the same tail.
    cancelled = [r.event async for r in watch]
    assert cancelled[-1].type == E.EVENT_TYPE_CANCELLED
    for call in (a, b):
        event = (await take(call, 1))[0].event
        while event.job_id != job:
            event = (await take(call, 1))[0].event
        assert event.id == cancelled[-1].id
    assert await readers() == baseline + 1, await redis_client.client_list()
    a.cancel()
    b.cancel()


async def _first(call: AsyncIterator[p.WatchResponse]) -> list[p.WatchResponse]:
    async for response in call:
        return [response]
    return []


async def test_event_type_filter(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    jobs = [await enqueue(producer) for _ in range(5)]
    await wait_for(lambda: _all_final(producer, jobs), "all jobs finished")
    call = producer.stub.WatchQueue(
        p.WatchQueueRequest(queue="default", replay=True, event_types=[E.EVENT_TYPE_SUCCEEDED]), timeout=30
    )
    seen = _events(await take(call, 5))
    live = await enqueue(producer)
    (succeeded,) = _events(await take(call, 1))
    call.cancel()
    assert [e.job_id for e in seen] == jobs and {e.type for e in seen} == {E.EVENT_TYPE_SUCCEEDED}
    assert succeeded.job_id == live and succeeded.type == E.EVENT_TYPE_SUCCEEDED


async def test_resume_after_trimmed_events_starts_with_a_gap_marker(
    producer: Producer, redis_url: str, redis_client: redis.asyncio.Redis
) -> None:
    old = [await enqueue(producer) for _ in range(4)]
    keys = queue_keys("default")
    old_ids = [entry_id.decode() for entry_id, _ in await redis_client.xrange(keys.events)]
    assert len(old_ids) == 4
    # The results service read and acked them; the retention passed: the real trim drops them.
    await redis_client.xgroup_setid(keys.events, RESULTS_GROUP, "$")
    await asyncio.sleep(0.002)  # the cutoff is a millisecond id: let the clock pass the last event
    assert await Scripts(redis_client).trim_events(keys, int(time.time() * 1000)) == 4
    new = [await enqueue(producer) for _ in range(3)]
    new_ids = [entry_id.decode() for entry_id, _ in await redis_client.xrange(keys.events)]

    call = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default", after_event_id=old_ids[1]), timeout=30)
    gap, *events = await take(call, 4)
    call.cancel()
    assert gap.WhichOneof("item") == "gap"
    assert gap.gap.reason == p.WATCH_QUEUE_GAP_REASON_TRIMMED
    assert (gap.gap.after_event_id, gap.gap.before_event_id) == (old_ids[1], new_ids[0])
    assert [e.job_id for e in _events(events)] == new
    assert not set(old) & {e.job_id for e in _events(events)}

    # Resuming after an event Redis still holds: no gap marker.
    call = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default", after_event_id=new_ids[0]), timeout=30)
    assert [e.job_id for e in _events(await take(call, 2))] == new[1:]
    call.cancel()

    # Every event after the resume point left Redis: a gap up to "now".
    await redis_client.xgroup_setid(keys.events, RESULTS_GROUP, "$")
    await asyncio.sleep(0.002)
    assert await Scripts(redis_client).trim_events(keys, int(time.time() * 1000)) == 3
    call = producer.stub.WatchQueue(p.WatchQueueRequest(queue="default", after_event_id=new_ids[0]), timeout=30)
    (gap,) = await take(call, 1)
    assert gap.gap.reason == p.WATCH_QUEUE_GAP_REASON_TRIMMED and gap.gap.before_event_id == ""
    call.cancel()


async def test_a_slow_client_gets_a_gap_marker_and_continues_live(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    buffer = 50
    producer, stop = await start_producer(redis_url, watch_buffer=buffer)
    # BDP probing off: the connection keeps gRPC's default 64 KiB flow-control window, so
    # the server's own buffer, not the client's transport, takes the backlog.
    channel = grpc.aio.insecure_channel(producer.addr, options=[("grpc.http2.bdp_probe", 0)])
    try:
        stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
        call = stub.WatchQueue(p.WatchQueueRequest(queue="default"), timeout=120)
        first = await until_live(producer, call)
        # The client stops reading. 8 KiB of labels make each QUEUED event about 8 KiB.
        labels = {f"k{i}": "v" * 250 for i in range(32)}
        jobs = p.EnqueueBatchRequest(
            jobs=[p.EnqueueRequest(queue="default", type="test.count", labels=labels) for _ in range(100)]
        )
        sent: list[str] = []
        for _ in range(20):
            sent += [r.job_id for r in (await producer.stub.EnqueueBatch(jobs)).results]
        last_job = sent[-1]
        # Now it reads again, until the last job's event arrives.
        received: list[p.WatchQueueResponse] = [first]

        async def drain() -> None:
            async for response in call:
                received.append(response)
                if response.WhichOneof("item") == "event" and response.event.job_id == last_job:
                    return

        await asyncio.wait_for(drain(), 60)
        call.cancel()
    finally:
        await channel.close()
        await stop()

    gaps = [(i, r.gap) for i, r in enumerate(received) if r.WhichOneof("item") == "gap"]
    assert gaps, "the slow client was never told it lost events"
    events = [r.event for r in received if r.WhichOneof("item") == "event"]
    keys = [_key(e.id) for e in events]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    all_ids = [entry_id.decode() for entry_id, _ in await redis_client.xrange(queue_keys("default").events)]
    position = {event_id: i for i, event_id in enumerate(all_ids)}
    for i, gap in gaps:
        assert gap.reason == p.WATCH_QUEUE_GAP_REASON_SLOW_CLIENT
        before, after = received[i - 1], received[i + 1]
        assert gap.after_event_id == before.event.id and gap.before_event_id == after.event.id
        # Exactly the events between the two were dropped.
        assert gap.dropped == position[gap.before_event_id] - position[gap.after_event_id] - 1 > 0
        assert gap.dropped >= buffer
    delivered_from_first = [e for e in events if _key(e.id) >= _key(first.event.id)]
    assert len(delivered_from_first) + sum(g.dropped for _, g in gaps) == len(all_ids) - position[first.event.id]
    assert {e.job_id for e in events} >= {last_job}


async def test_bad_requests_are_invalid_argument_naming_the_field(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    cases: list[tuple[p.WatchQueueRequest, str]] = [
        (p.WatchQueueRequest(), "queue"),
        (p.WatchQueueRequest(queue="no spaces!"), "queue"),
        (p.WatchQueueRequest(queue=".."), "queue"),
        (p.WatchQueueRequest(queue="default", after_event_id="yesterday"), "after_event_id"),
        (p.WatchQueueRequest(queue="default", after_event_id="1-0", replay=True), "replay"),
        (p.WatchQueueRequest(queue="default", event_types=[E.EVENT_TYPE_UNSPECIFIED]), "event_types[0]"),
        (p.WatchQueueRequest(queue="default", event_types=[E.EVENT_TYPE_QUEUED, 99]), "event_types[1]"),  # type: ignore[list-item]
    ]
    keys_before = await redis_client.dbsize()
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in producer.stub.WatchQueue(request, timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        status = rpc_status.from_call(cast(grpc.Call, info.value))
        assert status is not None
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad)
        assert field in [v.field for v in bad.field_violations], (request, bad)
        assert "Traceback" not in (info.value.details() or "")
    assert await redis_client.dbsize() == keys_before


async def test_streams_end_unavailable_at_once_on_shutdown_and_the_client_resumes_elsewhere(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    a, stop_a = await start_producer(redis_url)
    b, stop_b = await start_producer(redis_url)
    channel = grpc.aio.insecure_channel(a.addr)  # not the fixture's channel, which stop_a() closes first
    try:
        # Raw stub: the stream ends UNAVAILABLE at once, telling the client how to resume.
        stub = producer_service_pb2_grpc.ProducerServiceStub(channel)
        call = stub.WatchQueue(p.WatchQueueRequest(queue="default"), timeout=60)
        await until_live(a, call)
        # The client: pick_first over both producers, so it reconnects to B when A is gone.
        async with ConveyorClient(f"ipv4:127.0.0.1:{a.addr.rsplit(':', 1)[1]},{b.addr}", retries=10) as client:
            stream = client.watch_queue("default", replay=True)
            seen: list[p.WatchQueueResponse] = [await anext(stream)]
            stopping = asyncio.ensure_future(stop_a())
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "after_event_id" in (info.value.details() or "")
            assert time.monotonic() - started < 3.0
            await stopping
            # Jobs enqueued through B while the client reconnects: it sees each event once.
            more = [await enqueue(b) for _ in range(5)]

            async def rest() -> None:
                async for response in stream:
                    seen.append(response)
                    if response.event.job_id == more[-1]:
                        return

            await asyncio.wait_for(rest(), 20)
            await stream.aclose()
        ids = [r.event.id for r in seen]
        all_ids = [i.decode() for i, _ in await redis_client.xrange(queue_keys("default").events)]
        assert ids == all_ids, "a gap or a repeat across the reconnect"
    finally:
        await channel.close()
        await stop_b()
