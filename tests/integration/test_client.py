"""The Python client against a real producer."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio

from conveyor.common.client import ConveyorClient
from conveyor.common.devstack.servers import free_port
from conveyor.common.errors import InvalidArgument, NotFound, Unavailable
from conveyor.common.keys import queue_keys
from conveyor.common.validate import QUEUE_RULE
from conveyor.v1 import event_pb2
from tests.integration.conftest import Producer, StartWorker


class CountingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self.methods.append(details.method.decode() if isinstance(details.method, bytes) else details.method)
        return await continuation(details, request)


async def test_concurrent_enqueues_are_coalesced_into_batches(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    client = ConveyorClient(producer.addr)
    counter = CountingInterceptor()
    client._channel = grpc.aio.insecure_channel(producer.addr, interceptors=[counter])
    from conveyor.v1 import producer_service_pb2_grpc

    client._producer = producer_service_pb2_grpc.ProducerServiceStub(client._channel)
    try:
        results = await asyncio.gather(*(client.enqueue("default", "test.count", {"i": i}) for i in range(64)))
    finally:
        await client.close()
    assert len({r.job_id for r in results}) == 64 and all(r.created for r in results)
    assert await redis_client.xlen(queue_keys("default").band(5)) == 64
    assert len(counter.methods) < 64
    assert set(counter.methods) <= {"/conveyor.v1.ProducerService/EnqueueBatch", "/conveyor.v1.ProducerService/Enqueue"}


async def test_one_bad_call_among_coalesced_ones_fails_alone(producer: Producer) -> None:
    async with ConveyorClient(producer.addr) as client:
        calls = [client.enqueue("default", "test.count") for _ in range(10)]
        calls.insert(5, client.enqueue("bad queue", "test.count"))
        results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], InvalidArgument)
    assert errors[0].violations == {"queue": QUEUE_RULE}
    assert isinstance(results[5], InvalidArgument)


async def test_client_retries_are_safe_thanks_to_its_idempotency_keys(producer: Producer) -> None:
    async with ConveyorClient(producer.addr, coalesce=False) as client:
        req = client.request("default", "test.count")
        first = await client._enqueue_one(req)
        again = await client._enqueue_one(req)  # what a retry after a lost answer sends
    assert req.idempotency_key.startswith("client:")
    assert again.job_id == first.job_id and not again.created


async def test_watch_and_get_job_through_the_client(producer: Producer, start_worker: StartWorker) -> None:
    await start_worker()
    async with ConveyorClient(producer.addr) as client:
        job = await client.enqueue("default", "demo.echo", {"x": 1})
        types = [e.type async for e in client.watch(job.job_id)]
        assert types == [event_pb2.EVENT_TYPE_QUEUED, event_pb2.EVENT_TYPE_ACTIVE, event_pb2.EVENT_TYPE_SUCCEEDED]
        assert (await client.get_job(job.job_id)).result.struct_value["x"] == 1
        with pytest.raises(NotFound):
            await client.get_job("default/01ARZ3NDEKTSV4RRFFQ69G5FAV")


async def test_unreachable_producer_is_unavailable_after_retries() -> None:
    async with ConveyorClient(f"127.0.0.1:{free_port()}", timeout=1, retries=1) as client:
        with pytest.raises(Unavailable):
            await client.enqueue("default", "test.count")
