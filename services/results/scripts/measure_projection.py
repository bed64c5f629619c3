"""Rough projector throughput: pre-fill an events stream, then time one Projector catching up.

Not a test and not the README benchmark (bench/ owns those): a quick figure for this machine.
Starts a private Redis (AOF everysec) and PostgreSQL (fsync on) from the system binaries.

    .venv/bin/python services/results/scripts/measure_projection.py [jobs] [batch_size] [--spread]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import uvloop

from conveyor.common.devstack.servers import PostgresServer, RedisServer
from conveyor.common.ids import new_ulid
from conveyor.common.keys import QUEUES, queue_keys
from conveyor.common.redis import make_redis
from conveyor.results.projector import Projector
from conveyor.results.store import Store, open_pool
from conveyor.v1 import event_pb2, job_pb2

PAYLOAD = json.dumps({"data": "x" * 86}).encode()  # 100 bytes, as in the DESIGN.md budgets


def job_events(t: int) -> list[tuple[str, bytes]]:
    """QUEUED, ACTIVE, SUCCEEDED of one job: what a no-op handler leaves in the stream."""
    ulid = new_ulid()
    # As Redis keeps them (ADR 0001): no job id in events, no id or queue in the job.
    job = job_pb2.Job(type="demo.noop", priority=5)
    job.created_at.FromSeconds(t)
    queued = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_QUEUED, job=job)
    active = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_ACTIVE, attempt=1, worker="w")
    done = event_pb2.JobEvent(
        type=event_pb2.EVENT_TYPE_SUCCEEDED, attempt=1, worker="w", result_json=b'{"ok":true}', job=job
    )
    done.job.payload_json = PAYLOAD
    for e in (queued, active, done):
        e.time.FromSeconds(t)
    return [(ulid, e.SerializeToString()) for e in (queued, active, done)]


async def measure(jobs: int, batch_size: int, spread: bool) -> None:
    with RedisServer() as redis_server, PostgresServer() as pg:
        redis = make_redis(redis_server.url)
        blocking = make_redis(redis_server.url, blocking=True)
        stream = queue_keys("bench").events
        await redis.sadd(QUEUES, "bench")  # type: ignore[misc]
        t = int(time.time())
        lives = [job_events(t) for _ in range(jobs)]
        # Adjacent: each job's three events follow each other (a batch folds 3 events per row).
        # Spread: every QUEUED, then every ACTIVE, then every SUCCEEDED (one row per event, the worst case).
        order = (
            [e for i in range(3) for e in (life[i] for life in lives)]
            if spread
            else [e for life in lives for e in life]
        )
        for start in range(0, len(order), 3000):
            async with redis.pipeline(transaction=False) as pipe:
                for ulid, data in order[start : start + 3000]:
                    pipe.xadd(stream, {b"j": ulid.encode(), b"e": data})
                await pipe.execute()
        total = await redis.xlen(stream)
        pool = await open_pool(pg.url, 4)
        store = Store(pool)
        await store.migrate()
        projector = Projector(redis, blocking, store, consumer="bench", batch_size=batch_size, block_ms=100)
        stop = asyncio.Event()
        started = time.perf_counter()
        cpu = time.process_time()
        task = asyncio.create_task(projector.run(stop))
        while projector.projected < total:  # noqa: ASYNC110 - polling a counter is the measurement
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu_used = time.process_time() - cpu
        stop.set()
        await task
        print(
            f"{total} events ({jobs} jobs) in {elapsed:.2f} s: {total / elapsed:,.0f} events/s, "
            f"{jobs / elapsed:,.0f} jobs/s; results process CPU {cpu_used / total * 1e6:.1f} us/event "
            f"(batch_size={batch_size}, {'spread' if spread else 'adjacent'})"
        )
        await pool.close()
        await redis.aclose()
        await blocking.aclose()


if __name__ == "__main__":
    spread = "--spread" in sys.argv
    args = [int(a) for a in sys.argv[1:] if not a.startswith("--")]
    uvloop.run(measure(args[0] if args else 50_000, args[1] if len(args) > 1 else 1000, spread))
