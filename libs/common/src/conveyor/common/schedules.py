"""Repeatable jobs: tick computation (pure) and the schedules' Redis state (Lua).

Every schedule key carries the hash tag ``{schedules}``: all schedules live on one
Redis Cluster slot so that one script can change a schedule, the due index and the
wake-up stream together. Schedules are few (a job per tick is what costs), so one
slot is not a bottleneck.

A schedule's hash holds ``spec`` (ScheduleSpec bytes), ``timing`` (the bytes of its
timing fields, to tell a timing change from a template change), ``version``,
``next`` (the next tick in ms, 0 when none is left), ``anchor`` (the grid origin of
interval schedules), ``created``/``updated`` (ms), ``last_tick``/``last_job`` and,
while a tick is being enqueued, ``inflight`` (the tick) and ``inflight_spec`` (the
spec it fires with); ``paused`` (ms) marks a paused schedule, kept out of the due index;
``deleting`` marks a deleted schedule kept only until its
in-flight tick is recorded.

Exactly one job per tick: a process claims a tick with a compare-and-set on the
schedule's ``version`` and ``next`` (Python computes the new ``next``; Lua cannot
evaluate cron), recording the tick as in flight in the same step; then it enqueues the
job with the idempotency key ``schedule:<id>:<tick ms>``; then it clears the in-flight
mark. A process dying in between leaves the mark, and after :data:`INFLIGHT_LEASE_MS`
another process enqueues the same tick again with the same key, which returns the
first job if there was one: nothing is lost, nothing is doubled.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

from conveyor.common import crypto
from conveyor.common.codec import json_to_struct, struct_to_json
from conveyor.common.keys import PREFIX
from conveyor.common.redis import RedisClient, pipeline
from conveyor.common.scripts import ReloadingScript
from conveyor.v1 import schedule_service_pb2

#: A tick that no process reached within this long of its time was missed
#: (everything was down) and follows the schedule's missed-tick policy.
MISSED_GRACE_MS = 60_000
#: A tick claimed but not finished for this long is finished by another process.
INFLIGHT_LEASE_MS = 10_000
MIN_INTERVAL_MS = 1000
#: How long a tick's idempotency key is kept when the template sets no idempotency_window.
#: It only has to outlive a tick in flight (a stalled claimer enqueueing late gets the same job),
#: and every tick's key costs memory for the whole window: one hour, not the 24 h default.
TICK_KEY_WINDOW_MS = 3_600_000
_UTC = ZoneInfo("UTC")

SCHEDULES_TAG = f"{PREFIX}:{{schedules}}"
#: ZSET of every schedule id (score 0), for listing in id order.
SCHEDULE_IDS = f"{SCHEDULES_TAG}:ids"
#: ZSET schedule id -> next tick (ms); schedules with no tick left are absent.
SCHEDULE_DUE = f"{SCHEDULES_TAG}:due"
#: ZSET schedule id -> when its in-flight tick may be taken over (ms).
SCHEDULE_INFLIGHT = f"{SCHEDULES_TAG}:inflight"
#: STREAM of changes (field ``id``): wakes sleeping scheduler loops at once.
SCHEDULE_SIGNAL = f"{SCHEDULES_TAG}:signal"


def schedule_key(schedule_id: str) -> str:
    """The hash of one schedule."""
    return f"{SCHEDULES_TAG}:s:{schedule_id}"


def tick_idempotency_key(schedule_id: str, tick_ms: int) -> str:
    """The idempotency key of the job of one tick: the same in every process."""
    return f"schedule:{schedule_id}:{tick_ms}"


def timestamp_ms(seconds: int, nanos: int) -> int:
    return seconds * 1000 + nanos // 1_000_000


def cron_error(expr: str) -> str | None:
    """Why ``expr`` is not a cron expression CronSim evaluates, or None."""
    if len(expr.split()) != 5:
        return "must have 5 fields: minute hour day-of-month month day-of-week"
    try:
        next(CronSim(expr, datetime.now(UTC)))  # also proves it has a next tick at all
    except (CronSimError, StopIteration) as exc:
        return f"invalid cron expression: {exc or 'it never matches'}"
    return None


@dataclass(frozen=True, slots=True)
class Timing:
    """When a schedule fires: a cron expression in a zone, or a fixed interval."""

    cron: str = ""
    zone: ZoneInfo = _UTC
    interval_ms: int = 0
    #: No tick before this (ms), 0 for none.
    start_ms: int = 0
    #: No tick after this (ms), 0 for none.
    end_ms: int = 0

    @classmethod
    def from_spec(cls, spec: schedule_service_pb2.ScheduleSpec) -> Timing:
        """The timing of a validated spec."""
        return cls(
            cron=spec.cron,
            zone=ZoneInfo(spec.time_zone or "UTC"),
            interval_ms=timestamp_ms(spec.interval.seconds, spec.interval.nanos) if spec.HasField("interval") else 0,
            start_ms=timestamp_ms(spec.start_at.seconds, spec.start_at.nanos) if spec.HasField("start_at") else 0,
            end_ms=timestamp_ms(spec.end_at.seconds, spec.end_at.nanos) if spec.HasField("end_at") else 0,
        )

    def anchor(self, now_ms: int) -> int:
        """The origin of an interval schedule's ticks when its timing is set at ``now_ms``."""
        return self.start_ms or now_ms

    def _cron_after(self, after_ms: int) -> int:
        # CronSim yields matches strictly after the given minute, and ticks are whole minutes,
        # so the milliseconds of after_ms do not matter.
        dt = datetime.fromtimestamp(after_ms // 1000, self.zone)
        return int(next(CronSim(self.cron, dt)).timestamp() * 1000)

    def tick_after(self, anchor_ms: int, after_ms: int) -> int:
        """The first tick strictly after ``after_ms``, or 0 when none is left before the end."""
        if self.cron:
            tick = self._cron_after(max(after_ms, self.start_ms - 1))
        elif after_ms < anchor_ms:
            tick = anchor_ms
        else:
            tick = anchor_ms + ((after_ms - anchor_ms) // self.interval_ms + 1) * self.interval_ms
        if self.end_ms and tick > self.end_ms:
            return 0
        return tick

    def latest_at_or_before(self, anchor_ms: int, tick_ms: int, limit_ms: int) -> int:
        """The latest tick at or before ``limit_ms``, given that ``tick_ms`` is one."""
        if self.cron:
            # Reverse iteration yields matches strictly before its start, whole minutes.
            dt = datetime.fromtimestamp(limit_ms // 1000 + 1, self.zone)
            latest = int(next(CronSim(self.cron, dt, reverse=True)).timestamp() * 1000)
        else:
            latest = anchor_ms + (limit_ms - anchor_ms) // self.interval_ms * self.interval_ms
        return max(latest, tick_ms)

    def plan(self, anchor_ms: int, due_ms: int, now_ms: int, catch_up_once: bool) -> tuple[int, int]:
        """What to do with the due tick ``due_ms`` at ``now_ms``.

        Returns:
            ``(fire, next)``: the tick to enqueue a job for (0 for none) and the
            schedule's next tick afterwards (0 when none is left).
        """
        cutoff = now_ms - MISSED_GRACE_MS
        if due_ms >= cutoff:
            return due_ms, self.tick_after(anchor_ms, due_ms)
        # Ticks after the end do not exist, even when the outage ran past it.
        limit = min(cutoff, self.end_ms) if self.end_ms else cutoff
        last_missed = self.latest_at_or_before(anchor_ms, due_ms, limit)
        return (last_missed if catch_up_once else 0), self.tick_after(anchor_ms, last_missed)


def timing_bytes(spec: schedule_service_pb2.ScheduleSpec) -> bytes:
    """The timing fields of a spec, serialized: equal bytes mean the same ticks."""
    only = schedule_service_pb2.ScheduleSpec(cron=spec.cron, time_zone=spec.time_zone)
    for name in ("interval", "start_at", "end_at"):
        if spec.HasField(name):
            getattr(only, name).CopyFrom(getattr(spec, name))
    return only.SerializeToString(deterministic=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class StoredSchedule:
    """One schedule's hash, parsed."""

    schedule_id: str
    spec: schedule_service_pb2.ScheduleSpec
    spec_bytes: bytes
    version: int
    #: The raw ``next`` field, passed back as the compare-and-set's expected value.
    next_raw: bytes
    next_ms: int
    anchor_ms: int
    created_ms: int
    updated_ms: int
    last_tick_ms: int
    last_job_id: str
    inflight_ms: int
    #: When it was paused (ms), 0 when it is not.
    paused_ms: int = 0

    @classmethod
    def parse(cls, schedule_id: str, raw: dict[bytes, bytes]) -> StoredSchedule:
        spec_bytes = raw[b"spec"]

        def num(name: bytes) -> int:
            return int(raw.get(name, b"0"))

        return cls(
            schedule_id=schedule_id,
            spec=parse_spec(schedule_id, spec_bytes),
            spec_bytes=spec_bytes,
            version=num(b"version"),
            next_raw=raw.get(b"next", b"0"),
            next_ms=num(b"next"),
            anchor_ms=num(b"anchor"),
            created_ms=num(b"created"),
            updated_ms=num(b"updated"),
            last_tick_ms=num(b"last_tick"),
            last_job_id=_text(raw.get(b"last_job", b"")),
            inflight_ms=num(b"inflight"),
            paused_ms=num(b"paused"),
        )

    def to_proto(self) -> schedule_service_pb2.Schedule:
        out = schedule_service_pb2.Schedule(
            schedule_id=self.schedule_id, spec=self.spec, last_job_id=self.last_job_id, version=self.version
        )
        if self.paused_ms:
            out.paused = True
            out.paused_at.FromMilliseconds(self.paused_ms)
        elif self.next_ms:
            out.next_fire_at.FromMilliseconds(self.next_ms)
        if self.last_tick_ms:
            out.last_tick_at.FromMilliseconds(self.last_tick_ms)
        out.created_at.FromMilliseconds(self.created_ms)
        out.updated_at.FromMilliseconds(self.updated_ms)
        return out


def _template_id(schedule_id: str) -> str:
    return f"schedule/{schedule_id}"


def stored_spec(schedule_id: str, spec: schedule_service_pb2.ScheduleSpec) -> bytes:
    """``spec`` as Redis keeps it: with its template's payload sealed when the template's queue is
    encrypted (ADR 0025; bound to the schedule id), else as it came."""
    encryption = crypto.current()
    template = spec.template
    if encryption.keyring is None or not encryption.encrypts(template.queue):
        return spec.SerializeToString(deterministic=True)
    plain = bytes(template.payload_json) if template.payload_json else struct_to_json(template.payload)
    sealed = schedule_service_pb2.ScheduleSpec()
    sealed.CopyFrom(spec)
    sealed.template.ClearField("payload")
    sealed.template.payload_json = encryption.keyring.seal(plain, crypto.TEMPLATE, _template_id(schedule_id))
    return sealed.SerializeToString(deterministic=True)


def parse_spec(schedule_id: str, data: bytes) -> schedule_service_pb2.ScheduleSpec:
    """A spec read from Redis, its template's payload opened (as a Struct) when it is sealed and
    this process holds the key; else left sealed (its ticks then fail to enqueue, saying so)."""
    spec = schedule_service_pb2.ScheduleSpec.FromString(data)
    template = spec.template
    if template.payload_json.startswith(crypto.SEALED_JSON):
        plain = crypto.try_open(template.payload_json, crypto.TEMPLATE, _template_id(schedule_id))
        if not plain.startswith(crypto.SEALED_JSON):
            template.ClearField("payload_json")
            template.payload.CopyFrom(json_to_struct(plain))
    return spec


def _pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


#: Outcomes of :meth:`ScheduleStore.upsert`.
UPSERT_NOT_FOUND = 0
UPSERT_CREATED = 1
UPSERT_UPDATED = 2
UPSERT_UNCHANGED = 3

#: Outcomes of :meth:`ScheduleStore.pause` and :meth:`ScheduleStore.resume`.
SWITCH_NOT_FOUND = 0
SWITCH_CHANGED = 1
SWITCH_UNCHANGED = 2
_RESUME_STALE = 3


@dataclass(frozen=True, slots=True)
class InFlight:
    """A claimed tick whose job may not exist yet."""

    schedule_id: str
    tick_ms: int
    spec: schedule_service_pb2.ScheduleSpec


class ScheduleStore:
    """The schedules' Redis state; every change is one Lua script."""

    def __init__(self, client: RedisClient) -> None:
        self._redis = client
        self._upsert = ReloadingScript(client, "schedule_upsert")
        self._claim = ReloadingScript(client, "schedule_claim")
        self._fired = ReloadingScript(client, "schedule_fired")
        self._delete = ReloadingScript(client, "schedule_delete")
        self._takeover = ReloadingScript(client, "schedule_takeover")
        self._pause = ReloadingScript(client, "schedule_pause")
        self._resume = ReloadingScript(client, "schedule_resume")

    async def upsert(
        self,
        schedule_id: str,
        spec: schedule_service_pb2.ScheduleSpec,
        now_ms: int,
        create: bool,
    ) -> tuple[int, StoredSchedule | None]:
        """Create (``create``) or update a schedule; returns the outcome and the stored schedule."""
        timing = Timing.from_spec(spec)
        anchor = timing.anchor(now_ms)
        first = timing.tick_after(anchor, now_ms)
        result, flat = await self._upsert(
            keys=[schedule_key(schedule_id), SCHEDULE_IDS, SCHEDULE_DUE, SCHEDULE_SIGNAL, SCHEDULE_INFLIGHT],
            args=[
                schedule_id,
                "create" if create else "update",
                stored_spec(schedule_id, spec),
                timing_bytes(spec),
                first,
                anchor,
                now_ms,
            ],
        )
        if int(result) == UPSERT_NOT_FOUND:
            return UPSERT_NOT_FOUND, None
        return int(result), StoredSchedule.parse(schedule_id, _pairs(flat))

    async def pause(self, schedule_id: str, now_ms: int) -> tuple[int, StoredSchedule | None]:
        """Pause a schedule: it leaves the due index until :meth:`resume`. Returns the outcome and the schedule."""
        result, flat = await self._pause(
            keys=[schedule_key(schedule_id), SCHEDULE_DUE, SCHEDULE_SIGNAL], args=[schedule_id, now_ms]
        )
        if int(result) == SWITCH_NOT_FOUND:
            return SWITCH_NOT_FOUND, None
        return int(result), StoredSchedule.parse(schedule_id, _pairs(flat))

    async def resume(self, schedule_id: str, now_ms: int) -> tuple[int, StoredSchedule | None]:
        """Resume a paused schedule from its first tick after ``now_ms`` (ticks while paused are skipped)."""
        while True:
            stored = await self.get(schedule_id)
            if stored is None:
                return SWITCH_NOT_FOUND, None
            if not stored.paused_ms:
                return SWITCH_UNCHANGED, stored
            next_ms = Timing.from_spec(stored.spec).tick_after(stored.anchor_ms, now_ms)
            result, flat = await self._resume(
                keys=[schedule_key(schedule_id), SCHEDULE_DUE, SCHEDULE_SIGNAL],
                args=[schedule_id, stored.version, next_ms],
            )
            if int(result) == _RESUME_STALE:
                continue  # the spec changed between the read and the script: compute the tick again
            if int(result) == SWITCH_NOT_FOUND:
                return SWITCH_NOT_FOUND, None
            return int(result), StoredSchedule.parse(schedule_id, _pairs(flat))

    async def get(self, schedule_id: str) -> StoredSchedule | None:
        """The schedule, or None (also while a deleted one waits for its last tick to be recorded)."""
        raw = await self._redis.hgetall(schedule_key(schedule_id))  # type: ignore[misc]
        return StoredSchedule.parse(schedule_id, raw) if raw and b"deleting" not in raw else None

    async def page(self, after_id: str, count: int) -> list[StoredSchedule]:
        """Up to ``count`` schedules with ids after ``after_id``, in id order."""
        low = f"({after_id}" if after_id else "-"
        ids = [_text(i) for i in await self._redis.zrangebylex(SCHEDULE_IDS, low, "+", start=0, num=count)]
        if not ids:
            return []
        async with pipeline(self._redis) as pipe:
            for schedule_id in ids:
                pipe.hgetall(schedule_key(schedule_id))
            raws = await pipe.execute()
        return [
            StoredSchedule.parse(i, raw) for i, raw in zip(ids, raws, strict=True) if raw and b"deleting" not in raw
        ]

    async def delete(self, schedule_id: str) -> tuple[StoredSchedule | None, InFlight | None]:
        """Stop a schedule at once; returns it and its in-flight tick, if any.

        Without a tick in flight the schedule is gone. With one, it stays hidden until that
        tick's job is recorded (:meth:`fired` then removes it): finish the tick with
        ``enqueue_tick``; if that fails, a loop takes it over after the lease.
        """
        flat = await self._delete(
            keys=[schedule_key(schedule_id), SCHEDULE_IDS, SCHEDULE_DUE, SCHEDULE_INFLIGHT, SCHEDULE_SIGNAL],
            args=[schedule_id],
        )
        if not flat:
            return None, None
        raw = _pairs(flat)
        stored = StoredSchedule.parse(schedule_id, raw)
        inflight = None
        if stored.inflight_ms:
            spec = parse_spec(schedule_id, raw[b"inflight_spec"])
            inflight = InFlight(schedule_id, stored.inflight_ms, spec)
        return stored, inflight

    async def claim(self, stored: StoredSchedule, new_next_ms: int, fire_ms: int, now_ms: int) -> bool:
        """Compare-and-set: move ``next`` on from what ``stored`` saw, marking ``fire_ms`` in flight.

        Fails (False) when the schedule was deleted, changed, or moved on by another
        process since ``stored`` was read, or when a tick is still in flight.
        """
        ok = await self._claim(
            keys=[schedule_key(stored.schedule_id), SCHEDULE_DUE, SCHEDULE_INFLIGHT],
            args=[
                stored.schedule_id,
                stored.version,
                stored.next_raw,
                new_next_ms,
                fire_ms,
                now_ms + INFLIGHT_LEASE_MS,
            ],
        )
        return bool(ok)

    async def fired(self, schedule_id: str, tick_ms: int, job_id: str, now_ms: int) -> bool:
        """Record that the in-flight tick's job exists; False if it was already recorded or deleted."""
        ok = await self._fired(
            keys=[schedule_key(schedule_id), SCHEDULE_INFLIGHT, SCHEDULE_SIGNAL],
            args=[schedule_id, tick_ms, job_id, now_ms],
        )
        return bool(ok)

    async def take_over(self, schedule_id: str, now_ms: int) -> InFlight | None:
        """Take over an in-flight tick whose lease ran out (its process died), renewing the lease."""
        raw = await self._takeover(
            keys=[schedule_key(schedule_id), SCHEDULE_INFLIGHT],
            args=[schedule_id, now_ms, now_ms + INFLIGHT_LEASE_MS],
        )
        if not raw:
            return None
        return InFlight(schedule_id, int(raw[0]), parse_spec(schedule_id, raw[1]))

    async def due(self, now_ms: int, count: int = 100) -> tuple[list[str], list[str], int]:
        """Due schedule ids, in-flight ticks to take over, and the earliest future time to look again (0: none)."""
        async with pipeline(self._redis) as pipe:
            pipe.zrangebyscore(SCHEDULE_DUE, "-inf", now_ms, start=0, num=count)
            pipe.zrangebyscore(SCHEDULE_INFLIGHT, "-inf", now_ms, start=0, num=count)
            pipe.zrangebyscore(SCHEDULE_DUE, f"({now_ms}", "+inf", start=0, num=1, withscores=True)
            pipe.zrangebyscore(SCHEDULE_INFLIGHT, f"({now_ms}", "+inf", start=0, num=1, withscores=True)
            due, stale, next_due, next_stale = await pipe.execute()
        wake = [int(score) for _, score in (*next_due, *next_stale)]
        return [_text(i) for i in due], [_text(i) for i in stale], min(wake) if wake else 0
