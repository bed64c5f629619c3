"""Idle queues leave the queue registry and come back on their next enqueue (issue #10 item 8).

Real Redis, a real producer over gRPC and in-process workers. The registration TTL and idle
time are shrunk (0.2 s, 0.5 s) so that a queue becomes idle within the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from google.protobuf import duration_pb2

from conveyor.common import queue_registry
from conveyor.common.keys import QUEUES, QUEUES_TOUCHED, queue_keys
from conveyor.common.queue_registry import QueueRegistry, QueueSweeper
from conveyor.results.store import Store
from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import job_pb2, limits_pb2
from conveyor.v1 import producer_service_pb2 as p
from conveyor.v1 import schedule_service_pb2 as s
from tests.integration.conftest import Producer, StartWorker, start_producer
from tests.integration.results.conftest import StartProjector, pool, results_db, start_projector, store
from tests.integration.test_producer_worker import enqueue
from tests.support import handlers as test_handlers
from tests.support.wait import wait_for

__all__ = ["pool", "results_db", "start_projector", "store"]  # fixtures of the results tests, used here

TTL_S = 0.2
IDLE_S = 0.5
ONCE = job_pb2.RetryPolicy(max_attempts=1)


@pytest.fixture
async def quick_producer(
    redis_client: redis.asyncio.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Producer]:
    """A producer whose registrations are trusted for TTL_S only."""
    monkeypatch.setattr(queue_registry, "REGISTRATION_TTL_S", TTL_S)
    producer, stop = await start_producer(redis_url)
    yield producer
    await stop()


@pytest.fixture
def sweeper(redis_client: redis.asyncio.Redis) -> QueueSweeper:
    return QueueSweeper(redis_client, idle_s=IDLE_S, interval_s=0.1, registration_ttl_s=TTL_S)


async def _registered(client: redis.asyncio.Redis, queue: str) -> bool:
    return bool(await client.sismember(QUEUES, queue))  # type: ignore[misc]


async def _state(producer: Producer, job_id: str) -> int:
    return (await producer.stub.GetJob(p.GetJobRequest(job_id=job_id))).job.state


async def test_an_idle_queue_leaves_the_registry_and_its_next_enqueue_brings_it_back(
    quick_producer: Producer,
    start_worker: StartWorker,
    sweeper: QueueSweeper,
    redis_client: redis.asyncio.Redis,
    store: Store,
    start_projector: StartProjector,
) -> None:
    queue = "idle-then-back"
    # A real results projector reads the queue's events: a queue whose events are not projected stays.
    await start_projector(store)
    worker = await start_worker(queues=(queue,))
    job = await enqueue(quick_producer, "test.count", queue=queue)
    assert await _registered(redis_client, queue)
    assert await redis_client.zscore(QUEUES_TOUCHED, queue) is not None

    async def succeeded() -> bool:
        return await _state(quick_producer, job.job_id) == job_pb2.JOB_STATE_SUCCEEDED

    await wait_for(succeeded, "the job to run")
    await worker.stop()  # ListQueues also lists the queues a live worker serves

    why = ""

    async def forgotten() -> bool:
        nonlocal why
        done, why = await sweeper.forget(queue)
        return done

    await wait_for(forgotten, "the idle queue to be forgotten", interval=0.1)
    assert why == "forgotten"
    assert not await _registered(redis_client, queue)
    assert await redis_client.zscore(QUEUES_TOUCHED, queue) is None
    listed = await quick_producer.admin.ListQueues(a.ListQueuesRequest())
    assert queue not in {q.queue for q in listed.queues}
    # GetJob of its finished job still answers: only the registry entry went.
    assert await _state(quick_producer, job.job_id) == job_pb2.JOB_STATE_SUCCEEDED

    again = await enqueue(quick_producer, "test.count", queue=queue)
    assert await _registered(redis_client, queue), "the next enqueue registers it again"
    listed = await quick_producer.admin.ListQueues(a.ListQueuesRequest())
    assert queue in {q.queue for q in listed.queues}
    await start_worker(queues=(queue,))

    async def ran_again() -> bool:
        return await _state(quick_producer, again.job_id) == job_pb2.JOB_STATE_SUCCEEDED

    await wait_for(ran_again, "the job enqueued after the queue came back to run")


async def test_a_queue_with_anything_left_stays_registered(
    quick_producer: Producer, start_worker: StartWorker, sweeper: QueueSweeper, redis_client: redis.asyncio.Redis
) -> None:
    hour = duration_pb2.Duration(seconds=3600)
    await enqueue(quick_producer, "test.count", queue="keeps-queued")
    await enqueue(quick_producer, "test.count", queue="keeps-delayed", delay=hour)
    await enqueue(quick_producer, "test.count", queue="keeps-paused", delay=hour)
    await quick_producer.stub.CancelJob(
        p.CancelJobRequest(job_id=(await enqueue(quick_producer, "test.count", queue="keeps-paused")).job_id)
    )
    await quick_producer.admin.PauseQueue(a.PauseQueueRequest(queue="keeps-paused"))
    await enqueue(quick_producer, "test.count", queue="keeps-limits", delay=hour)
    await quick_producer.admin.SetConcurrencyLimit(limits_pb2.SetConcurrencyLimitRequest(queue="keeps-limits", limit=3))
    running = await enqueue(quick_producer, "test.gate", queue="keeps-running")
    dead = await enqueue(quick_producer, "demo.fail", queue="keeps-dead", payload={"message": "no"}, retry=ONCE)
    await start_worker(queues=("keeps-running", "keeps-dead"))

    async def settled() -> bool:
        return (
            await _state(quick_producer, running.job_id) == job_pb2.JOB_STATE_ACTIVE
            and await _state(quick_producer, dead.job_id) == job_pb2.JOB_STATE_FAILED
        )

    await wait_for(settled, "one job running and one dead-lettered")
    # A queue that is empty but whose events the results service has not read yet.
    await enqueue(quick_producer, "test.count", queue="keeps-events")
    events = queue_keys("keeps-events")
    # (enqueue.lua made the results group; nothing has read it in this test)
    await redis_client.delete(*events.bands)  # its only job, gone: only the events are left

    expected = {
        "keeps-queued": "jobs queued or running",
        "keeps-delayed": "jobs delayed or retry-scheduled",
        "keeps-paused": "jobs delayed or retry-scheduled",
        "keeps-limits": "jobs delayed or retry-scheduled",
        "keeps-running": "jobs queued or running",
        "keeps-dead": "dead letters",
        "keeps-events": "events not yet projected",
    }

    async def all_past_idle() -> bool:
        touched = [await redis_client.zscore(QUEUES_TOUCHED, q) for q in expected]
        now_s, now_us = await redis_client.time()
        return all(t is not None and t < now_s * 1000 + now_us // 1000 - IDLE_S * 1000 for t in touched)

    await wait_for(all_past_idle, "every queue to be past its idle time", interval=0.1)
    assert not set(await sweeper.sweep()) & set(expected)
    reasons = {q: (await sweeper.forget(q))[1] for q in expected}
    assert reasons == expected
    # Take the delayed jobs away one condition at a time: the pause and the limits still keep theirs.
    for q in ("keeps-paused", "keeps-limits"):
        await redis_client.delete(queue_keys(q).delayed)
    assert (await sweeper.forget("keeps-paused"))[1] == "paused"
    assert (await sweeper.forget("keeps-limits"))[1] == "flow-control settings"
    assert all([await _registered(redis_client, q) for q in expected])
    test_handlers.gate.set()


async def test_a_recently_enqueued_queue_is_not_forgotten(
    quick_producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    # Idle longer than a producer trusts its cache: a queue registered within it stays.
    patient = QueueSweeper(redis_client, idle_s=3600, registration_ttl_s=TTL_S)
    await start_worker(queues=("fresh",))
    job = await enqueue(quick_producer, "test.count", queue="fresh")

    async def succeeded() -> bool:
        return await _state(quick_producer, job.job_id) == job_pb2.JOB_STATE_SUCCEEDED

    await wait_for(succeeded, "the job to run")
    assert await patient.forget("fresh") == (False, "recently enqueued to")
    assert await _registered(redis_client, "fresh")


async def test_a_queue_a_schedule_enqueues_to_stays(
    quick_producer: Producer, sweeper: QueueSweeper, redis_client: redis.asyncio.Redis
) -> None:
    template = p.EnqueueRequest(queue="scheduled-only", type="test.count")
    spec = s.ScheduleSpec(interval=duration_pb2.Duration(seconds=3600), template=template)
    await quick_producer.schedules.CreateSchedule(s.CreateScheduleRequest(schedule_id="idle-test", spec=spec))
    await redis_client.sadd(QUEUES, "scheduled-only")  # type: ignore[misc]  # registered long ago: no stamp
    assert "scheduled-only" in await sweeper.scheduled_queues()
    assert "scheduled-only" not in await sweeper.sweep()
    assert await _registered(redis_client, "scheduled-only")
    await quick_producer.schedules.DeleteSchedule(s.DeleteScheduleRequest(schedule_id="idle-test"))
    assert "scheduled-only" in await sweeper.sweep()


def test_the_idle_time_must_be_longer_than_the_registration_ttl(redis_client: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError, match="must be longer than the registration TTL"):
        QueueSweeper(redis_client, idle_s=30, registration_ttl_s=30)


async def test_the_registration_cache_is_bounded(redis_client: redis.asyncio.Redis) -> None:
    registry = QueueRegistry(redis_client, ttl_s=60, max_cached=3)
    for i in range(10):
        await registry.register(f"bounded-cache-{i}")
    assert len(registry._until) <= 3
    assert all([await _registered(redis_client, f"bounded-cache-{i}") for i in range(10)])


async def test_the_sweep_loop_forgets_idle_queues_until_stopped(
    sweeper: QueueSweeper, redis_client: redis.asyncio.Redis
) -> None:
    await redis_client.sadd(QUEUES, "swept-by-the-loop")  # type: ignore[misc]  # registered long ago: no stamp
    stop = asyncio.Event()
    loop = asyncio.create_task(sweeper.run(stop))
    try:

        async def gone() -> bool:
            return not await _registered(redis_client, "swept-by-the-loop")

        await wait_for(gone, "the sweep loop to forget the queue", interval=0.05)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)
