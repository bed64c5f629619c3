"""ScheduleService: repeatable jobs (validation, the RPCs, and enqueueing one tick's job).

The state and the tick arithmetic are in conveyor.common.schedules; the firing loop runs
in every worker (conveyor.worker.scheduler) and calls conveyor.common.enqueue.enqueue_tick,
so a tick's job goes through exactly the producer's own validation and enqueue path (both
services share it through libs/common; neither imports the other).
"""

from __future__ import annotations

import re
import time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
import structlog

from conveyor.common.enqueue import Enqueuer, enqueue_tick
from conveyor.common.errors import InvalidArgument, NotFound
from conveyor.common.schedules import (
    MIN_INTERVAL_MS,
    SWITCH_CHANGED,
    SWITCH_NOT_FOUND,
    UPSERT_CREATED,
    UPSERT_NOT_FOUND,
    ScheduleStore,
    cron_error,
    timestamp_ms,
)
from conveyor.common.validate import validate
from conveyor.v1 import schedule_service_pb2, schedule_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
log = structlog.get_logger("conveyor.schedules")

SCHEDULE_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
MAX_INTERVAL_MS = 3660 * 24 * 3600 * 1000
DEFAULT_PAGE = 100
MAX_PAGE = 1000
_POLICIES = frozenset(schedule_service_pb2.MissedTickPolicy.values())


def _check_id(schedule_id: str) -> None:
    if not schedule_id:
        raise InvalidArgument({"schedule_id": "required"})
    if not SCHEDULE_ID_RE.match(schedule_id):
        raise InvalidArgument({"schedule_id": "must be 1-128 characters from A-Z a-z 0-9 _ . : -"})


def validate_spec(spec: schedule_service_pb2.ScheduleSpec, max_payload_bytes: int) -> None:
    """Raise one InvalidArgument naming every bad field of ``spec`` (``spec.cron``, ``spec.template.queue``...)."""
    bad: dict[str, str] = {}
    has_interval = spec.HasField("interval")
    if spec.cron and has_interval:
        bad["spec.cron"] = "set either cron or interval, not both"
    elif not spec.cron and not has_interval:
        bad["spec.cron"] = "set one of cron and interval"
    elif spec.cron:
        why = cron_error(spec.cron)
        if why:
            bad["spec.cron"] = why
    if spec.time_zone:
        if not spec.cron:
            bad["spec.time_zone"] = "only with cron"
        else:
            try:
                ZoneInfo(spec.time_zone)
            except (ZoneInfoNotFoundError, ValueError):
                bad["spec.time_zone"] = f"unknown IANA time zone {spec.time_zone!r}"
    if has_interval:
        d = spec.interval
        if d.seconds < 0 or d.nanos < 0 or timestamp_ms(d.seconds, d.nanos) <= 0:
            bad["spec.interval"] = "must be positive"
        elif timestamp_ms(d.seconds, d.nanos) < MIN_INTERVAL_MS:
            bad["spec.interval"] = "must be at least 1 s"
        elif timestamp_ms(d.seconds, d.nanos) > MAX_INTERVAL_MS:
            bad["spec.interval"] = "must be at most 3,660 days"
    for name in ("start_at", "end_at"):
        if spec.HasField(name) and not 0 <= getattr(spec, name).nanos < 1_000_000_000:
            bad[f"spec.{name}"] = "nanos must be 0 to 999,999,999"
    if spec.HasField("start_at") and spec.HasField("end_at"):
        start = timestamp_ms(spec.start_at.seconds, spec.start_at.nanos)
        if timestamp_ms(spec.end_at.seconds, spec.end_at.nanos) <= start:
            bad["spec.end_at"] = "must be after start_at"
    if spec.missed_tick_policy not in _POLICIES:
        bad["spec.missed_tick_policy"] = "unknown policy"

    if not spec.HasField("template"):
        bad["spec.template"] = "required"
    else:
        t = spec.template
        if t.idempotency_key:
            bad["spec.template.idempotency_key"] = "must be empty: each tick derives its own key"
        if t.HasField("run_at"):
            bad["spec.template.run_at"] = "not allowed in a template; use delay (counted from the tick)"
        _, violations = validate(t, max_payload_bytes, "spec.template.", time.time_ns() // 1_000_000)
        bad.update(violations)
    if bad:
        raise InvalidArgument(bad)


class ScheduleServicer(schedule_service_pb2_grpc.ScheduleServiceServicer):
    """CreateSchedule, UpdateSchedule, DeleteSchedule, GetSchedule, ListSchedules, PauseSchedule, ResumeSchedule."""

    def __init__(self, store: ScheduleStore, enqueuer: Enqueuer, max_payload_bytes: int) -> None:
        self._store = store
        self._enqueuer = enqueuer
        self._max_payload_bytes = max_payload_bytes

    async def _upsert(
        self, schedule_id: str, spec: schedule_service_pb2.ScheduleSpec, create: bool
    ) -> tuple[schedule_service_pb2.Schedule, bool]:
        _check_id(schedule_id)
        validate_spec(spec, self._max_payload_bytes)
        outcome, stored = await self._store.upsert(schedule_id, spec, time.time_ns() // 1_000_000, create)
        if outcome == UPSERT_NOT_FOUND or stored is None:
            raise NotFound(f"schedule {schedule_id!r} does not exist")
        log.info("schedule_saved", schedule_id=schedule_id, outcome=outcome, next_ms=stored.next_ms)
        return stored.to_proto(), outcome == UPSERT_CREATED

    async def CreateSchedule(
        self, request: schedule_service_pb2.CreateScheduleRequest, context: Context
    ) -> schedule_service_pb2.CreateScheduleResponse:
        schedule, created = await self._upsert(request.schedule_id, request.spec, create=True)
        return schedule_service_pb2.CreateScheduleResponse(schedule=schedule, created=created)

    async def UpdateSchedule(
        self, request: schedule_service_pb2.UpdateScheduleRequest, context: Context
    ) -> schedule_service_pb2.UpdateScheduleResponse:
        schedule, _ = await self._upsert(request.schedule_id, request.spec, create=False)
        return schedule_service_pb2.UpdateScheduleResponse(schedule=schedule)

    async def DeleteSchedule(
        self, request: schedule_service_pb2.DeleteScheduleRequest, context: Context
    ) -> schedule_service_pb2.DeleteScheduleResponse:
        _check_id(request.schedule_id)
        stored, inflight = await self._store.delete(request.schedule_id)
        if stored is None:
            raise NotFound(f"schedule {request.schedule_id!r} does not exist")
        if inflight is not None:
            # A loop claimed a tick just before the delete and may not have enqueued it yet:
            # finish it here (same derived key, so at most the one job), so that no job
            # appears after this call returns.
            await enqueue_tick(self._enqueuer, self._store, inflight)
        log.info("schedule_deleted", schedule_id=request.schedule_id)
        return schedule_service_pb2.DeleteScheduleResponse(schedule=stored.to_proto())

    async def GetSchedule(
        self, request: schedule_service_pb2.GetScheduleRequest, context: Context
    ) -> schedule_service_pb2.GetScheduleResponse:
        _check_id(request.schedule_id)
        stored = await self._store.get(request.schedule_id)
        if stored is None:
            raise NotFound(f"schedule {request.schedule_id!r} does not exist")
        return schedule_service_pb2.GetScheduleResponse(schedule=stored.to_proto())

    async def ListSchedules(
        self, request: schedule_service_pb2.ListSchedulesRequest, context: Context
    ) -> schedule_service_pb2.ListSchedulesResponse:
        if not 0 <= request.page_size <= MAX_PAGE:
            raise InvalidArgument({"page_size": f"must be 0 (default {DEFAULT_PAGE}) to {MAX_PAGE}"})
        if request.page_token and not SCHEDULE_ID_RE.match(request.page_token):
            raise InvalidArgument({"page_token": "not a token from ListSchedules; start without one"})
        size = request.page_size or DEFAULT_PAGE
        page = await self._store.page(request.page_token, size + 1)
        out = schedule_service_pb2.ListSchedulesResponse(schedules=[s.to_proto() for s in page[:size]])
        if len(page) > size:
            out.next_page_token = page[size - 1].schedule_id
        return out

    async def PauseSchedule(
        self, request: schedule_service_pb2.PauseScheduleRequest, context: Context
    ) -> schedule_service_pb2.PauseScheduleResponse:
        _check_id(request.schedule_id)
        outcome, stored = await self._store.pause(request.schedule_id, time.time_ns() // 1_000_000)
        if outcome == SWITCH_NOT_FOUND or stored is None:
            raise NotFound(f"schedule {request.schedule_id!r} does not exist")
        log.info("schedule_paused", schedule_id=request.schedule_id, changed=outcome == SWITCH_CHANGED)
        return schedule_service_pb2.PauseScheduleResponse(schedule=stored.to_proto(), changed=outcome == SWITCH_CHANGED)

    async def ResumeSchedule(
        self, request: schedule_service_pb2.ResumeScheduleRequest, context: Context
    ) -> schedule_service_pb2.ResumeScheduleResponse:
        _check_id(request.schedule_id)
        outcome, stored = await self._store.resume(request.schedule_id, time.time_ns() // 1_000_000)
        if outcome == SWITCH_NOT_FOUND or stored is None:
            raise NotFound(f"schedule {request.schedule_id!r} does not exist")
        log.info("schedule_resumed", schedule_id=request.schedule_id, changed=outcome == SWITCH_CHANGED)
        return schedule_service_pb2.ResumeScheduleResponse(
            schedule=stored.to_proto(), changed=outcome == SWITCH_CHANGED
        )
