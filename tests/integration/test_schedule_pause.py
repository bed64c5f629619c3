"""Schedule pause/resume (issue #11 item 2, dashauth): a paused schedule does not fire; resumed, it fires again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio

from conveyor.common.enqueue import Enqueuer
from conveyor.common.redis import make_redis
from conveyor.common.schedules import SCHEDULE_DUE
from conveyor.common.scripts import Scripts
from conveyor.v1 import schedule_service_pb2 as s
from conveyor.worker.scheduler import Scheduler
from tests.integration.conftest import Producer
from tests.integration.test_schedules import every, queued_ticks
from tests.support.wait import wait_for

QUEUE = "paused-sched"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
async def scheduler(redis_url: str) -> AsyncIterator[Scheduler]:
    client = make_redis(redis_url)
    wait = make_redis(redis_url, blocking=True)
    yield Scheduler(client, wait, Enqueuer(client, Scripts(client), 64 * 1024, 1))
    await client.aclose()
    await wait.aclose()


async def test_a_paused_schedule_does_not_fire_and_fires_again_after_resume(
    producer: Producer, redis_client: redis.asyncio.Redis, scheduler: Scheduler
) -> None:
    stop = asyncio.Event()
    loop = asyncio.create_task(scheduler.run(stop))
    try:
        await producer.schedules.CreateSchedule(
            s.CreateScheduleRequest(schedule_id="pausable", spec=every(1, queue=QUEUE))
        )

        async def jobs(at_least: int) -> list[str] | None:
            keys = await queued_ticks(redis_client, QUEUE)
            return keys if len(keys) >= at_least else None

        await wait_for(lambda: jobs(1), "the first tick fired", within=10)

        paused = await producer.schedules.PauseSchedule(s.PauseScheduleRequest(schedule_id="pausable"))
        assert paused.changed
        assert paused.schedule.paused and paused.schedule.HasField("paused_at")
        assert not paused.schedule.HasField("next_fire_at")  # nothing will fire
        assert await redis_client.zscore(SCHEDULE_DUE, "pausable") is None
        again = await producer.schedules.PauseSchedule(s.PauseScheduleRequest(schedule_id="pausable"))
        assert not again.changed and again.schedule.paused
        listed = await producer.schedules.ListSchedules(s.ListSchedulesRequest())
        assert [x.paused for x in listed.schedules if x.schedule_id == "pausable"] == [True]

        # A change of the spec while paused keeps it paused (and out of the due index).
        changed = every(1, queue=QUEUE)
        changed.template.payload_json = b'{"k": 2}'
        updated = await producer.schedules.UpdateSchedule(s.UpdateScheduleRequest(schedule_id="pausable", spec=changed))
        assert updated.schedule.paused
        assert await redis_client.zscore(SCHEDULE_DUE, "pausable") is None

        # Three would-be ticks pass with the loop running: nothing fires.
        count = len(await queued_ticks(redis_client, QUEUE))
        deadline = now_ms() + 3000

        async def three_ticks_passed() -> bool:
            return now_ms() > deadline

        await wait_for(three_ticks_passed, "three tick periods", within=10, interval=0.2)
        assert len(await queued_ticks(redis_client, QUEUE)) == count
        assert not loop.done()

        resumed_at = now_ms()
        resumed = await producer.schedules.ResumeSchedule(s.ResumeScheduleRequest(schedule_id="pausable"))
        assert resumed.changed and not resumed.schedule.paused
        assert not resumed.schedule.HasField("paused_at")
        # The ticks that fell while paused are skipped: the next one is after the resume.
        assert resumed.schedule.next_fire_at.ToMilliseconds() > resumed_at
        keys = await wait_for(lambda: jobs(count + 1), "a tick fired after the resume", within=10)
        assert int(keys[count].rsplit(":", 1)[1]) > resumed_at
        not_paused = await producer.schedules.ResumeSchedule(s.ResumeScheduleRequest(schedule_id="pausable"))
        assert not not_paused.changed
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


@pytest.mark.parametrize("method", ["PauseSchedule", "ResumeSchedule"])
async def test_pausing_or_resuming_a_missing_schedule_is_not_found(producer: Producer, method: str) -> None:
    request = s.PauseScheduleRequest if method == "PauseSchedule" else s.ResumeScheduleRequest
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(producer.schedules, method)(request(schedule_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (err.value.details() or "")
