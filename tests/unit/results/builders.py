"""JobEvent builders for the results tests (unit and integration): the events producer and workers emit."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from conveyor.common.ids import new_ulid
from conveyor.v1 import event_pb2, job_pb2

BASE_S = 1_764_000_000  # 2025-11-24, a fixed clock for reproducible times


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp ``seconds`` after BASE_S."""
    out = timestamp_pb2.Timestamp()
    out.FromMicroseconds(int((BASE_S + seconds) * 1_000_000))
    return out


def stored(event: event_pb2.JobEvent) -> bytes:
    """``event`` serialized as Redis keeps it: without the job id, nor the job's id and queue (ADR 0001)."""
    out = event_pb2.JobEvent()
    out.CopyFrom(event)
    out.ClearField("job_id")
    if out.HasField("job"):
        out.job.ClearField("id")
        out.job.ClearField("queue")
    return out.SerializeToString()


class JobHistory:
    """Events of one job, with times ``at`` seconds after BASE_S."""

    def __init__(
        self,
        queue: str = "default",
        type: str = "demo.echo",
        payload: Any = None,
        created: float = 0.0,
        labels: dict[str, str] | None = None,
        priority: int = 5,
        job_id: str | None = None,
    ) -> None:
        self.job_id = job_id or f"{queue}/{new_ulid()}"
        self.job = job_pb2.Job(
            id=self.job_id,
            queue=queue,
            type=type,
            priority=priority,
            labels=labels or {},
            idempotency_key="key-" + self.job_id[-6:],
            retry=job_pb2.RetryPolicy(max_attempts=3, backoff=job_pb2.BACKOFF_EXPONENTIAL),
            timeout=duration_pb2.Duration(seconds=30),
        )
        self.job.created_at.CopyFrom(ts(created))
        self.payload_json = json.dumps(payload if payload is not None else {"n": 1}).encode()

    def _event(self, etype: int, at: float, attempt: int, **fields: Any) -> event_pb2.JobEvent:
        event = event_pb2.JobEvent(job_id=self.job_id, type=etype, attempt=attempt, **fields)  # type: ignore[arg-type]
        event.time.CopyFrom(ts(at))
        return event

    def _with_job(self, event: event_pb2.JobEvent, payload: bool) -> event_pb2.JobEvent:
        event.job.CopyFrom(self.job)
        if payload:
            event.job.payload_json = self.payload_json
        return event

    def queued(self, at: float | None = None, attempt: int = 0) -> event_pb2.JobEvent:
        when = self.job.created_at.ToMicroseconds() / 1e6 - BASE_S if at is None else at
        return self._with_job(self._event(event_pb2.EVENT_TYPE_QUEUED, when, attempt), payload=False)

    def delayed(self, at: float, until: float) -> event_pb2.JobEvent:
        return self._event(event_pb2.EVENT_TYPE_DELAYED, at, 0, next_run_at=ts(until))

    def active(self, at: float, attempt: int = 1, worker: str = "w1") -> event_pb2.JobEvent:
        return self._event(event_pb2.EVENT_TYPE_ACTIVE, at, attempt, worker=worker)

    def progress(self, at: float, percent: float, message: str = "", attempt: int = 1) -> event_pb2.JobEvent:
        return self._event(
            event_pb2.EVENT_TYPE_PROGRESS,
            at,
            attempt,
            worker="w1",
            progress=job_pb2.Progress(percent=percent, message=message),
        )

    def retry(self, at: float, until: float, message: str = "boom", attempt: int = 1) -> event_pb2.JobEvent:
        return self._event(
            event_pb2.EVENT_TYPE_RETRY_SCHEDULED,
            at,
            attempt,
            error=job_pb2.JobError(message=message, kind="RuntimeError", retryable=True),
            next_run_at=ts(until),
        )

    def succeeded(self, at: float, result: Any, attempt: int = 1, worker: str = "w1") -> event_pb2.JobEvent:
        event = self._event(
            event_pb2.EVENT_TYPE_SUCCEEDED, at, attempt, worker=worker, result_json=json.dumps(result).encode()
        )
        return self._with_job(event, payload=True)

    def failed(self, at: float, etype: int = event_pb2.EVENT_TYPE_FAILED, attempt: int = 1) -> event_pb2.JobEvent:
        event = self._event(
            etype, at, attempt, error=job_pb2.JobError(message="gave up", kind="ValueError", retryable=False)
        )
        return self._with_job(event, payload=True)

    def lifecycle(self, start: float = 0.0, result: Any = None) -> list[event_pb2.JobEvent]:
        """QUEUED → ACTIVE → PROGRESS → SUCCEEDED."""
        return [
            self.queued(start),
            self.active(start + 1),
            self.progress(start + 2, 50.0, "half way"),
            self.succeeded(start + 3, result if result is not None else {"ok": True}),
        ]
