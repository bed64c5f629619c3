"""EnqueueBatch is atomic per queue, not across queues (ADR 0014), and says which jobs it accepted.

A private Redis is left with little room, and a batch goes to two queues: the first queue's few
small jobs fit and are written; the second queue's jobs are large, and while Redis holds their
call's arguments it is over maxmemory, so that call is refused with OOM before it writes anything
(Redis counts a client's query buffer as used memory). The response names exactly the jobs
accepted and the error of the others; retrying the whole batch with the same idempotency keys
adds only the missing jobs. The Python client raises PartiallyEnqueued with the same facts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio

from conveyor.common.client import ConveyorClient, PartiallyEnqueued
from conveyor.common.devstack.servers import RedisServer
from conveyor.common.errors import ResourceExhausted
from conveyor.common.keys import queue_keys
from conveyor.v1 import producer_service_pb2 as p
from tests.integration.conftest import Producer, start_producer
from tests.support.producer_app import start_app

SMALL, BIG = "batch-small", "batch-big"
#: Jobs of the second queue: their arguments together are far over the headroom left below maxmemory.
BIG_JOBS, BIG_PAYLOAD = 20, 60_000
SMALL_JOBS = 3
HEADROOM = 256 * 1024


@pytest.fixture
async def setup(private_redis: RedisServer) -> AsyncIterator[tuple[Producer, redis.asyncio.Redis]]:
    admin = redis.asyncio.Redis.from_url(private_redis.url)
    await admin.flushall()
    await admin.config_set("maxmemory", 0)
    await admin.config_set("maxmemory-policy", "noeviction")
    producer, stop = await start_producer(private_redis.url)
    yield producer, admin
    await admin.config_set("maxmemory", 0)
    await stop()
    await admin.aclose()


async def _fill_all_but(admin: redis.asyncio.Redis, headroom: int) -> None:
    """Set maxmemory so that only ``headroom`` bytes are left: the big queue's call crosses it."""
    used = int((await admin.info("memory"))["used_memory"])
    await admin.config_set("maxmemory", used + headroom)


async def _jobs_in(admin: redis.asyncio.Redis, queue: str) -> int:
    return int(await admin.hlen(queue_keys(queue).state))


def _batch(tag: str) -> list[p.EnqueueRequest]:
    big = [
        p.EnqueueRequest(
            queue=BIG,
            type="noop",
            payload_json=b'{"pad": "%s"}' % (b"x" * BIG_PAYLOAD),
            idempotency_key=f"{tag}-big-{i}",
        )
        for i in range(BIG_JOBS)
    ]
    small = [p.EnqueueRequest(queue=SMALL, type="noop", idempotency_key=f"{tag}-small-{i}") for i in range(SMALL_JOBS)]
    return [*small, *big]


async def test_a_batch_whose_second_queue_meets_a_full_redis_says_which_jobs_were_accepted(
    setup: tuple[Producer, redis.asyncio.Redis],
) -> None:
    producer, admin = setup
    jobs = _batch("raw")
    await _fill_all_but(admin, HEADROOM)
    response = await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=jobs), timeout=10)

    results = list(response.results)
    accepted, refused = results[:SMALL_JOBS], results[SMALL_JOBS:]
    assert all(r.job_id.startswith(f"{SMALL}/") and r.created and not r.HasField("error") for r in accepted)
    for r in refused:
        assert not r.job_id and not r.created
        assert r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert f"queue '{BIG}'" in r.error.message and "Redis is full" in r.error.message
        assert "none of this queue's jobs were written" in r.error.message
    assert await _jobs_in(admin, SMALL) == SMALL_JOBS
    assert await _jobs_in(admin, BIG) == 0, "a refused queue wrote something"

    # Once Redis has room, the same batch again (same keys) adds only what was missing.
    await admin.config_set("maxmemory", 0)
    again = list((await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=jobs), timeout=10)).results)
    assert [r.job_id for r in again[:SMALL_JOBS]] == [r.job_id for r in accepted]
    assert not any(r.created for r in again[:SMALL_JOBS])
    assert all(r.created and r.job_id.startswith(f"{BIG}/") and not r.HasField("error") for r in again[SMALL_JOBS:])
    assert await _jobs_in(admin, SMALL) == SMALL_JOBS and await _jobs_in(admin, BIG) == BIG_JOBS


async def test_the_client_raises_partially_enqueued_and_the_retry_completes_the_batch(
    setup: tuple[Producer, redis.asyncio.Redis],
) -> None:
    producer, admin = setup
    async with ConveyorClient(producer.addr, coalesce=False) as client:
        jobs = _batch("client")
        await _fill_all_but(admin, HEADROOM)
        with pytest.raises(PartiallyEnqueued) as info:
            await client.enqueue_batch(jobs)
        partial = info.value
        assert sorted(partial.accepted) == list(range(SMALL_JOBS))
        assert sorted(partial.failures) == sorted(partial.failed_requests) == list(range(SMALL_JOBS, len(jobs)))
        assert all(isinstance(e, ResourceExhausted) for e in partial.failures.values())
        assert len(partial.accepted_ids) == SMALL_JOBS
        assert all(i.startswith(f"{SMALL}/") for i in partial.accepted_ids)
        assert f"{SMALL_JOBS} of {len(jobs)} jobs enqueued" in str(partial)

        await admin.config_set("maxmemory", 0)
        retried = await client.enqueue_batch(list(partial.failed_requests.values()))
        assert all(r.created for r in retried)
        whole = await client.enqueue_batch(jobs)
        assert [r.job_id for r in whole[:SMALL_JOBS]] == partial.accepted_ids
        assert [r.job_id for r in whole[SMALL_JOBS:]] == [r.job_id for r in retried]
        assert not any(r.created for r in whole)
    assert await _jobs_in(admin, SMALL) == SMALL_JOBS and await _jobs_in(admin, BIG) == BIG_JOBS


async def test_a_batch_no_queue_of_which_is_written_fails_with_the_status(
    setup: tuple[Producer, redis.asyncio.Redis],
) -> None:
    producer, admin = setup
    await admin.config_set("maxmemory", 1)
    jobs = [p.EnqueueRequest(queue=q, type="noop") for q in (BIG, SMALL, BIG)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await producer.stub.EnqueueBatch(p.EnqueueBatchRequest(jobs=jobs), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Redis is full" in (info.value.details() or "")
    await admin.config_set("maxmemory", 0)
    assert await _jobs_in(admin, BIG) == 0 and await _jobs_in(admin, SMALL) == 0


async def test_the_coalescing_client_gives_each_caller_of_a_partial_batch_its_own_answer(
    private_redis: RedisServer, setup: tuple[Producer, redis.asyncio.Redis]
) -> None:
    _, admin = setup
    # A producer with the default 1 MiB payload limit: one large job alone is far over the headroom.
    producer = await start_app(private_redis.url)
    try:
        async with ConveyorClient(f"127.0.0.1:{producer.running.port}") as client:
            await _fill_all_but(admin, 128 * 1024)
            outcomes = await asyncio.gather(
                *(client.enqueue(SMALL, "noop", {"n": i}) for i in range(SMALL_JOBS)),
                *(client.enqueue(BIG, "noop", {"pad": "x" * 500_000}) for _ in range(2)),
                return_exceptions=True,
            )
        small, big = outcomes[:SMALL_JOBS], outcomes[SMALL_JOBS:]
        assert all(isinstance(r, p.EnqueueResponse) and r.created for r in small), small
        assert all(isinstance(e, ResourceExhausted) and "Redis is full" in e.message for e in big), big
        await admin.config_set("maxmemory", 0)
        assert await _jobs_in(admin, SMALL) == SMALL_JOBS and await _jobs_in(admin, BIG) == 0
    finally:
        await producer.stop()
