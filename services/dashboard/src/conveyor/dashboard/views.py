"""Turns the API's protobuf messages into plain dicts for the templates and the browser."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from conveyor.common.codec import dumps
from conveyor.common.errors import InvalidArgument
from conveyor.v1 import admin_service_pb2, event_pb2, job_pb2, limits_pb2, results_service_pb2, schedule_service_pb2

FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "DEAD_LETTERED", "CANCELLED"})
JOB_STATES = [v.name.removeprefix("JOB_STATE_") for v in job_pb2.JobState.DESCRIPTOR.values if v.number != 0]

# The state a job is in after an event of each type.
STATE_AFTER = {
    "QUEUED": "QUEUED",
    "ACTIVE": "ACTIVE",
    "PROGRESS": "ACTIVE",
    "RETRY_SCHEDULED": "RETRY_SCHEDULED",
    "SUCCEEDED": "SUCCEEDED",
    "FAILED": "FAILED",
    "DEAD_LETTERED": "DEAD_LETTERED",
    "CANCELLED": "CANCELLED",
    "DELAYED": "DELAYED",
}


def ts(message: Message, field: str) -> str:
    """An optional Timestamp field as ISO 8601 UTC (seconds), or "" when absent."""
    if not message.HasField(field):
        return ""
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def state_name(state: int) -> str:
    return job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def duration(message: Message, field: str) -> str:
    if not message.HasField(field):
        return ""
    seconds = getattr(message, field).ToTimedelta().total_seconds()
    return f"{seconds:g}s"


def human_seconds(seconds: float) -> str:
    """60 -> "1 min", 3600 -> "1 h", 1.5 -> "1.5 s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def rate_text(rate: limits_pb2.RateLimit) -> str:
    return f"{rate.limit} per {human_seconds(rate.period.ToTimedelta().total_seconds())}"


def limits_summary(limits: limits_pb2.QueueLimits) -> str:
    """One line: the limits in force, or "none"."""
    parts = []
    if limits.HasField("rate") and limits.rate.limit:
        parts.append(f"rate {rate_text(limits.rate)}")
    if limits.concurrency:
        parts.append(f"at most {limits.concurrency} running")
    if limits.HasField("rate_per_key") and limits.rate_per_key.limit:
        parts.append(f"each key {rate_text(limits.rate_per_key)}")
    if limits.concurrency_per_key:
        parts.append(f"each key at most {limits.concurrency_per_key} running")
    if limits.keys:
        parts.append(f"{len(limits.keys)} keys with own limits")
    if limits.HasField("backed_off_until"):
        parts.append(f"backed off until {ts(limits, 'backed_off_until')}")
    if limits.blocked_keys:
        parts.append(f"{len(limits.blocked_keys)} keys held back")
    return ", ".join(parts) or "none"


def queue_row(q: admin_service_pb2.QueueStats) -> dict[str, Any]:
    return {
        "limits": limits_summary(q.limits),
        "queue": q.queue,
        "paused": q.paused,
        "queued": q.queued,
        "delayed": q.delayed,
        "retry_scheduled": q.retry_scheduled,
        "active": q.active,
        "held": q.held,
        "orphaned": q.orphaned,
        "dead_lettered": q.dead_lettered,
        "workers": q.workers,
        "oldest_queued": ts(q, "oldest_queued_time"),
        "next_due": ts(q, "next_due_time"),
        "read_time": ts(q, "read_time"),
        "bands": [{"priority": b.priority, "queued": b.queued, "active": b.active} for b in q.bands],
    }


def limits_view(limits: Message) -> dict[str, Any]:
    return MessageToDict(limits, preserving_proto_field_name=True)


def finished_view(stats: results_service_pb2.FinishedStats) -> list[dict[str, Any]]:
    return [
        {
            "window": human_seconds(w.window.ToTimedelta().total_seconds()),
            "succeeded": w.succeeded,
            "failed": w.failed,
            "dead_lettered": w.dead_lettered,
            "cancelled": w.cancelled,
            "jobs_per_second": round(w.jobs_per_second, 4),
        }
        for w in stats.windows
    ]


def job_row(job: job_pb2.Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "queue": job.queue,
        "type": job.type,
        "state": state_name(job.state),
        "priority": job.priority,
        "attempt": job.attempt,
        "created_at": ts(job, "created_at"),
        "started_at": ts(job, "started_at"),
        "finished_at": ts(job, "finished_at"),
        "updated_at": ts(job, "updated_at"),
        "run_at": ts(job, "run_at"),
        "worker": job.worker,
        "rate_key": job.rate_key,
        "labels": dict(job.labels),
        "timeout": duration(job, "timeout"),
        "max_attempts": job.retry.max_attempts,
        "progress": {"percent": job.progress.percent, "message": job.progress.message}
        if job.HasField("progress")
        else None,
        "result": json.dumps(MessageToDict(job.result), indent=2) if job.HasField("result") else "",
        "error": {"message": job.error.message, "kind": job.error.kind, "retryable": job.error.retryable}
        if job.HasField("error")
        else None,
    }


def payload_of(job: job_pb2.Job) -> Any:
    if job.payload_json:
        return json.loads(job.payload_json)
    return MessageToDict(job.payload)


def event_view(event: event_pb2.JobEvent) -> dict[str, Any]:
    kind = event_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
    view: dict[str, Any] = {
        "id": event.id,
        "type": kind,
        "state": STATE_AFTER.get(kind, ""),
        "final": STATE_AFTER.get(kind, "") in FINAL_STATES,
        "attempt": event.attempt,
        "time": ts(event, "time"),
        "worker": event.worker,
        "progress": None,
        "error": None,
        "result": "",
        "next_run_at": ts(event, "next_run_at"),
    }
    if event.HasField("progress"):
        view["progress"] = {"percent": event.progress.percent, "message": event.progress.message}
    if event.HasField("error"):
        view["error"] = {"message": event.error.message, "kind": event.error.kind}
    if event.result_json:
        view["result"] = event.result_json.decode()
    elif event.HasField("result"):
        view["result"] = json.dumps(MessageToDict(event.result))
    return view


def dead_letter_view(d: admin_service_pb2.DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "job_id": d.job.id,
        "type": d.job.type,
        "attempt": d.event.attempt or d.job.attempt,
        "error": d.event.error.message if d.event.HasField("error") else (d.job.error.message or ""),
        "dead_at": ts(d, "dead_at"),
    }


def worker_view(w: admin_service_pb2.WorkerInfo) -> dict[str, Any]:
    return {
        "worker_id": w.worker_id,
        "host": w.host,
        "pid": w.pid,
        "queues": list(w.queues),
        "concurrency": w.concurrency,
        "in_flight": w.in_flight,
        "job_ids": list(w.job_ids),
        "last_heartbeat": ts(w, "last_heartbeat_time"),
        "started": ts(w, "started_time"),
        "version": w.version,
    }


def schedule_view(s: schedule_service_pb2.Schedule) -> dict[str, Any]:
    spec = s.spec
    when = f"cron {spec.cron}" + (f" ({spec.time_zone})" if spec.time_zone else "") if spec.cron else ""
    if not when and spec.HasField("interval"):
        when = f"every {duration(spec, 'interval')}"
    return {
        "id": s.schedule_id,
        "when": when,
        "queue": spec.template.queue,
        "type": spec.template.type,
        "next_fire_at": ts(s, "next_fire_at"),
        "last_tick_at": ts(s, "last_tick_at"),
        "last_job_id": s.last_job_id,
        "paused": s.paused,
        "paused_at": ts(s, "paused_at"),
    }


def schedule_form(s: schedule_service_pb2.Schedule) -> dict[str, Any]:
    """The edit form's fields for a schedule as stored."""
    spec = s.spec
    template = spec.template
    payload = json.loads(template.payload_json) if template.payload_json else MessageToDict(template.payload)
    return {
        "cron": spec.cron,
        "time_zone": spec.time_zone,
        "interval_seconds": int(spec.interval.ToTimedelta().total_seconds()) if spec.HasField("interval") else "",
        "payload": json.dumps(payload, indent=2),
    }


def limit_scope(body: dict[str, Any]) -> tuple[str | None, bool]:
    """What a limit form's ``scope`` (and ``key``) name: ``(key, each_key)`` as the client's limit calls take them.

    ``queue`` (the default): the whole queue; ``each_key``: every rate key without its own limit;
    ``key``: the one rate key ``key``.
    """
    scope = body.get("scope") or "queue"
    if scope == "queue":
        return None, False
    if scope == "each_key":
        return None, True
    if scope == "key":
        key = body.get("key")
        if not isinstance(key, str) or not key.strip():
            raise InvalidArgument({"key": "name the rate key whose limit to set or clear"})
        return key.strip(), False
    raise InvalidArgument({"scope": f"must be queue, each_key or key, got {scope!r}"})


def key_limits_view(limits: limits_pb2.QueueLimits) -> list[dict[str, Any]]:
    """The per-key limits: the default for each key first (key ""), then each key with its own."""
    rows: list[dict[str, Any]] = []
    if (limits.HasField("rate_per_key") and limits.rate_per_key.limit) or limits.concurrency_per_key:
        rows.append(
            {
                "key": "",
                "rate": rate_text(limits.rate_per_key) if limits.HasField("rate_per_key") else "",
                "concurrency": limits.concurrency_per_key,
            }
        )
    for k in limits.keys:
        rows.append(
            {
                "key": k.key,
                "rate": rate_text(k.rate) if k.HasField("rate") and k.rate.limit else "",
                "concurrency": k.concurrency,
            }
        )
    return rows


def whole_number(value: object, field: str) -> int:
    """A positive whole number from a form field (a JSON number or a string of digits)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgument({field: f"must be a whole number above 0, got {value!r}"})
    return value


def edited_spec(old: schedule_service_pb2.ScheduleSpec, body: dict[str, Any]) -> schedule_service_pb2.ScheduleSpec:
    """``old`` with the edit form's timing and payload: cron (and time_zone) or interval_seconds, and payload (JSON).

    Raises:
        InvalidArgument: A field is malformed; nothing is sent.
    """
    spec = schedule_service_pb2.ScheduleSpec()
    spec.CopyFrom(old)
    cron = str(body.get("cron") or "").strip()
    interval = body.get("interval_seconds")
    has_interval = interval not in (None, "")
    if bool(cron) == has_interval:
        raise InvalidArgument({"cron": "give either a cron expression or an interval in seconds, not both"})
    if cron:
        spec.cron = cron
        spec.time_zone = str(body.get("time_zone") or "").strip()
        spec.ClearField("interval")
    else:
        spec.cron = ""
        spec.time_zone = ""
        spec.interval.FromSeconds(whole_number(interval, "interval_seconds"))
    raw = body.get("payload")
    if raw is not None:
        try:
            payload = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError as exc:
            raise InvalidArgument({"payload": f"is not JSON: {exc}"}) from None
        if not isinstance(payload, dict):
            raise InvalidArgument({"payload": "must be a JSON object"})
        spec.template.ClearField("payload")
        spec.template.payload_json = dumps(payload)
    return spec


#: The overview's chart windows: query value -> SeriesWindow.
SERIES_WINDOWS = {
    "hour": results_service_pb2.SERIES_WINDOW_HOUR,
    "day": results_service_pb2.SERIES_WINDOW_DAY,
    "week": results_service_pb2.SERIES_WINDOW_WEEK,
}


def series_view(window: str, reply: results_service_pb2.GetJobSeriesResponse) -> dict[str, Any]:
    """GetJobSeries as the overview's charts draw it: one label and one number per bucket and line."""
    fmt = "%a %H:%M" if window == "week" else "%H:%M"
    buckets = list(reply.buckets)
    return {
        "window": window,
        "bucket": human_seconds(reply.bucket.ToTimedelta().total_seconds()),
        "labels": [b.start.ToDatetime(tzinfo=UTC).strftime(fmt) for b in buckets],
        "succeeded": [b.succeeded for b in buckets],
        "failed": [b.failed for b in buckets],
        "dead_lettered": [b.dead_lettered for b in buckets],
        "cancelled": [b.cancelled for b in buckets],
        "wait_p50": [round(b.wait.p50, 3) for b in buckets],
        "wait_p95": [round(b.wait.p95, 3) for b in buckets],
        "run_p50": [round(b.run.p50, 3) for b in buckets],
        "run_p95": [round(b.run.p95, 3) for b in buckets],
        "finished": sum(b.succeeded + b.failed + b.dead_lettered + b.cancelled for b in buckets),
    }
