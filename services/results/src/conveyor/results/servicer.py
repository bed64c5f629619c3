"""ResultsService: request validation, page tokens, and thin methods over Queries.

Errors are raised as conveyor.common.errors exceptions; the server's interceptor turns them
into statuses (INVALID_ARGUMENT with google.rpc.BadRequest naming the field, NOT_FOUND).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Any

import grpc
import psycopg
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.common import crypto
from conveyor.common.codec import dumps, value_to_python
from conveyor.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from conveyor.common.ids import parse_job_id, parse_stream_id
from conveyor.common.validate import MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS, check_queue, queue_problem
from conveyor.results.queries import (
    FINISHED_WINDOWS_S,
    JSON_NULL,
    SERIES_TIMEOUT_MS,
    SERIES_WINDOWS,
    FieldCondition,
    JobFilter,
    Queries,
    from_us,
    to_us,
)
from conveyor.results.reencrypt import reencrypt_jobs
from conveyor.results.setaside import Missing, SetAsideRow, SetAsideRows
from conveyor.results.store import delete_finished_jobs
from conveyor.v1 import job_pb2, results_service_pb2, results_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_JOBS_PAGE = 100
DEFAULT_EVENTS_PAGE = 1000
MAX_PAGE = 1000
_MAX_BIGINT = 2**63 - 1
_JOB_STATES = frozenset(job_pb2.JobState.values())
_JOB_ID_HELP = "must be a job id '<queue>/<ULID>'"


def _page_size(value: int, default: int, field: str) -> int:
    if value == 0:
        return default
    if value < 0 or value > MAX_PAGE:
        raise InvalidArgument({field: f"must be between 1 and {MAX_PAGE} (0 means {default})"})
    return value


def _job_id(value: str) -> str:
    if not value:
        raise InvalidArgument({"job_id": "is required"})
    if parse_job_id(value) is None:
        raise InvalidArgument({"job_id": _JOB_ID_HELP})
    return value


def _time(ts: Timestamp, field: str) -> datetime:
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument({field: "is out of range"}) from None


#: ListJobs ``where``: at most this many conditions, keys per path, characters per key, bytes of JSON value.
MAX_CONDITIONS = 16
MAX_PATH_KEYS = 16
MAX_KEY_CHARS = 128
MAX_VALUE_BYTES = 4096
_OPERATORS = {
    results_service_pb2.FIELD_OPERATOR_UNSPECIFIED: "eq",
    results_service_pb2.FIELD_OPERATOR_EQ: "eq",
    results_service_pb2.FIELD_OPERATOR_NE: "ne",
    results_service_pb2.FIELD_OPERATOR_LT: "lt",
    results_service_pb2.FIELD_OPERATOR_LE: "le",
    results_service_pb2.FIELD_OPERATOR_GT: "gt",
    results_service_pb2.FIELD_OPERATOR_GE: "ge",
    results_service_pb2.FIELD_OPERATOR_EXISTS: "exists",
    results_service_pb2.FIELD_OPERATOR_CONTAINS: "contains",
}


def _finite(value: struct_pb2.Value) -> bool:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return math.isfinite(value.number_value)
    if kind == "list_value":
        return all(_finite(v) for v in value.list_value.values)
    if kind == "struct_value":
        return all(_finite(v) for v in value.struct_value.fields.values())
    return True


def _condition(index: int, cond: results_service_pb2.FieldFilter, bad: dict[str, str]) -> FieldCondition | None:
    """``cond`` validated, or None with its problems added to ``bad`` (named ``where[i].field``)."""
    name = f"where[{index}]"
    keys = tuple(cond.path.split(".")) if cond.path else ()
    if not keys:
        bad[f"{name}.path"] = "is required: object keys joined by dots, like 'customer.id'"
    elif len(keys) > MAX_PATH_KEYS or any(not k or len(k) > MAX_KEY_CHARS for k in keys):
        bad[f"{name}.path"] = (
            f"must be 1-{MAX_PATH_KEYS} keys of 1-{MAX_KEY_CHARS} characters joined by dots, got {cond.path!r}"
        )
    op = _OPERATORS.get(cond.op)
    if op is None:
        bad[f"{name}.op"] = "is not a FieldOperator"
        return None
    kind = cond.value.WhichOneof("kind") if cond.HasField("value") else None
    value: Any = None
    if op == "exists":
        if kind is not None:
            bad[f"{name}.value"] = "must be left unset with FIELD_OPERATOR_EXISTS"
    elif kind is None:
        bad[f"{name}.value"] = f"is required with FIELD_OPERATOR_{op.upper()} (a JSON value; null is null_value)"
    elif not _finite(cond.value):
        bad[f"{name}.value"] = "numbers must be finite"
    elif op in ("lt", "le", "gt", "ge") and kind not in ("number_value", "string_value"):
        bad[f"{name}.value"] = f"must be a number or a string with FIELD_OPERATOR_{op.upper()}"
    else:
        value = JSON_NULL if kind == "null_value" else value_to_python(cond.value)
        if len(dumps(None if value is JSON_NULL else value)) > MAX_VALUE_BYTES:
            bad[f"{name}.value"] = f"must be at most {MAX_VALUE_BYTES} bytes of JSON"
    if f"{name}.path" in bad or f"{name}.value" in bad:
        return None
    return FieldCondition(keys, op, value)


def _search(request: results_service_pb2.ListJobsRequest, bad: dict[str, str]) -> dict[str, Any]:
    """The labels and where filters of ``request``, validated (problems added to ``bad``)."""
    if len(request.labels) > MAX_LABELS:
        bad["labels"] = f"at most {MAX_LABELS} labels"
    for key, value in request.labels.items():
        if not key or len(key.encode()) > MAX_LABEL_KEY:
            bad[f"labels[{key!r}]"] = f"keys must be 1-{MAX_LABEL_KEY} bytes"
        elif len(value.encode()) > MAX_LABEL_VALUE:
            bad[f"labels[{key!r}]"] = f"values must be at most {MAX_LABEL_VALUE} bytes"
    conditions: list[FieldCondition] = []
    if len(request.where) > MAX_CONDITIONS:
        bad["where"] = f"at most {MAX_CONDITIONS} conditions"
    else:
        for i, cond in enumerate(request.where):
            checked = _condition(i, cond, bad)
            if checked is not None:
                conditions.append(checked)
    return {"labels": tuple(sorted(request.labels.items())), "where": tuple(conditions)}


def _filters(request: results_service_pb2.ListJobsRequest) -> JobFilter:
    violations: dict[str, str] = {}
    if request.queue and (problem := queue_problem(request.queue)) is not None:
        violations["queue"] = problem
    if request.state not in _JOB_STATES:
        violations["state"] = "is not a JobState"
    search = _search(request, violations)
    filters = JobFilter(
        queue=request.queue,
        state=request.state if "state" not in violations else 0,
        type=request.type,
        created_after=_time(request.created_after, "created_after") if request.HasField("created_after") else None,
        created_before=_time(request.created_before, "created_before") if request.HasField("created_before") else None,
        **search,
    )
    if violations:
        raise InvalidArgument(violations)
    if filters.where:
        _refuse_search_of_encrypted(request.queue)
    return filters


def _refuse_search_of_encrypted(queue: str) -> None:
    """Payload conditions cannot work on an encrypted queue: PostgreSQL holds only ciphertext (ADR 0025)."""
    encryption = crypto.current()
    if queue and encryption.encrypts(queue):
        raise FailedPrecondition(
            f"queue {queue!r} is encrypted at rest (CONVEYOR_ENCRYPTED_QUEUES): its payloads are stored as "
            "ciphertext, so payload conditions (where) cannot match them; filter by queue, type, state, "
            "time or labels instead",
            subject=f"queue:{queue}",
            kind="ENCRYPTED_QUEUE",
        )
    if not queue and encryption.queues:
        named = "every queue" if encryption.all_queues else ", ".join(sorted(encryption.queues))
        raise FailedPrecondition(
            f"payload conditions (where) need a queue that is not encrypted: the payloads of {named} are "
            "stored as ciphertext (CONVEYOR_ENCRYPTED_QUEUES), so name a queue whose payloads are not",
            subject="where",
            kind="ENCRYPTED_QUEUE",
        )


def filter_hash(filters: JobFilter) -> str:
    """A short digest of ``filters``, carried in page tokens to refuse a token used with other filters."""
    fields: list[Any] = [
        filters.queue,
        filters.state,
        filters.type,
        to_us(filters.created_after) if filters.created_after is not None else None,
        to_us(filters.created_before) if filters.created_before is not None else None,
    ]
    if filters.labels or filters.where:
        # Only when present, so tokens issued before these filters existed stay valid.
        fields.append([list(kv) for kv in filters.labels])
        fields.append(
            # [] for "no value" (exists), [null] for the JSON null, [v] otherwise.
            [
                [list(c.path), c.op, [] if c.value is None else [None if c.value is JSON_NULL else c.value]]
                for c in filters.where
            ]
        )
    canonical = json.dumps(fields, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_page_token(created_at: datetime, job_id: str, filters: JobFilter) -> str:
    """An opaque token for the page after the job (created_at, job_id)."""
    raw = json.dumps({"c": to_us(created_at), "j": job_id, "f": filter_hash(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, filters: JobFilter) -> tuple[datetime, str]:
    """The (created_at, job_id) a token continues after.

    Raises:
        InvalidArgument: The token is not one of ours, or was made for other filters.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        created_us, job_id, digest = data["c"], data["j"], data["f"]
        if not isinstance(created_us, int) or not isinstance(job_id, str) or not isinstance(digest, str):
            raise ValueError("bad token fields")
        created_at = from_us(created_us)
    except (ValueError, TypeError, KeyError, OverflowError, binascii.Error):
        raise InvalidArgument({"page_token": "is not a token from a previous ListJobs response"}) from None
    if digest != filter_hash(filters):
        raise InvalidArgument({"page_token": "was issued for different filters; use the same filters or start over"})
    return created_at, job_id


class ResultsServicer(results_service_pb2_grpc.ResultsServiceServicer):
    """Serves jobs and their histories from PostgreSQL.

    Args:
        queries: The read side of the results database.
        set_aside: The projector's set-aside entries (ListSetAside, ReplaySetAside, DiscardSetAside).
    """

    def __init__(self, queries: Queries, set_aside: SetAsideRows) -> None:
        self._queries = queries
        self._set_aside = set_aside

    async def GetJob(
        self, request: results_service_pb2.ResultsServiceGetJobRequest, context: Context
    ) -> results_service_pb2.ResultsServiceGetJobResponse:
        job_id = _job_id(request.job_id)
        job = await self._queries.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return results_service_pb2.ResultsServiceGetJobResponse(job=job)

    async def ListJobs(
        self, request: results_service_pb2.ListJobsRequest, context: Context
    ) -> results_service_pb2.ListJobsResponse:
        limit = _page_size(request.page_size, DEFAULT_JOBS_PAGE, "page_size")
        filters = _filters(request)
        after = decode_page_token(request.page_token, filters) if request.page_token else None
        # One more than asked tells whether another page follows, so the last page has no token.
        found = await self._queries.list_jobs(filters, after, limit + 1)
        page = found[:limit]
        response = results_service_pb2.ListJobsResponse(jobs=[job for job, _ in page])
        if len(found) > limit:
            last_job, last_created = page[-1]
            response.next_page_token = encode_page_token(last_created, last_job.id, filters)
        return response

    async def ListJobEvents(
        self, request: results_service_pb2.ListJobEventsRequest, context: Context
    ) -> results_service_pb2.ListJobEventsResponse:
        job_id = _job_id(request.job_id)
        limit = _page_size(request.page_size, DEFAULT_EVENTS_PAGE, "page_size")
        after: tuple[int, int] | None = None
        if request.after_event_id:
            after = parse_stream_id(request.after_event_id)
            if after is None:
                raise InvalidArgument({"after_event_id": "must be an event id like '1732540000000-0'"})
            after = (min(after[0], _MAX_BIGINT), min(after[1], _MAX_BIGINT))
        events = await self._queries.list_events(job_id, after, limit + 1)
        if not events and not await self._queries.job_exists(job_id):
            raise NotFound(f"job {job_id} not found")
        return results_service_pb2.ListJobEventsResponse(events=events[:limit], has_more=len(events) > limit)

    async def GetFinishedStats(
        self, request: results_service_pb2.GetFinishedStatsRequest, context: Context
    ) -> results_service_pb2.GetFinishedStatsResponse:
        check_queue(request.queue)
        counts = await self._queries.finished_stats(request.queue)
        stats = results_service_pb2.FinishedStats()
        stats.as_of.FromDatetime(counts.as_of)
        for i, seconds in enumerate(FINISHED_WINDOWS_S):
            window = stats.windows.add(
                succeeded=_count(counts.by_state, job_pb2.JOB_STATE_SUCCEEDED, i),
                failed=_count(counts.by_state, job_pb2.JOB_STATE_FAILED, i),
                dead_lettered=_count(counts.by_state, job_pb2.JOB_STATE_DEAD_LETTERED, i),
                cancelled=_count(counts.by_state, job_pb2.JOB_STATE_CANCELLED, i),
            )
            window.window.FromSeconds(seconds)
            finished = window.succeeded + window.failed + window.dead_lettered + window.cancelled
            window.jobs_per_second = finished / seconds
        return results_service_pb2.GetFinishedStatsResponse(stats=stats)

    async def ListSetAside(
        self, request: results_service_pb2.ListSetAsideRequest, context: Context
    ) -> results_service_pb2.ListSetAsideResponse:
        limit = _page_size(request.page_size, DEFAULT_SET_ASIDE_PAGE, "page_size")
        if request.queue:
            check_queue(request.queue)
        after = _decode_set_aside_token(request.page_token, request.queue) if request.page_token else 0
        found = await self._set_aside.page(request.queue, after, limit + 1)
        page = found[:limit]
        response = results_service_pb2.ListSetAsideResponse(entries=[_set_aside_entry(r) for r in page])
        if len(found) > limit:
            response.next_page_token = _encode_set_aside_token(page[-1].id, request.queue)
        return response

    async def ReplaySetAside(
        self, request: results_service_pb2.ReplaySetAsideRequest, context: Context
    ) -> results_service_pb2.ReplaySetAsideResponse:
        if request.all:
            if request.ids:
                raise InvalidArgument({"ids": "must be empty when all is set"})
            replayed, refused_count, refused = await self._set_aside.replay_all(MAX_PAGE)
            return results_service_pb2.ReplaySetAsideResponse(
                replayed=replayed, refused=[_set_aside_entry(r) for r in refused], refused_count=refused_count
            )
        ids = _set_aside_ids(list(request.ids), "or set all to replay every entry")
        rows = await self._set_aside.get(ids)
        missing = sorted(set(ids) - {r.id for r in rows})
        if missing:
            raise NotFound(f"no set-aside entries with ids {missing}; nothing was replayed")
        outcome = await self._set_aside.replay(rows)
        return results_service_pb2.ReplaySetAsideResponse(
            replayed=outcome.replayed,
            refused=[_set_aside_entry(r) for r in outcome.refused],
            refused_count=len(outcome.refused),
        )

    async def DiscardSetAside(
        self, request: results_service_pb2.DiscardSetAsideRequest, context: Context
    ) -> results_service_pb2.DiscardSetAsideResponse:
        ids = _set_aside_ids(list(request.ids), "(discarding is explicit: there is no 'all')")
        try:
            deleted = await self._set_aside.discard(ids)
        except Missing as exc:
            raise NotFound(f"no set-aside entries with ids {exc.ids}; nothing was discarded") from None
        return results_service_pb2.DiscardSetAsideResponse(discarded=len(deleted or ()))

    async def GetJobSeries(
        self, request: results_service_pb2.GetJobSeriesRequest, context: Context
    ) -> results_service_pb2.GetJobSeriesResponse:
        if request.queue and (problem := queue_problem(request.queue)) is not None:
            raise InvalidArgument({"queue": f"{problem} (or empty for all)"})
        window = request.window or results_service_pb2.SERIES_WINDOW_HOUR
        if window not in SERIES_WINDOWS:
            raise InvalidArgument({"window": "must be SERIES_WINDOW_HOUR, SERIES_WINDOW_DAY or SERIES_WINDOW_WEEK"})
        bucket_s, count = SERIES_WINDOWS[window]
        try:
            start, rows = await self._queries.job_series(request.queue, bucket_s, count)
        except psycopg.errors.QueryCanceled:
            raise ResourceExhausted(
                f"the series took longer than {SERIES_TIMEOUT_MS // 1000} s to compute and was stopped;"
                " ask for a shorter window or one queue"
            ) from None
        found = {r.bucket: r for r in rows}
        response = results_service_pb2.GetJobSeriesResponse()
        response.bucket.FromSeconds(bucket_s)
        response.start.FromSeconds(start)
        response.end.FromSeconds(start + bucket_s * count)
        for i in range(count):
            bucket = response.buckets.add()
            bucket.start.FromSeconds(start + i * bucket_s)
            row = found.get(i)
            if row is None:
                continue
            bucket.succeeded, bucket.failed = row.succeeded, row.failed
            bucket.dead_lettered, bucket.cancelled = row.dead_lettered, row.cancelled
            bucket.wait.p50, bucket.wait.p95, bucket.wait.p99 = row.wait
            bucket.run.p50, bucket.run.p95, bucket.run.p99 = row.run
        return response

    async def DeleteJobs(
        self, request: results_service_pb2.DeleteJobsRequest, context: Context
    ) -> results_service_pb2.DeleteJobsResponse:
        ids = _delete_ids(list(request.job_ids))
        deleted, kept = await delete_finished_jobs(self._queries.pool, ids)
        response = results_service_pb2.DeleteJobsResponse(deleted=deleted)
        gone = set(deleted)
        for job_id in ids:
            if job_id in gone:
                continue
            state = kept.get(job_id)
            if state is None:
                response.refused.add(job_id=job_id, reason="not found")
            else:
                name = job_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]
                response.refused.add(
                    job_id=job_id, state=state, reason=f"not finished ({name}): cancel it or wait for it to end"
                )
        return response

    async def ReEncryptJobs(
        self, request: results_service_pb2.ReEncryptJobsRequest, context: Context
    ) -> results_service_pb2.ReEncryptJobsResponse:
        check_queue(request.queue)
        if request.max_jobs < 0 or request.max_jobs > MAX_REENCRYPT:
            raise InvalidArgument({"max_jobs": f"must be between 1 and {MAX_REENCRYPT} (0 means {DEFAULT_REENCRYPT})"})
        if request.after_job_id and parse_job_id(request.after_job_id) is None:
            raise InvalidArgument({"after_job_id": _JOB_ID_HELP})
        encryption = crypto.current()
        if encryption.keyring is None:
            raise FailedPrecondition(
                "this results service has no keyring: start it with CONVEYOR_KEYRING_FILE or CONVEYOR_KEYRING "
                "holding the new active key first and the old keys after it",
                subject="keyring",
                kind="NO_KEYRING",
            )
        done = await reencrypt_jobs(
            self._queries.pool, request.queue, request.after_job_id, request.max_jobs or DEFAULT_REENCRYPT, encryption
        )
        return results_service_pb2.ReEncryptJobsResponse(
            key_id=done.key_id,
            examined=done.examined,
            jobs_reencrypted=done.jobs,
            events_reencrypted=done.events,
            unreadable=done.unreadable,
            next_after_job_id=done.next_after,
        )


DEFAULT_REENCRYPT = 1000
MAX_REENCRYPT = 10_000
DEFAULT_SET_ASIDE_PAGE = 100


def _delete_ids(ids: list[str]) -> list[str]:
    if not ids:
        raise InvalidArgument({"job_ids": "is required (1-1000 job ids)"})
    if len(ids) > MAX_PAGE:
        raise InvalidArgument({"job_ids": f"at most {MAX_PAGE} per call; split the ids into several calls"})
    bad = [i for i in ids if parse_job_id(i) is None]
    if bad:
        raise InvalidArgument({"job_ids": f"{_JOB_ID_HELP}; not one: {bad[0]!r} (nothing was deleted)"})
    return sorted(set(ids))


def _set_aside_ids(ids: list[int], hint: str) -> list[int]:
    if not ids:
        raise InvalidArgument({"ids": f"is required {hint}"})
    if len(ids) > MAX_PAGE:
        raise InvalidArgument({"ids": f"at most {MAX_PAGE} per call"})
    if any(i <= 0 for i in ids):
        raise InvalidArgument({"ids": "must be ids from ListSetAside (positive)"})
    return sorted(set(ids))


def _encode_set_aside_token(last_id: int, queue: str) -> str:
    raw = json.dumps({"a": last_id, "q": queue}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_set_aside_token(token: str, queue: str) -> int:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, token_queue = data["a"], data["q"]
        if not isinstance(after, int) or not isinstance(token_queue, str):
            raise ValueError("bad token fields")
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise InvalidArgument({"page_token": "is not a token from a previous ListSetAside response"}) from None
    if token_queue != queue:
        raise InvalidArgument({"page_token": "was issued for another queue; use the same queue or start over"})
    return after


def _set_aside_entry(row: SetAsideRow) -> results_service_pb2.SetAsideEntry:
    entry = results_service_pb2.SetAsideEntry(
        id=row.id,
        queue=row.queue,
        job_id=row.job_id,
        entry_id=row.entry_id,
        event=row.event,
        sqlstate=row.sqlstate,
        error=row.error,
        replays=row.replays,
    )
    entry.set_aside_at.FromDatetime(row.set_aside_at)
    if row.replayed_at is not None:
        entry.replayed_at.FromDatetime(row.replayed_at)
    return entry


def _count(by_state: dict[int, tuple[int, ...]], state: int, window: int) -> int:
    counts = by_state.get(state)
    return counts[window] if counts else 0
