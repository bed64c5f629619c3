"""The results projector still projects a queue that left the registry (idle) and came back.

Real Redis, PostgreSQL, producer, worker and projector. A projector started after the queue
was forgotten cannot know it; the queue's next enqueue registers it again, and the projector
discovers it on its next refresh and projects the new job's outcome.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio

from conveyor.common import queue_registry
from conveyor.common.keys import QUEUES
from conveyor.common.queue_registry import QueueSweeper
from conveyor.results.store import Store
from conveyor.v1 import job_pb2, results_service_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker, start_producer
from tests.integration.results.conftest import ResultsClient, StartProjector
from tests.integration.test_producer_worker import enqueue
from tests.support.wait import wait_for

TTL_S = 0.2
IDLE_S = 0.5


@pytest.fixture
async def quick_producer(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Producer]:
    monkeypatch.setattr(queue_registry, "REGISTRATION_TTL_S", TTL_S)
    producer, stop = await start_producer(redis_url)
    yield producer
    await stop()


async def _projected(results: ResultsClient, job_id: str) -> bool:
    try:
        got = await results.stub.GetJob(results_service_pb2.ResultsServiceGetJobRequest(job_id=job_id))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise
    return got.job.state == job_pb2.JOB_STATE_SUCCEEDED


async def _run_and_forget(
    queue: str, producer: Producer, results: ResultsClient, redis_client: redis.asyncio.Redis
) -> p.EnqueueResponse:
    job = await enqueue(producer, "test.count", queue=queue)
    await wait_for(lambda: _projected(results, job.job_id), "the first job in PostgreSQL", within=20)
    sweeper = QueueSweeper(redis_client, idle_s=IDLE_S, interval_s=0.1, registration_ttl_s=TTL_S)

    async def forgotten() -> bool:
        return (await sweeper.forget(queue))[0]

    await wait_for(forgotten, "the idle queue to leave the registry", within=20, interval=0.1)
    assert not await redis_client.sismember(QUEUES, queue)  # type: ignore[misc]
    return job


@pytest.mark.parametrize("fresh_projector", [True, False], ids=["projector-started-after", "projector-kept-running"])
async def test_a_queue_that_comes_back_is_projected_again(
    fresh_projector: bool,
    quick_producer: Producer,
    start_worker: StartWorker,
    store: Store,
    start_projector: StartProjector,
    results: ResultsClient,
    redis_client: redis.asyncio.Redis,
) -> None:
    queue = f"comes-back-{int(fresh_projector)}"
    await start_worker(queues=(queue,))
    first = await start_projector(store)
    await _run_and_forget(queue, quick_producer, results, redis_client)
    if fresh_projector:
        await first.stop()
        await start_projector(store)  # knows nothing of the forgotten queue

    again = await enqueue(quick_producer, "test.count", queue=queue)
    assert await redis_client.sismember(QUEUES, queue)  # type: ignore[misc]
    await wait_for(lambda: _projected(results, again.job_id), "the job after the comeback in PostgreSQL", within=20)
