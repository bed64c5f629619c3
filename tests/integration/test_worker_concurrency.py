"""Concurrency is a hard limit per worker, across all its queues and maintenance (issue #10 item 5).

A slot is reserved before the claim (or reclaim, or recovery) that fills it; these tests run
a real Runner on real Redis and sample how many handlers run at once, throughout.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis.asyncio

from conveyor.common.keys import queue_keys
from conveyor.common.scripts import Scripts
from conveyor.v1 import job_pb2
from tests.integration.conftest import Producer, StartWorker
from tests.integration.test_producer_worker import enqueue
from tests.support import handlers as test_handlers
from tests.support.wait import wait_for

QUEUES = ("cc-a", "cc-b", "cc-c")
tracker = test_handlers.tracker


@pytest.fixture(autouse=True)
def _fresh_tracker() -> None:
    tracker.clear()


async def _sample(level: list[int], busy: list[int], runner_busy: object, stop: asyncio.Event) -> None:
    """Sample the handlers running (and the worker's slots in use) until ``stop``, as often as the loop allows."""
    while not stop.is_set():
        level.append(tracker.running["all"])
        busy.append(runner_busy())  # type: ignore[operator]
        await asyncio.sleep(0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.002)


async def test_three_queues_and_reclaims_never_run_more_than_the_concurrency(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    scripts = Scripts(redis_client)
    total = 0
    # Stale claims for maintenance to take over: a worker that died holding 4 jobs per queue.
    for q in QUEUES:
        for _ in range(4):
            await enqueue(producer, "test.tracked_async", queue=q, payload={"group": "all", "sleep": 0.05})
        ghost = await scripts.claim(queue_keys(q), "ghost-worker", 4)
        assert len(ghost.claimed) == 4
        total += 4
    # And plenty of fresh work on every queue, sync and async handlers alike.
    for q in QUEUES:
        for i in range(30):
            kind = "test.tracked_sync" if i % 2 else "test.tracked_async"
            await enqueue(producer, kind, queue=q, payload={"group": "all", "sleep": 0.02 + (i % 3) * 0.01})
            total += 1

    worker = await start_worker(queues=QUEUES, concurrency=5, visibility_timeout_s=0.5)
    levels: list[int] = []
    busy: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(levels, busy, lambda: worker.runner.slots.busy, stop))
    try:
        await wait_for(lambda: _ended(total), f"all {total} jobs to run", within=60)
    finally:
        stop.set()
        await sampler
    assert len(levels) > 100  # sampled throughout, not once
    assert max(levels) <= 5, f"up to {max(levels)} handlers ran at once on a worker of concurrency 5"
    assert max(busy) <= 5, f"up to {max(busy)} slots were in use or reserved"
    assert tracker.most("all") <= 5
    assert tracker.most("all") == 5  # the limit was reached, so it was tested
    # The dead worker's jobs were taken over by maintenance and ran under the same limit.
    for q in QUEUES:
        assert await redis_client.xpending(queue_keys(q).band(5), "workers") == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }
    await wait_for(lambda: _idle(worker.runner.slots), "every slot to come back")


async def _ended(n: int) -> bool:
    return tracker.ended["all"] >= n


async def _idle(slots: object) -> bool:
    return getattr(slots, "busy", None) == 0


async def test_recovery_after_a_restart_starts_no_more_than_the_concurrency(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    """A worker restarted under the same id finds more of its own claims than it has slots: it
    starts only as many as it has slots, and runs the rest later (none is lost)."""
    scripts = Scripts(redis_client)
    jobs = [
        await enqueue(producer, "test.tracked_sync", queue="cc-r", payload={"group": "all", "sleep": 0.05})
        for _ in range(12)
    ]
    held = await scripts.claim(queue_keys("cc-r"), "test-worker-1", 12)
    assert len(held.claimed) == 12
    worker = await start_worker(queues=("cc-r",), concurrency=3)
    assert worker.settings.worker_id == "test-worker-1"
    await wait_for(lambda: _ended(12), "the 12 recovered jobs to run", within=30)
    assert tracker.most("all") <= 3
    for job in jobs:
        got = await wait_for(lambda j=job: _final(producer, j.job_id), f"{job.job_id} to succeed")
        assert got == job_pb2.JOB_STATE_SUCCEEDED


async def _final(producer: Producer, job_id: str) -> int:
    from conveyor.v1 import producer_service_pb2 as p

    state = (await producer.stub.GetJob(p.GetJobRequest(job_id=job_id))).job.state
    return state if state in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED) else 0
