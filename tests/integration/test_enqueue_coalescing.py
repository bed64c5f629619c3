"""Concurrent unary Enqueue calls to one queue share one enqueue script call (ADR 0032).

The Coalescer runs on the real Enqueuer and the session Redis; a gate held on the Enqueuer's
write makes "calls that arrive while writes are out" happen on purpose, not by timing. The last
tests go through the producer as `python -m conveyor.producer` wires it, over real gRPC.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio

from conveyor.common.enqueue import Enqueuer
from conveyor.common.errors import InvalidArgument
from conveyor.common.keys import queue_keys
from conveyor.common.redis import make_redis
from conveyor.common.scripts import Scripts
from conveyor.producer.coalesce import WRITES_IN_FLIGHT, Coalescer
from conveyor.v1 import job_pb2
from conveyor.v1 import producer_service_pb2 as p
from tests.support.producer_app import start_app
from tests.support.wait import wait_for


class GatedEnqueuer(Enqueuer):
    """The real Enqueuer, whose writes wait for ``gate`` and record how many jobs each carried."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gate = asyncio.Event()
        self.written: list[int] = []
        self.started = 0

    async def write(self, valid: Any, batch: bool) -> Any:
        self.started += 1
        await self.gate.wait()
        self.written.append(len(valid))
        return await super().write(valid, batch)


@pytest.fixture
async def gated(redis_url: str) -> AsyncIterator[GatedEnqueuer]:
    client = make_redis(redis_url)
    yield GatedEnqueuer(client, Scripts(client), 64 * 1024, 1000)
    await client.aclose()


async def _first_writes_started(gated: GatedEnqueuer) -> None:
    async def started() -> bool:
        return gated.started == WRITES_IN_FLIGHT

    await wait_for(started, "the first writes to start", 5)


def _queue() -> str:
    return f"coalesce-{os.urandom(4).hex()}x"


def _request(queue: str, i: int, **fields: Any) -> p.EnqueueRequest:
    return p.EnqueueRequest(queue=queue, type="noop", payload_json=f'{{"i": {i}}}'.encode(), **fields)


async def _job_entries(r: redis.asyncio.Redis, queue: str) -> list[bytes]:
    keys = queue_keys(queue)
    ulids = []
    for stream in keys.bands:
        for _id, fields in await r.xrange(stream):
            ulids.append(fields[b"j"])
    return ulids


async def test_calls_arriving_while_writes_are_out_share_the_next_write(
    gated: GatedEnqueuer, redis_client: redis.asyncio.Redis
) -> None:
    queue = _queue()
    coalescer = Coalescer(gated, 1000)
    calls = [asyncio.ensure_future(coalescer.enqueue(_request(queue, i))) for i in range(10)]
    await _first_writes_started(gated)
    gated.gate.set()
    responses = await asyncio.gather(*calls)

    # One write per caller at first (nothing waits on a timer), then the eight who came meanwhile together.
    assert gated.written == [1] * WRITES_IN_FLIGHT + [10 - WRITES_IN_FLIGHT]
    assert (coalescer.writes, coalescer.jobs) == (3, 10)
    ids = [r.job_id for r in responses]
    assert len(set(ids)) == 10 and all(r.created and r.state == job_pb2.JOB_STATE_QUEUED for r in responses)
    # Each job is in its queue once, in the order its caller arrived within the shared write.
    stored = [u.decode() for u in await _job_entries(redis_client, queue)]
    assert sorted(stored) == sorted(i.rpartition("/")[2] for i in ids)
    shared = [i.rpartition("/")[2] for i in ids[WRITES_IN_FLIGHT:]]
    assert shared == sorted(shared)  # ULIDs of one write follow its callers' order


async def test_a_bad_request_is_refused_alone_and_the_others_are_written(
    gated: GatedEnqueuer, redis_client: redis.asyncio.Redis
) -> None:
    queue = _queue()
    coalescer = Coalescer(gated, 1000)
    gated.gate.set()
    good = [asyncio.ensure_future(coalescer.enqueue(_request(queue, i))) for i in range(3)]
    bad = asyncio.ensure_future(coalescer.enqueue(p.EnqueueRequest(queue=queue, type="has space")))
    more = [asyncio.ensure_future(coalescer.enqueue(_request(queue, i))) for i in range(3, 6)]
    with pytest.raises(InvalidArgument) as refused:
        await bad
    assert "type" in refused.value.violations  # the unary field name, not jobs[i].type
    responses = await asyncio.gather(*good, *more)
    assert all(r.created for r in responses)
    assert len(await _job_entries(redis_client, queue)) == 6
    assert coalescer.jobs == 6


async def test_one_idempotency_key_in_one_write_makes_one_job(
    gated: GatedEnqueuer, redis_client: redis.asyncio.Redis
) -> None:
    queue = _queue()
    coalescer = Coalescer(gated, 1000)
    calls = [asyncio.ensure_future(coalescer.enqueue(_request(queue, i))) for i in range(WRITES_IN_FLIGHT)]
    await _first_writes_started(gated)
    same = [asyncio.ensure_future(coalescer.enqueue(_request(queue, 99, idempotency_key="k-1"))) for _ in range(3)]
    gated.gate.set()
    await asyncio.gather(*calls)
    first, *repeats = await asyncio.gather(*same)
    assert gated.written[-1] == 3  # the three went in one write
    assert first.created and not any(r.created for r in repeats)
    assert {r.job_id for r in repeats} == {first.job_id}
    assert len(await _job_entries(redis_client, queue)) == WRITES_IN_FLIGHT + 1


async def test_a_failed_write_fails_each_of_its_callers_and_writes_nothing(
    gated: GatedEnqueuer, redis_client: redis.asyncio.Redis
) -> None:
    queue = _queue()
    coalescer = Coalescer(gated, 1000)
    calls = [asyncio.ensure_future(coalescer.enqueue(_request(queue, i))) for i in range(6)]
    await _first_writes_started(gated)
    # Redis full: the enqueue script is refused (OOM) and writes nothing.
    before = int((await redis_client.config_get("maxmemory"))["maxmemory"])
    await redis_client.config_set("maxmemory", 1)
    try:
        gated.gate.set()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await redis_client.config_set("maxmemory", before)
    assert len(outcomes) == 6 and all(isinstance(o, redis.exceptions.OutOfMemoryError) for o in outcomes), outcomes
    assert await _job_entries(redis_client, queue) == []
    # The next call is written as ever.
    assert (await coalescer.enqueue(_request(queue, 7))).created


async def test_a_caller_that_goes_away_leaves_the_others_answered(
    gated: GatedEnqueuer, redis_client: redis.asyncio.Redis
) -> None:
    queue = _queue()
    coalescer = Coalescer(gated, 1000)
    calls = [asyncio.ensure_future(coalescer.enqueue(_request(queue, i))) for i in range(5)]
    await _first_writes_started(gated)
    calls[-1].cancel()
    gated.gate.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(outcomes[-1], asyncio.CancelledError)
    assert all(isinstance(o, p.EnqueueResponse) and o.created for o in outcomes[:-1])
    # Its job was in the shared write: written, as a lone call cancelled mid-script may have been.
    assert len(await _job_entries(redis_client, queue)) == 5


async def test_writes_carry_at_most_the_batch_limit(gated: GatedEnqueuer) -> None:
    queue = _queue()
    coalescer = Coalescer(gated, 4)
    calls = [asyncio.ensure_future(coalescer.enqueue(_request(queue, i))) for i in range(WRITES_IN_FLIGHT + 10)]
    await _first_writes_started(gated)
    gated.gate.set()
    await asyncio.gather(*calls)
    assert max(gated.written) == 4 and sum(gated.written) == WRITES_IN_FLIGHT + 10


async def test_many_concurrent_unary_calls_over_grpc_are_each_answered_once(
    redis_url: str, redis_client: redis.asyncio.Redis
) -> None:
    """The producer as deployed: 200 concurrent Enqueue calls, some invalid, some sharing a key."""
    started = await start_app(redis_url)
    try:
        queue = _queue()

        async def call(i: int) -> p.EnqueueResponse | grpc.StatusCode:
            if i % 50 == 7:
                request = p.EnqueueRequest(queue=queue, type="")  # invalid: type is required
            elif i % 10 == 3:
                request = _request(queue, i, idempotency_key=f"shared-{i % 3}")
            else:
                request = _request(queue, i)
            try:
                return await started.stub.Enqueue(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        outcomes = await asyncio.gather(*(call(i) for i in range(200)))
        refused = [o for o in outcomes if isinstance(o, grpc.StatusCode)]
        assert refused == [grpc.StatusCode.INVALID_ARGUMENT] * 4
        answered = [o for o in outcomes if isinstance(o, p.EnqueueResponse)]
        keyed = [o for i, o in enumerate(outcomes) if i % 10 == 3 and i % 50 != 7]
        assert len({o.job_id for o in keyed}) == 3 and sum(o.created for o in keyed) == 3
        created = {o.job_id for o in answered if o.created}
        assert len(created) == 196 - len(keyed) + 3
        stored = await _job_entries(redis_client, queue)
        assert sorted(f"{queue}/{u.decode()}" for u in stored) == sorted(created)  # each once, none lost
    finally:
        await started.stop()
