"""Schedules across real worker processes: exactly one job per tick, however many workers (issue #5 item 4)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.common.client import ConveyorClient
from conveyor.common.keys import queue_keys
from conveyor.common.redis import make_redis
from conveyor.common.schedules import tick_idempotency_key
from conveyor.v1 import job_pb2
from tests.faults.conftest import FaultStack, StartWorker
from tests.support.schedules import ticks_fired
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e
TICKS = "ticks"  # no worker consumes it: every job a tick made stays in its stream to be counted


async def _tick_keys(stack: FaultStack) -> list[str]:
    client = make_redis(stack.redis.url)
    try:
        entries = await client.xrange(queue_keys(TICKS).band(5))
    finally:
        await client.aclose()
    return [job_pb2.Job.FromString(fields[b"d"]).idempotency_key for _, fields in entries]


async def test_four_workers_one_job_per_tick_even_when_one_dies(
    fault_stack: FaultStack, worker_process: StartWorker
) -> None:
    workers = [worker_process(f"sched-{i}") for i in range(4)]
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    end = start + timedelta(seconds=9)  # ticks at start, start+1 s, ..., start+9 s: ten
    async with ConveyorClient(fault_stack.producer.addr) as client:
        spec = client.schedule_spec(
            TICKS, "test.count", {"n": 1}, every=timedelta(seconds=1), start_at=start, end_at=end
        )
        schedule, created = await client.create_schedule("every-second", spec)
        assert created and schedule.next_fire_at.ToDatetime(UTC) == start

        async def halfway() -> bool:
            return len(await _tick_keys(fault_stack)) >= 5

        await wait_for(halfway, "five ticks", within=20)
        workers[0].kill()  # SIGKILL one of the four: the other three go on, nothing lost or doubled

        async def finished() -> bool:
            got = await client.get_schedule("every-second")
            return not got.HasField("next_fire_at") and got.last_tick_at.ToDatetime(UTC) == end

        # A tick claimed by the killed worker just before it died is finished by another after the lease.
        await wait_for(finished, "the last tick recorded", within=40, interval=0.1)
    first = int(start.timestamp() * 1000)
    keys = await _tick_keys(fault_stack)
    assert keys == [tick_idempotency_key("every-second", first + k * 1000) for k in range(10)]
    creators = [ticks_fired(w, "every-second") for w in workers]
    assert sum(creators) == 10, creators
    # The claim, not only the idempotency key, keeps ticks single: each tick was enqueued once
    # (one more at most: a tick the killed worker claimed and another finished after the lease).
    assert sum(ticks_fired(w, "every-second", created_only=False) for w in workers) <= 11


async def test_four_workers_ten_seconds_then_delete_stops_it(
    fault_stack: FaultStack, worker_process: StartWorker
) -> None:
    workers = [worker_process(f"loop-{i}") for i in range(4)]
    before = await _tick_keys(fault_stack)
    async with ConveyorClient(fault_stack.producer.addr) as client:
        spec = client.schedule_spec(TICKS, "test.count", every=timedelta(seconds=1))
        schedule, _ = await client.create_schedule("ten-seconds", spec)
        first = schedule.next_fire_at.ToMilliseconds()
        created_at = time.monotonic()

        def mine(keys: list[str]) -> list[str]:
            return [k for k in keys if k.startswith("schedule:ten-seconds:")]

        async def ten_seconds_passed() -> bool:
            return time.monotonic() - created_at >= 10

        await wait_for(ten_seconds_passed, "ten seconds", within=15, interval=0.1)
        await client.delete_schedule("ten-seconds")
        at_delete = mine(await _tick_keys(fault_stack))
        assert 9 <= len(at_delete) <= 11, at_delete
        assert at_delete == [tick_idempotency_key("ten-seconds", first + k * 1000) for k in range(len(at_delete))]

        async def three_more_seconds() -> bool:
            return time.monotonic() - created_at >= 13

        await wait_for(three_more_seconds, "three more tick periods", within=10, interval=0.1)
    assert mine(await _tick_keys(fault_stack)) == at_delete  # nothing after the delete returned
    # The producer's delete finishes a tick that was in flight when it came in (its log counts too).
    processes = [*workers, fault_stack.producer]
    assert sum(ticks_fired(w, "ten-seconds") for w in processes) == len(at_delete)
    # Each tick was claimed by one process and enqueued once, not merely deduplicated by its key
    # (one more at most: the delete finishing a tick whose claimer had not enqueued it yet).
    assert sum(ticks_fired(w, "ten-seconds", created_only=False) for w in processes) <= len(at_delete) + 1
    assert len(await _tick_keys(fault_stack)) - len(before) == len(at_delete)
