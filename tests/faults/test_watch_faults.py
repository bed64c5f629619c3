"""Watch and WatchQueue streams survive Redis faults (issue #10 items 1 and 8): the shared event
tail runs under the Supervisor, which restarts it from the last id it handed out, so a stream
delivers every event once, in order, across every client connection killed three times and across
a period in which Redis is a read-only replica.

A private Redis; the producer is wired as `python -m conveyor.producer` wires it. Events come from
Enqueue (QUEUED) and CancelJob (CANCELLED, which ends a Watch), so no worker is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio

from conveyor.common.devstack.servers import RedisServer
from conveyor.common.keys import queue_keys
from conveyor.v1 import event_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.support.producer_app import StartedProducer, start_app
from tests.support.wait import wait_for

E = event_pb2
QUEUE = "watched"
TAIL = f"watch-tail:{QUEUE}"


@pytest.fixture
async def setup(private_redis: RedisServer) -> AsyncIterator[tuple[StartedProducer, redis.asyncio.Redis]]:
    admin = redis.asyncio.Redis.from_url(private_redis.url)
    await admin.flushall()
    producer = await start_app(private_redis.url)
    yield producer, admin
    await admin.execute_command("REPLICAOF", "NO", "ONE")
    await producer.stop()
    await admin.aclose()


async def _retrying(call: object, *args: object) -> object:
    """A unary call, again while it answers UNAVAILABLE (a pooled connection Redis closed, a
    read-only Redis); safe for Enqueue because every request here has an idempotency key."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            return await call(*args, timeout=10)  # type: ignore[operator]
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.05)


async def _enqueue(producer: StartedProducer, key: str) -> p.EnqueueResponse:
    request = p.EnqueueRequest(queue=QUEUE, type="noop", idempotency_key=key)
    response = await _retrying(producer.stub.Enqueue, request)
    assert isinstance(response, p.EnqueueResponse)
    return response


async def _tail_blocked(admin: redis.asyncio.Redis) -> bool:
    """The event tail waits in XREAD BLOCK (so a kill or a role change meets it there)."""
    clients = await admin.execute_command("CLIENT", "LIST", "TYPE", "normal")
    text = clients.decode() if isinstance(clients, bytes) else str(clients)
    return any("cmd=xread" in line and "flags=b" in line for line in text.splitlines())


async def _events_after(admin: redis.asyncio.Redis, after: str) -> list[str]:
    entries = await admin.xrange(queue_keys(QUEUE).events, min=f"({after}")
    return [entry_id.decode() for entry_id, _ in entries]


async def _read_queue(call: grpc.aio.UnaryStreamCall[p.WatchQueueRequest, p.WatchQueueResponse], n: int) -> list[str]:
    ids = []
    while len(ids) < n:
        response = await asyncio.wait_for(call.read(), 20)
        assert isinstance(response, p.WatchQueueResponse), "WatchQueue ended"
        assert response.HasField("event"), f"unexpected gap: {response.gap}"
        ids.append(response.event.id)
    return ids


async def _rest(call: grpc.aio.UnaryStreamCall[p.WatchRequest, p.WatchResponse]) -> list[event_pb2.JobEvent]:
    events = []
    while isinstance(response := await asyncio.wait_for(call.read(), 20), p.WatchResponse):
        events.append(response.event)
    return events


async def _open_streams(
    producer: StartedProducer,
) -> tuple[
    p.EnqueueResponse,
    grpc.aio.UnaryStreamCall[p.WatchRequest, p.WatchResponse],
    grpc.aio.UnaryStreamCall[p.WatchQueueRequest, p.WatchQueueResponse],
    str,
]:
    target = await _enqueue(producer, "target")
    watch = producer.stub.Watch(p.WatchRequest(job_id=target.job_id), timeout=60)
    first = await watch.read()
    assert isinstance(first, p.WatchResponse) and first.event.type == E.EVENT_TYPE_QUEUED
    # Resumed after the target's QUEUED event: every later event of the queue, none missed.
    queue = producer.stub.WatchQueue(p.WatchQueueRequest(queue=QUEUE, after_event_id=first.event.id), timeout=60)
    return target, watch, queue, first.event.id


async def test_watch_streams_survive_every_client_killed_three_times(
    setup: tuple[StartedProducer, redis.asyncio.Redis],
) -> None:
    producer, admin = setup
    target, watch, queue, first_id = await _open_streams(producer)
    for round_ in range(3):
        for i in range(5):
            await _enqueue(producer, f"kill-{round_}-{i}")
        await wait_for(lambda: _tail_blocked(admin), "the event tail to wait in XREAD")
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    for i in range(5):
        await _enqueue(producer, f"after-{i}")
    await _retrying(producer.stub.CancelJob, p.CancelJobRequest(job_id=target.job_id))

    rest = await _rest(watch)
    assert [e.type for e in rest] == [E.EVENT_TYPE_CANCELLED]
    assert await watch.code() == grpc.StatusCode.OK
    expected = await _events_after(admin, first_id)
    assert len(expected) == 3 * 5 + 5 + 1
    assert await _read_queue(queue, len(expected)) == expected  # in order, no gap, no repeat
    queue.cancel()
    status = producer.app.supervisor.status(TAIL)
    assert status.restarts >= 3, "the tail's blocked read was killed each round and restarted"
    assert status.failing_since is None


async def test_watch_streams_survive_a_read_only_period(
    setup: tuple[StartedProducer, redis.asyncio.Redis],
) -> None:
    producer, admin = setup
    target, watch, queue, first_id = await _open_streams(producer)
    for i in range(3):
        await _enqueue(producer, f"before-{i}")
    await wait_for(lambda: _tail_blocked(admin), "the event tail to wait in XREAD")

    # A replica of a primary that is not there: it keeps its data and refuses writes, as a
    # demoted primary does after a failover.
    await admin.execute_command("REPLICAOF", "127.0.0.1", "1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await producer.stub.Enqueue(p.EnqueueRequest(queue=QUEUE, type="noop", idempotency_key="refused"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # Reads still work: a new Watch replays from the replica.
    during = producer.stub.Watch(p.WatchRequest(job_id=target.job_id), timeout=60)
    replayed = await during.read()
    assert isinstance(replayed, p.WatchResponse) and replayed.event.id == first_id
    await admin.execute_command("REPLICAOF", "NO", "ONE")

    for i in range(3):
        await _enqueue(producer, f"after-{i}")
    await _retrying(producer.stub.CancelJob, p.CancelJobRequest(job_id=target.job_id))
    for call in (watch, during):
        rest = await _rest(call)
        assert [e.type for e in rest] == [E.EVENT_TYPE_CANCELLED]
        assert await call.code() == grpc.StatusCode.OK
    expected = await _events_after(admin, first_id)
    assert len(expected) == 3 + 3 + 1
    assert await _read_queue(queue, len(expected)) == expected
    queue.cancel()
    assert producer.app.supervisor.status(TAIL).failing_since is None
