"""Workers whose Redis refuses work keep every job and tell the truth on health (issue 10, item 10).

Real processes: two workers, the producer and the results service on one private Redis, a few
hundred jobs in flight, with per-key concurrency caps in force. Redis is driven into one fault
at a time with its own commands: full (maxmemory), demoted to a replica (READONLY), a long
script (BUSY), its scripts flushed, every client connection killed three times, writes paused.
After each: every job has exactly one SUCCEEDED row in PostgreSQL, nothing is pending, no cap
slot is leaked, both workers are still the same processes and SERVING, and where the fault
lasted, the workers said NOT_SERVING meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable

import grpc
import psycopg
import pytest
import redis
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.common.client import ConveyorClient
from conveyor.common.keys import WORKER_GROUP, queue_keys
from tests.faults.conftest import QUEUE, FaultStack, StartWorker
from tests.support.processes import ServiceProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
JOBS = 300
#: Short, so each test also sees every job's live data leave Redis and memory back to baseline.
RETENTION_SECONDS = 3
#: What Redis may keep above the baseline once the jobs are gone (stream and group bookkeeping, limits).
MEMORY_SLACK = 64 * 1024
KEYS = 10
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: Drives Redis into a fault and out of it again; gets the test's workers to watch their health.
Fault = Callable[[redis.asyncio.Redis, str, list[ServiceProcess]], Awaitable[None]]


async def _health(process: ServiceProcess) -> int:
    async with grpc.aio.insecure_channel(process.addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
        return int(reply.status)


async def _until_not_serving(workers: list[ServiceProcess]) -> None:
    async def said() -> bool:
        return any([await _health(w) == NOT_SERVING for w in workers])

    await wait_for(said, "a worker to say NOT_SERVING while Redis refuses work", within=30)


async def _full(r: redis.asyncio.Redis, url: str, workers: list[ServiceProcess]) -> None:
    await r.config_set("maxmemory", 1)
    try:
        await _until_not_serving(workers)
    finally:
        await r.config_set("maxmemory", 0)


async def _replica(r: redis.asyncio.Redis, url: str, workers: list[ServiceProcess]) -> None:
    # A replica of a primary that is not there keeps its data and refuses writes, as a demoted
    # primary does after a failover.
    await r.execute_command("REPLICAOF", "127.0.0.1", "1")
    try:
        await _until_not_serving(workers)
    finally:
        await r.execute_command("REPLICAOF", "NO", "ONE")


async def _busy(r: redis.asyncio.Redis, url: str, workers: list[ServiceProcess]) -> None:
    await r.config_set("busy-reply-threshold", 50)
    blocker = redis.Redis.from_url(url, socket_timeout=60)
    thread = threading.Thread(target=_spin_forever, args=(blocker,))
    thread.start()
    try:
        await _until_not_serving(workers)
    finally:
        killer = redis.Redis.from_url(url)

        def kill() -> None:
            while thread.is_alive():
                with contextlib.suppress(redis.ResponseError):
                    killer.script_kill()
                thread.join(0.05)

        await asyncio.to_thread(kill)
        killer.close()
        blocker.close()
        await r.config_set("busy-reply-threshold", 5000)


def _spin_forever(client: redis.Redis) -> None:
    with contextlib.suppress(redis.ResponseError):  # "Script killed by user"
        client.eval("local i = 0 while true do i = i + 1 end", 0)


async def _flush_scripts(r: redis.asyncio.Redis, url: str, workers: list[ServiceProcess]) -> None:
    for _ in range(10):
        await r.script_flush()
        await asyncio.sleep(0.05)


async def _kill_clients(r: redis.asyncio.Redis, url: str, workers: list[ServiceProcess]) -> None:
    for _ in range(3):
        await r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await asyncio.sleep(0.3)


async def _pause_writes(r: redis.asyncio.Redis, url: str, workers: list[ServiceProcess]) -> None:
    # Writes wait (clients see timeouts after 5 s), then all go through.
    await r.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
    await asyncio.sleep(5.5)


FAULTS: dict[str, tuple[Fault, bool]] = {
    "redis_full_then_freed": (_full, True),
    "replica_then_promoted": (_replica, True),
    "busy_script_then_killed": (_busy, True),
    "script_flush_under_load": (_flush_scripts, False),
    "client_kill_three_times": (_kill_clients, False),
    "client_pause_write_5s": (_pause_writes, False),
}


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


async def _until_no_job_data(r: redis.asyncio.Redis) -> None:
    keys = queue_keys(QUEUE)

    async def gone() -> bool:
        left = [int(await r.hlen(keys.state)), int(await r.zcard(keys.done)), int(await r.xlen(keys.events))]
        return not any(left)

    await wait_for(gone, "every job's live data to leave Redis after the retention", within=60, interval=0.2)


async def _biggest(r: redis.asyncio.Redis) -> list[tuple[int, str]]:
    sizes = [(int(await r.memory_usage(k) or 0), k.decode()) async for k in r.scan_iter(count=1000)]
    return sorted(sizes, reverse=True)[:8]


async def _used_memory(r: redis.asyncio.Redis) -> int:
    """Bytes all keys hold (MEMORY USAGE): what grows with jobs, leaving out what Redis needs
    whatever its data (client buffers, the Lua VM and script cache, a REPLICAOF's backlog)."""
    return sum([int(await r.memory_usage(k) or 0) async for k in r.scan_iter(count=1000)])


async def _running_in_cap_sets(r: redis.asyncio.Redis) -> int:
    prefix = queue_keys(QUEUE).per_key_prefix
    return sum([int(await r.scard(key)) async for key in r.scan_iter(match=f"{prefix}run:*")])


#: The in-process producer tests (test_redis_refusing.py) cover every fault quickly; these run the
#: slower ones with real worker processes only under CONVEYOR_SLOW=1 to keep the default suite short.
_SLOW = {"busy_script_then_killed", "script_flush_under_load", "client_pause_write_5s"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in FAULTS])
async def test_workers_survive(name: str, fault_stack: FaultStack, worker_process: StartWorker) -> None:
    fault, lasts = FAULTS[name]
    stack = fault_stack
    r = redis.asyncio.Redis.from_url(stack.redis.url)
    await r.delete(*[f"obs:{QUEUE}:{k}" for k in ("done", "starts", "levels", "running")])
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
        await conn.execute("DELETE FROM jobs WHERE queue = %s", (QUEUE,))
    await _until_no_job_data(r)
    baseline = await _used_memory(r)
    fast = {"CONVEYOR_UNHEALTHY_AFTER_SECONDS": "0.5", "CONVEYOR_CONCURRENCY": "20"}
    workers = [worker_process(f"{name}-{i}", **fast) for i in range(2)]
    pids = [w.proc.pid for w in workers if w.proc is not None]
    try:
        async with ConveyorClient(stack.producer.addr) as client:
            await client.set_concurrency_limit(QUEUE, 4, each_key=True)
            requests = [
                client.request(
                    QUEUE,
                    "test.observe",
                    {"redis": stack.redis.url, "sleep": 0.05},
                    rate_key=f"k{i % KEYS}",
                    idempotency_key="",  # no keys to outlive the jobs: memory must come back
                )
                for i in range(JOBS)
            ]
            assert len(await client.enqueue_batch(requests)) == JOBS

            async def some_done() -> bool:
                return int(await r.llen(f"obs:{QUEUE}:done")) >= 20

            await wait_for(some_done, "the first jobs to finish", within=30)
            await fault(r, stack.redis.url, workers)

            async def all_projected() -> bool:
                return await _final_rows(stack) == (JOBS, JOBS)

            await wait_for(all_projected, "one SUCCEEDED row per job in PostgreSQL", within=120, interval=0.2)

            async def all_serving() -> bool:
                return all([await _health(w) == SERVING for w in workers])

            await wait_for(all_serving, "both workers SERVING again", within=30)
            assert await _pending(r) == 0, "entries left pending"
            assert await _running_in_cap_sets(r) == 0, "a concurrency-cap slot leaked"
            assert [w.proc.pid for w in workers if w.proc is not None and w.proc.poll() is None] == pids
            for w in workers:
                assert "loop_crashed" not in w.log_text(), w.log_tail()
            if lasts:
                assert any("health_not_serving" in w.log_text() for w in workers)
            await client.clear_concurrency_limit(QUEUE, each_key=True)
        # Every job's record, events and expiry entry leave Redis once projected plus the retention.
        await r.delete(*[f"obs:{QUEUE}:{k}" for k in ("done", "starts", "levels", "running")])
        await _until_no_job_data(r)
        above = await _used_memory(r) - baseline
        assert above <= MEMORY_SLACK, f"Redis holds {above} bytes more than before the jobs: {await _biggest(r)}"
    finally:
        await r.aclose()
