"""A worker whose Redis refuses work (full, READONLY) keeps every job and tells the truth on health.

Real processes: a worker, the producer and the results service on one private Redis, a few
hundred jobs in flight. Redis is made to refuse writes for a while: the worker's loops retry
instead of dying, its health says NOT_SERVING while they cannot make progress, and once Redis
takes writes again every job ends with exactly one outcome and one PostgreSQL row, nothing stays
pending, and health is SERVING again without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import grpc
import psycopg
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common.client import ConveyorClient
from conveyor.common.keys import WORKER_GROUP, queue_keys
from tests.faults.conftest import QUEUE, FaultStack, StartWorker
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
JOBS = 300


async def _health(process: ServiceProcess) -> int:
    async with grpc.aio.insecure_channel(process.addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
        return int(reply.status)


async def _final_rows(stack: FaultStack) -> tuple[int, int]:
    async with await psycopg.AsyncConnection.connect(stack.database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT job_id) FROM jobs WHERE queue = %s AND state = 5", (QUEUE,)
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


async def _pending(r: redis.asyncio.Redis) -> int:
    keys = queue_keys(QUEUE)
    total = 0
    for stream in (*keys.bands, keys.admitted):
        with contextlib.suppress(redis.ResponseError):
            total += int((await r.xpending(stream, WORKER_GROUP))["pending"])
    return total


async def _refuse_then_recover(
    stack: FaultStack,
    worker_process: StartWorker,
    refuse: Callable[[redis.asyncio.Redis], Awaitable[object]],
    recover: Callable[[redis.asyncio.Redis], Awaitable[object]],
) -> None:
    r = redis.asyncio.Redis.from_url(stack.redis.url)
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
        await conn.execute("DELETE FROM jobs WHERE queue = %s", (QUEUE,))
    worker = worker_process("refused", CONVEYOR_UNHEALTHY_AFTER_SECONDS="0.5", CONVEYOR_CONCURRENCY="20")
    try:
        async with ConveyorClient(stack.producer.addr) as client:
            ids = [
                j.job_id
                for j in await client.enqueue_batch(
                    [
                        client.request(QUEUE, "test.observe", {"redis": stack.redis.url, "sleep": 0.05})
                        for _ in range(JOBS)
                    ]
                )
            ]
        assert len(ids) == JOBS

        async def some_done() -> bool:
            return int(await r.llen(f"obs:{QUEUE}:done")) >= 20

        await wait_for(some_done, "the first jobs to finish", within=30)
        await refuse(r)
        try:

            async def not_serving() -> bool:
                return await _health(worker) == health_pb2.HealthCheckResponse.NOT_SERVING

            await wait_for(not_serving, "the worker to say NOT_SERVING while Redis refuses writes", within=30)
            assert worker.proc is not None and worker.proc.poll() is None, "the worker died"
        finally:
            await recover(r)

        async def all_projected() -> bool:
            return await _final_rows(stack) == (JOBS, JOBS)

        await wait_for(all_projected, "every job to have one SUCCEEDED row in PostgreSQL", within=90, interval=0.2)

        async def serving() -> bool:
            return await _health(worker) == health_pb2.HealthCheckResponse.SERVING

        await wait_for(serving, "the worker to be SERVING again", within=30)
        assert await _pending(r) == 0
        assert "loop_crashed" not in worker.log_text()
    finally:
        await r.delete(f"obs:{QUEUE}:done", f"obs:{QUEUE}:starts", f"obs:{QUEUE}:levels", f"obs:{QUEUE}:running")
        await r.aclose()


async def test_redis_full_then_freed(fault_stack: FaultStack, worker_process: StartWorker) -> None:
    async def full(r: redis.asyncio.Redis) -> None:
        await r.config_set("maxmemory", 1)

    async def freed(r: redis.asyncio.Redis) -> None:
        await r.config_set("maxmemory", 0)

    await _refuse_then_recover(fault_stack, worker_process, full, freed)


async def test_redis_made_a_replica_then_promoted(fault_stack: FaultStack, worker_process: StartWorker) -> None:
    async def demoted(r: redis.asyncio.Redis) -> None:
        await r.execute_command("REPLICAOF", "127.0.0.1", "1")

    async def promoted(r: redis.asyncio.Redis) -> None:
        await asyncio.sleep(0)  # keep the signature awaitable for both
        await r.execute_command("REPLICAOF", "NO", "ONE")

    await _refuse_then_recover(fault_stack, worker_process, demoted, promoted)
