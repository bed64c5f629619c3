"""The registry of queue names (keys.QUEUES): registered on enqueue, forgotten by a sweep when idle.

The registry is how the results service discovers queues and what ListQueues lists. It used
to grow forever; now a queue that has been idle for ``idle_s`` (nothing queued, delayed,
running, held or dead-lettered, no flow-control setting, no pause, no schedule, every event
projected) leaves it (lua/forget_queue.lua re-checks all of that in one step), and its next
enqueue registers it again.

Registration is cached per process for ``REGISTRATION_TTL_S`` so that the hot path does not
write the registry on every call. The cache cannot hide a forgotten queue for longer than that:
each real registration stamps the queue (keys.QUEUES_TOUCHED) and the sweep never forgets a
queue stamped within ``idle_s``, which must be longer than the TTL. So while any process
still trusts its cached registration, the queue is not forgotten; once every cache entry has
expired, the next enqueue anywhere registers it again. See ADR 0015.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from importlib import resources

import structlog

from conveyor.common.keys import QUEUES, QUEUES_TOUCHED, RESULTS_GROUP, queue_keys
from conveyor.common.redis import RedisClient, register_script
from conveyor.common.schedules import ScheduleStore

log = structlog.get_logger("conveyor.queue_registry")

#: How long a process trusts that a queue it registered is still registered.
REGISTRATION_TTL_S = 30.0
#: Registrations one process caches at most (the cache is bounded: past it, it starts afresh).
MAX_CACHED = 10_000
#: A queue idle this long leaves the registry (CONVEYOR_QUEUE_IDLE_SECONDS).
DEFAULT_IDLE_S = 3600.0
#: How often the sweep looks (CONVEYOR_QUEUE_SWEEP_SECONDS).
DEFAULT_SWEEP_S = 60.0
_SCAN = 100


def _source(name: str) -> str:
    return (resources.files("conveyor.common") / "lua" / f"{name}.lua").read_text()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class QueueRegistry:
    """Registers queues on enqueue, at most once per ``ttl_s`` per queue in this process."""

    def __init__(self, redis: RedisClient, ttl_s: float | None = None, max_cached: int = MAX_CACHED) -> None:
        self._ttl_s = REGISTRATION_TTL_S if ttl_s is None else ttl_s
        self._max_cached = max_cached
        self._until: dict[str, float] = {}
        self._script = register_script(redis, _source("register_queue"))

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    async def register(self, queue: str) -> None:
        """Make sure ``queue`` is in the registry (call before the enqueue that uses it)."""
        now = time.monotonic()
        if self._until.get(queue, 0.0) > now:
            return
        if await self._script(keys=[QUEUES, QUEUES_TOUCHED], args=[queue]):
            log.info("queue_registered", queue=queue)
        if len(self._until) >= self._max_cached:
            self._until.clear()
        self._until[queue] = now + self._ttl_s


class QueueSweeper:
    """Forgets idle queues: every ``interval_s``, each registered queue idle for ``idle_s`` leaves the registry.

    Args:
        redis: A Redis client.
        idle_s: How long a queue must have been idle; longer than every process's registration TTL.
        interval_s: Seconds between sweeps.
        registration_ttl_s: The longest registration TTL in use (checked against ``idle_s``).
    """

    def __init__(
        self,
        redis: RedisClient,
        idle_s: float = DEFAULT_IDLE_S,
        interval_s: float = DEFAULT_SWEEP_S,
        registration_ttl_s: float = REGISTRATION_TTL_S,
    ) -> None:
        if idle_s <= registration_ttl_s:
            raise ValueError(
                f"queue idle time ({idle_s} s) must be longer than the registration TTL ({registration_ttl_s} s)"
            )
        self._redis = redis
        self._idle_ms = int(idle_s * 1000)
        self._interval_s = interval_s
        self._schedules = ScheduleStore(redis)
        self._idle = register_script(redis, _source("queue_idle"))
        self._forget = register_script(redis, _source("forget_queue"))

    async def scheduled_queues(self) -> set[str]:
        """The queues some schedule enqueues to."""
        queues: set[str] = set()
        after = ""
        while page := await self._schedules.page(after, _SCAN):
            queues.update(s.spec.template.queue for s in page)
            after = page[-1].schedule_id
        return queues

    async def forget(self, queue: str) -> tuple[bool, str]:
        """Forget ``queue`` if it is idle; returns (forgotten, why not).

        Two steps, each atomic on its own hash slot: the queue's keys say it is idle, then the
        registry lets it go unless it was registered within the idle time (lua/forget_queue.lua
        says why that order loses no enqueue in between).
        """
        registry = [QUEUES, QUEUES_TOUCHED]
        maybe, why = await self._forget(keys=registry, args=[queue, self._idle_ms, "check"])
        if not maybe:
            return False, _text(why)
        idle, why = await self._idle(keys=queue_keys(queue).script_keys(), args=[RESULTS_GROUP])
        if not idle:
            return False, _text(why)
        done, why = await self._forget(keys=registry, args=[queue, self._idle_ms, ""])
        return bool(done), _text(why)

    async def sweep(self) -> list[str]:
        """One pass over the registry; returns the queues forgotten."""
        scheduled = await self.scheduled_queues()
        forgotten: list[str] = []
        cursor = 0
        while True:
            cursor, members = await self._redis.sscan(QUEUES, cursor, count=_SCAN)
            for member in members:
                queue = _text(member)
                if queue in scheduled:
                    continue
                done, _ = await self.forget(queue)
                if done:
                    forgotten.append(queue)
                    log.info("queue_forgotten", queue=queue, idle_s=self._idle_ms / 1000)
            if cursor == 0:
                return forgotten

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``interval_s`` until ``stop`` is set (run it under the Supervisor)."""
        while not stop.is_set():
            await self.sweep()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)
