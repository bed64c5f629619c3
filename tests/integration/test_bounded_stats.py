"""Queue stats count delayed and retry-scheduled jobs with ZCARD, not by reading every waiting job (issue #10 item 8).

Real Redis and gRPC: the retrying zset follows retry-scheduled jobs in (complete), out when
due (claim) and out when cancelled, and GetQueueStats costs the same for 2,000 delayed jobs
as for two (checked with Redis's own command counters).
"""

from __future__ import annotations

import redis.asyncio
from google.protobuf import duration_pb2

from conveyor.common.keys import queue_keys
from conveyor.v1 import admin_service_pb2 as a
from conveyor.v1 import job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, StartWorker
from tests.integration.test_producer_worker import enqueue
from tests.support.wait import wait_for

QUEUE = "bounded-stats"
KEYS = queue_keys(QUEUE)
HOUR = duration_pb2.Duration(seconds=3600)


def _retry(base: duration_pb2.Duration, attempts: int = 3) -> job_pb2.RetryPolicy:
    return job_pb2.RetryPolicy(max_attempts=attempts, backoff=job_pb2.BACKOFF_FIXED, base=base)


async def _stats(producer: Producer) -> a.QueueStats:
    return (await producer.admin.GetQueueStats(a.GetQueueStatsRequest(queue=QUEUE))).stats


async def _state(producer: Producer, job_id: str) -> int:
    return (await producer.stub.GetJob(p.GetJobRequest(job_id=job_id))).job.state


async def test_delayed_and_retry_scheduled_counts_follow_the_jobs(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    delayed = [await enqueue(producer, "test.count", queue=QUEUE, delay=HOUR) for _ in range(3)]
    await start_worker(queues=(QUEUE,))
    failing = [
        await enqueue(producer, "demo.fail", queue=QUEUE, payload={"message": "later"}, retry=_retry(HOUR))
        for _ in range(2)
    ]

    async def both_scheduled() -> bool:
        states = [await _state(producer, j.job_id) for j in failing]
        return all(s == job_pb2.JOB_STATE_RETRY_SCHEDULED for s in states)

    await wait_for(both_scheduled, "both failing jobs to be retry-scheduled")
    stats = await _stats(producer)
    assert (stats.delayed, stats.retry_scheduled) == (3, 2)
    assert await redis_client.zcard(KEYS.retrying) == 2

    await producer.stub.CancelJob(p.CancelJobRequest(job_id=failing[0].job_id))
    await producer.stub.CancelJob(p.CancelJobRequest(job_id=delayed[0].job_id))
    stats = await _stats(producer)
    assert (stats.delayed, stats.retry_scheduled) == (2, 1)
    members = await redis_client.zrange(KEYS.retrying, 0, -1)
    assert members == [failing[1].job_id.split("/")[1].encode()]


async def test_a_retry_that_comes_due_leaves_the_retry_count(
    producer: Producer, start_worker: StartWorker, redis_client: redis.asyncio.Redis
) -> None:
    await start_worker(queues=(QUEUE,))
    quick = duration_pb2.Duration(nanos=200_000_000)
    job = await enqueue(producer, "test.flaky", queue=QUEUE, payload={"succeed_on": 2}, retry=_retry(quick))

    async def succeeded() -> bool:
        return await _state(producer, job.job_id) == job_pb2.JOB_STATE_SUCCEEDED

    await wait_for(succeeded, "the flaky job to succeed on its retry")
    assert await redis_client.zcard(KEYS.retrying) == 0
    stats = await _stats(producer)
    assert (stats.delayed, stats.retry_scheduled) == (0, 0)


async def _command_calls(client: redis.asyncio.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def test_stats_cost_does_not_grow_with_the_delayed_jobs(
    producer: Producer, redis_client: redis.asyncio.Redis
) -> None:
    async def cost() -> dict[str, int]:
        before = await _command_calls(redis_client)
        await _stats(producer)
        after = await _command_calls(redis_client)
        return {cmd: n - before.get(cmd, 0) for cmd, n in after.items() if n != before.get(cmd, 0)}

    await enqueue(producer, "test.count", queue=QUEUE, delay=HOUR)
    await enqueue(producer, "test.count", queue=QUEUE, delay=HOUR)
    small = await cost()
    for _ in range(2):
        batch = [p.EnqueueRequest(queue=QUEUE, type="test.count", delay=HOUR) for _ in range(999)]
        await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=batch))
    assert (await _stats(producer)).delayed == 2000
    large = await cost()
    # The same commands, as many times (INFO itself and the stats' worker-registry reads included).
    assert large == small, (small, large)
    assert "hmget" not in large
