"""A producer is bounded by design (issue #10 item 8): its Watch streams are capped, its gRPC
message limit follows the payload limit, and Watch, admin and the hot path use separate Redis
pools, so a burst of Watch replays cannot make Enqueue UNAVAILABLE.

The producer here is wired exactly as `python -m conveyor.producer` wires it (conveyor.producer.app).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import redis.asyncio

from conveyor.common.enqueue import QueueDefaults
from conveyor.common.keys import DEFAULT_PRIORITY, queue_keys
from conveyor.common.settings import ProducerSettings
from conveyor.producer.app import ProducerApp
from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import admin_service_pb2_grpc, producer_service_pb2_grpc
from conveyor.v1 import producer_service_pb2 as p
from tests.support.producer_app import StartedProducer, start_app
from tests.support.wait import wait_for

Started = tuple[ProducerApp, producer_service_pb2_grpc.ProducerServiceStub, admin_service_pb2_grpc.AdminServiceStub]


@pytest.fixture
async def start(redis_client: redis.asyncio.Redis, redis_url: str) -> AsyncIterator[Callable[..., Awaitable[Started]]]:
    """Factory: a producer built from ProducerSettings(**overrides) on the test Redis, over real gRPC."""
    started: list[StartedProducer] = []

    async def start(**overrides: Any) -> Started:
        producer = await start_app(redis_url, **overrides)
        started.append(producer)
        return producer.app, producer.stub, producer.admin

    yield start
    for producer in started:
        await producer.stop()


async def _enqueue(stub: producer_service_pb2_grpc.ProducerServiceStub) -> p.EnqueueResponse:
    return await stub.Enqueue(p.EnqueueRequest(queue="bounded", type="noop"), timeout=10)


async def test_watch_streams_past_the_cap_are_resource_exhausted_until_one_closes(
    start: Callable[..., Awaitable[Started]],
) -> None:
    app, stub, _ = await start(max_watches=2)
    job = await _enqueue(stub)
    watch = stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=30)
    queue = stub.WatchQueue(p.WatchQueueRequest(queue="bounded", replay=True), timeout=30)
    assert isinstance(await watch.read(), p.WatchResponse)  # both streams are open
    assert isinstance(await queue.read(), p.WatchQueueResponse)
    assert app.watcher.streams == 2

    for call in (
        stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=10),
        stub.WatchQueue(p.WatchQueueRequest(queue="bounded"), timeout=10),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CONVEYOR_MAX_WATCHES=2" in (info.value.details() or "")
    assert app.watcher.streams == 2
    # Enqueue is not affected by the cap.
    assert (await _enqueue(stub)).created

    queue.cancel()

    async def one_closed() -> bool:
        return app.watcher.streams == 1

    await wait_for(one_closed, "the cancelled WatchQueue to release its slot")
    again = stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=10)
    assert isinstance(await again.read(), p.WatchResponse)
    again.cancel()
    watch.cancel()


async def test_an_exhausted_watch_pool_leaves_enqueue_and_admin_working(
    start: Callable[..., Awaitable[Started]],
) -> None:
    app, stub, admin = await start(watch_redis_pool_size=2)
    job = await _enqueue(stub)
    pool = app.watch_redis.connection_pool
    # Every connection of the Watch pool is taken, as by a burst of slow replays.
    held = [await pool.get_connection() for _ in range(2)]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=10).read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        for i in range(20):
            assert (await stub.Enqueue(p.EnqueueRequest(queue="bounded", type="noop"), timeout=10)).created, i
        assert (await stub.GetJob(p.GetJobRequest(job_id=job.job_id), timeout=10)).job.id == job.job_id
        stats = await admin.GetQueueStats(a.GetQueueStatsRequest(queue="bounded"), timeout=10)
        assert stats.stats.queued == 21
    finally:
        for connection in held:
            await pool.release(connection)
    first = await stub.Watch(p.WatchRequest(job_id=job.job_id), timeout=10).read()
    assert isinstance(first, p.WatchResponse) and first.event.job.id == job.job_id


async def test_the_message_limit_follows_the_payload_limit(start: Callable[..., Awaitable[Started]]) -> None:
    settings = ProducerSettings(max_payload_bytes=1000, max_batch=2)
    limit = settings.message_limit
    assert limit == (2 * 1000 + 16384) * 2 + (1 << 20)
    _, stub, _ = await start(max_payload_bytes=1000, max_batch=2)
    # A full batch at the limits fits the message limit (and is refused for its payload, by name).
    big = b'{"pad": "%s"}' % (b"x" * 2000)
    with pytest.raises(grpc.aio.AioRpcError) as over_payload:
        await stub.EnqueueBatch(
            p.EnqueueBatchRequest(jobs=[p.EnqueueRequest(queue="bounded", type="noop", payload_json=big)] * 2),
            timeout=10,
        )
    assert over_payload.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 1000 bytes" in (over_payload.value.details() or "")
    # A message over the derived limit is refused by gRPC before any handler runs.
    huge = b'{"pad": "%s"}' % (b"x" * (limit + 1))
    with pytest.raises(grpc.aio.AioRpcError) as over_message:
        await stub.Enqueue(p.EnqueueRequest(queue="bounded", type="noop", payload_json=huge), timeout=10)
    assert over_message.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    _, small, _ = await start(max_message_bytes=4096)
    with pytest.raises(grpc.aio.AioRpcError) as explicit:
        await small.Enqueue(p.EnqueueRequest(queue="bounded", type="noop", payload_json=b'{"p": "%s"}' % (b"x" * 5000)))
    assert explicit.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_per_name_caches_are_bounded(redis_client: redis.asyncio.Redis) -> None:
    assert queue_keys.cache_info().maxsize == 1024
    defaults = QueueDefaults(redis_client)
    for i in range(QueueDefaults.MAX_QUEUES + 100):
        assert await defaults.priority(f"q{i}") == DEFAULT_PRIORITY
    assert len(defaults) == QueueDefaults.MAX_QUEUES
    await redis_client.hset(queue_keys("q0").limits, "prio", "8")  # type: ignore[misc]
    assert await defaults.priority("q0") == 8  # q0 was evicted (the oldest), so it is read again
