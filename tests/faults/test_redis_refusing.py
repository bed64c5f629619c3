"""Redis answering with an error is a fault like any other (issue 10, DESIGN.md invariant 8).

A private Redis is driven into each state with its own commands (maxmemory, REPLICAOF, a long
script, SCRIPT FLUSH, CLIENT KILL) while a real producer serves real gRPC calls: each call gets
the status the README's error table names (never INTERNAL), nothing is half-written, and the
same call works again once Redis recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import grpc
import pytest
import redis
import redis.asyncio
import structlog

from conveyor.common.devstack.servers import RedisServer
from conveyor.v1 import producer_service_pb2
from tests.integration.conftest import Producer, start_producer
from tests.support.wait import wait_for

QUEUE = "refusing"


@pytest.fixture
async def setup(private_redis: RedisServer) -> AsyncIterator[tuple[Producer, redis.asyncio.Redis]]:
    admin = redis.asyncio.Redis.from_url(private_redis.url)
    await admin.flushall()
    await admin.config_set("maxmemory", 0)
    producer, stop = await start_producer(private_redis.url)
    yield producer, admin
    await admin.config_set("maxmemory", 0)
    await admin.execute_command("REPLICAOF", "NO", "ONE")
    await stop()
    await admin.aclose()


def _request(n: int = 0) -> producer_service_pb2.EnqueueRequest:
    return producer_service_pb2.EnqueueRequest(queue=QUEUE, type="noop", payload_json=b'{"n": %d}' % n)


async def _enqueue_code(producer: Producer, n: int = 0) -> tuple[grpc.StatusCode, str]:
    try:
        await producer.stub.Enqueue(_request(n), timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def _job_count(admin: redis.asyncio.Redis) -> int:
    total = 0
    async for key in admin.scan_iter(match=f"conveyor:{{{QUEUE}}}:jobs:*"):
        total += int(await admin.xlen(key))
    return total


async def test_redis_full_is_resource_exhausted_and_writes_nothing(
    setup: tuple[Producer, redis.asyncio.Redis],
) -> None:
    producer, admin = setup
    assert (await _enqueue_code(producer))[0] == grpc.StatusCode.OK
    before = await _job_count(admin)
    await admin.config_set("maxmemory", 1)
    code, details = await _enqueue_code(producer, 1)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Redis is full" in details
    batch = producer_service_pb2.EnqueueBatchRequest(jobs=[_request(i) for i in range(5)])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await producer.stub.EnqueueBatch(batch, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await admin.config_set("maxmemory", 0)
    assert await _job_count(admin) == before, "a refused enqueue wrote something"
    assert (await _enqueue_code(producer, 2))[0] == grpc.StatusCode.OK


async def test_a_read_only_replica_is_unavailable_until_promoted(
    setup: tuple[Producer, redis.asyncio.Redis],
) -> None:
    producer, admin = setup
    assert (await _enqueue_code(producer))[0] == grpc.StatusCode.OK
    before = await _job_count(admin)
    # A replica of a primary that is not there: it keeps its data and refuses writes, as a
    # demoted primary does after a failover.
    await admin.execute_command("REPLICAOF", "127.0.0.1", "1")
    code, details = await _enqueue_code(producer, 1)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "read-only replica" in details
    await admin.execute_command("REPLICAOF", "NO", "ONE")
    assert await _job_count(admin) == before
    assert (await _enqueue_code(producer, 2))[0] == grpc.StatusCode.OK


async def test_a_busy_script_is_unavailable_until_killed(
    setup: tuple[Producer, redis.asyncio.Redis], private_redis: RedisServer
) -> None:
    producer, admin = setup
    await admin.config_set("busy-reply-threshold", 50)
    blocker = redis.Redis.from_url(private_redis.url, socket_timeout=30)
    failure: list[BaseException] = []

    def run_forever() -> None:
        try:
            blocker.eval("local i = 0 while true do i = i + 1 end", 0)
        except redis.ResponseError as exc:  # "Script killed by user"
            failure.append(exc)

    thread = threading.Thread(target=run_forever)
    thread.start()
    try:

        async def busy() -> bool:
            return (await _enqueue_code(producer))[0] == grpc.StatusCode.UNAVAILABLE

        await wait_for(busy, "Enqueue to answer UNAVAILABLE while a script runs")
        code, details = await _enqueue_code(producer)
        assert code == grpc.StatusCode.UNAVAILABLE and "busy" in details
    finally:
        sync = redis.Redis.from_url(private_redis.url)

        def kill() -> None:
            while thread.is_alive():
                with contextlib.suppress(redis.ResponseError):
                    sync.script_kill()
                thread.join(0.05)

        await asyncio.to_thread(kill)
        sync.close()
        blocker.close()
        await admin.config_set("busy-reply-threshold", 5000)
    assert failure, "the long script was not killed"
    assert (await _enqueue_code(producer))[0] == grpc.StatusCode.OK


async def test_scripts_flushed_under_load_are_reloaded(setup: tuple[Producer, redis.asyncio.Redis]) -> None:
    producer, admin = setup
    codes: list[grpc.StatusCode] = []

    async def enqueue_many(offset: int) -> None:
        for i in range(100):
            codes.append((await _enqueue_code(producer, offset + i))[0])

    async def flush() -> None:
        for _ in range(5):
            await admin.script_flush()
            await asyncio.sleep(0.01)

    await asyncio.gather(enqueue_many(0), enqueue_many(1000), flush())
    assert set(codes) == {grpc.StatusCode.OK}
    assert await _job_count(admin) == 200


async def test_killed_connections_cost_at_most_a_retry(setup: tuple[Producer, redis.asyncio.Redis]) -> None:
    producer, admin = setup
    assert (await _enqueue_code(producer))[0] == grpc.StatusCode.OK
    for round_ in range(3):
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        codes = [(await _enqueue_code(producer, round_ * 10 + i))[0] for i in range(5)]
        # A pooled connection Redis closed fails the one call that finds it dead, as UNAVAILABLE
        # (a script must not be sent twice: it may have run); the next calls reconnect.
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert codes[-1] == grpc.StatusCode.OK


async def test_a_service_started_while_redis_is_busy_waits_for_it(private_redis: RedisServer) -> None:
    """connect_redis(wait=True) treats BUSY like a refused connection: it waits, it does not exit."""
    from conveyor.common.redis import connect_redis

    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("busy-reply-threshold", 50)
    blocker = redis.Redis.from_url(private_redis.url, socket_timeout=60)

    def spin() -> None:
        with contextlib.suppress(redis.ResponseError):  # "Script killed by user"
            blocker.eval("local i = 0 while true do i = i + 1 end", 0)

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        await wait_for(lambda: asyncio.to_thread(lambda: _busy(admin)), "Redis to answer BUSY", within=10)
        with structlog.testing.capture_logs() as logged:
            connecting = asyncio.create_task(connect_redis(private_redis.url, wait=True, max_delay_s=0.2))

            async def refused_twice() -> bool:
                assert not connecting.done(), connecting.exception() if connecting.done() else None
                return sum(e["event"] == "redis_unavailable_at_start" for e in logged) >= 2

            await wait_for(refused_twice, "two tries refused with BUSY, the connect still waiting", within=10)
        assert all("BUSY" in e["error"] for e in logged if e["event"] == "redis_unavailable_at_start")
    finally:
        while thread.is_alive():
            with contextlib.suppress(redis.ResponseError):
                admin.script_kill()
            thread.join(0.05)
        admin.config_set("busy-reply-threshold", 5000)
    client = await asyncio.wait_for(connecting, 10)
    assert await client.ping()
    await client.aclose()
    blocker.close()
    admin.close()


def _busy(admin: redis.Redis) -> bool:
    try:
        admin.ping()
    except redis.exceptions.BusyLoadingError:
        return False
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False
