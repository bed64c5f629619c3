"""The scheduler loop: every worker process fires due schedule ticks (repeatable jobs).

Any number of these loops may run (one per worker process): each tick is claimed by a
compare-and-set in Redis, so exactly one job is made per tick (see
conveyor.common.schedules). The loop never busy-polls: it sleeps until the earliest
due tick (or in-flight lease) in a blocking XREAD on the schedules' signal stream, which
CreateSchedule, UpdateSchedule and DeleteSchedule write to, so a change wakes it at once.
With no schedules it costs one blocking read per ``idle_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from conveyor.common.enqueue import Enqueuer, enqueue_tick
from conveyor.common.faults import is_transient
from conveyor.common.redis import REDIS_UNAVAILABLE, RedisClient, xread
from conveyor.common.schedules import SCHEDULE_SIGNAL, InFlight, ScheduleStore, Timing
from conveyor.v1 import schedule_service_pb2

log = structlog.get_logger("conveyor.scheduler")

BATCH = 100


def _local_ms() -> int:
    return time.time_ns() // 1_000_000


class Scheduler:
    """Fires due ticks; ``run`` until the stop event is set.

    Args:
        redis: Client for the scripts and reads.
        wait_redis: Client for the blocking read (no socket timeout).
        enqueuer: The producer's enqueue path (validation included).
        idle_s: Longest sleep when nothing is due (a safety net; changes wake it anyway).
    """

    def __init__(self, redis: RedisClient, wait_redis: RedisClient, enqueuer: Enqueuer, idle_s: float = 30.0) -> None:
        self._redis = redis
        self._wait_redis = wait_redis
        self._store = ScheduleStore(redis)
        self._enqueuer = enqueuer
        self._idle_ms = int(idle_s * 1000)
        #: Ticks this process fired (a job enqueued), for tests and logs.
        self.fired = 0
        self.wakeups = 0
        #: Redis's clock minus this process's, as last read: every loop decides what is due on
        #: the same clock, so a worker whose clock runs fast cannot fire a tick early.
        self.clock_offset_ms = 0

    def _now_ms(self) -> int:
        return _local_ms() + self.clock_offset_ms

    async def _sync_clock(self) -> int:
        """Redis's time now (ms); also refreshes the offset the loop's waits use."""
        local_before = _local_ms()
        seconds, micros = await self._redis.time()
        local_after = _local_ms()
        redis_ms = int(seconds) * 1000 + int(micros) // 1000
        self.clock_offset_ms = redis_ms - (local_before + local_after) // 2
        return redis_ms

    async def run(self, stop: asyncio.Event) -> None:
        last_signal = b"0-0"
        backoff = 0.05
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                try:
                    last_signal = await self._latest_signal(last_signal)
                    more, wake_ms = await self.tick_once()
                    backoff = 0.05
                    if more:
                        continue
                    timeout_ms = self._idle_ms if not wake_ms else max(1, min(self._idle_ms, wake_ms - self._now_ms()))
                    read = asyncio.ensure_future(
                        xread(self._wait_redis, {SCHEDULE_SIGNAL: last_signal}, count=100, block=timeout_ms)
                    )
                    await asyncio.wait([read, stopper], return_when=asyncio.FIRST_COMPLETED)
                    if not read.done():
                        read.cancel()
                        with contextlib.suppress(asyncio.CancelledError, *REDIS_UNAVAILABLE):
                            await read
                        break
                    self.wakeups += 1
                    for _, entries in read.result() or []:
                        if entries:
                            last_signal = entries[-1][0]
                except Exception as exc:
                    if not is_transient(exc):
                        raise  # a bug: the supervisor logs it and starts the loop again
                    log.warning("scheduler_redis_unavailable", error=str(exc))
                    await asyncio.wait([stopper], timeout=backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            stopper.cancel()

    async def _latest_signal(self, last: bytes) -> bytes:
        # Start reading signals from the newest one there is, so old ones do not wake us.
        if last != b"0-0":
            return last
        newest = await self._redis.xrevrange(SCHEDULE_SIGNAL, count=1)
        return newest[0][0] if newest else b"0-0"

    async def tick_once(self) -> tuple[bool, int]:
        """Fire what is due now.

        Returns:
            Whether to look again at once (something moved, so the due times read before
            are stale), and the earliest future time (ms) something comes due (0: nothing).
        """
        now = await self._sync_clock()
        due, stale, wake_ms = await self._store.due(now, BATCH)
        moved = False
        for schedule_id in stale:
            inflight = await self._store.take_over(schedule_id, now)
            if inflight is not None:
                log.warning("schedule_tick_taken_over", schedule_id=schedule_id, tick_ms=inflight.tick_ms)
                await self._enqueue(inflight)
            moved = True
        for schedule_id in due:
            try:
                moved = await self._fire(schedule_id) or moved
            except Exception as exc:
                if is_transient(exc):
                    raise
                # One broken schedule must not stop the others (nor the worker): it is logged
                # and looked at again on the next wake-up, without a busy loop meanwhile.
                log.exception("schedule_fire_failed", schedule_id=schedule_id)
        return moved, wake_ms

    async def _fire(self, schedule_id: str) -> bool:
        """Claim and fire one due schedule; False when it is held back by an in-flight tick."""
        stored = await self._store.get(schedule_id)
        now = self._now_ms()
        if stored is not None and stored.inflight_ms:
            # Its previous tick is still being enqueued: recording it wakes the loops again
            # (and a dead owner's lease running out is the fallback). No busy loop meanwhile.
            return False
        if stored is None or stored.paused_ms or not stored.next_ms or stored.next_ms > now:
            return True  # deleted, paused, or moved on by another process
        timing = Timing.from_spec(stored.spec)
        once = stored.spec.missed_tick_policy == schedule_service_pb2.MISSED_TICK_POLICY_ONCE
        fire_ms, next_ms = timing.plan(stored.anchor_ms, stored.next_ms, now, catch_up_once=once)
        if not await self._store.claim(stored, next_ms, fire_ms, now):
            return True  # another process claimed it, or it changed or was deleted: nothing to do
        if fire_ms != stored.next_ms:
            log.info(
                "schedule_ticks_missed",
                schedule_id=schedule_id,
                first_missed_ms=stored.next_ms,
                fired_ms=fire_ms or None,
                next_ms=next_ms,
            )
        if fire_ms:
            await self._enqueue(InFlight(schedule_id, fire_ms, stored.spec))
        return True

    async def _enqueue(self, tick: InFlight) -> None:
        try:
            await enqueue_tick(self._enqueuer, self._store, tick)
            self.fired += 1
        except Exception as exc:
            if is_transient(exc):
                raise
            # The tick stays in flight; another loop retries it when the lease runs out.
            log.exception("schedule_enqueue_failed", schedule_id=tick.schedule_id, tick_ms=tick.tick_ms)
