"""PostgreSQL reads of the results service: jobs and their event history as contract messages.

All read SQL lives here (writes are in store.py). Rows become ``conveyor.v1`` messages in
their public form: payload as a Struct, result as a Value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from conveyor.common.codec import decode_event, public_event, public_payload, public_result
from conveyor.results.store import unpack_events
from conveyor.v1 import event_pb2, job_pb2

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_JOB_SELECT = """
SELECT job_id, queue, type, state, priority, payload::text, result::text, error,
       progress_percent, progress_message, attempts, retry, timeout_ms, labels,
       idempotency_key, worker, created_at, run_at, started_at, finished_at, updated_at
FROM jobs
"""


def to_us(value: datetime) -> int:
    """Microseconds since the epoch of an aware datetime (exact)."""
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    """The aware UTC datetime ``us`` microseconds after the epoch (exact)."""
    return EPOCH + timedelta(microseconds=us)


#: FieldCondition operators (conveyor.v1.FieldOperator without its prefix, lower case).
FIELD_OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge", "exists", "contains")
_ORDERING_SQL = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}


@dataclass(frozen=True, slots=True)
class FieldCondition:
    """One validated condition on a payload field: ``path`` (object keys), ``op``, a JSON-able ``value``.

    ``value`` is None for "exists" (a JSON null is ``JSON_NULL``, to tell the two apart).
    """

    path: tuple[str, ...]
    op: str
    value: Any = None


class _JsonNull:
    """The JSON value null as a condition's value (None means "no value")."""

    def __repr__(self) -> str:
        return "JSON_NULL"


JSON_NULL: Any = _JsonNull()


def _json(value: Any) -> Any:
    return None if value is JSON_NULL else value


def _nest(path: tuple[str, ...], value: Any) -> Any:
    """``{"a": {"b": value}}`` for the path ("a", "b")."""
    for key in reversed(path):
        value = {key: value}
    return value


def condition_sql(cond: FieldCondition) -> tuple[sql.Composable, list[Any]]:
    """The SQL predicate on ``jobs.payload`` for one condition, and its parameters.

    eq and contains are containment (``payload @> …``), which jobs_payload_idx (GIN jsonb_path_ops)
    serves; eq then checks the field exactly (containment alone lets a list or an object hold more).
    The others are checked on the rows the rest of the query selects (ADR 0019).
    """
    path = list(cond.path)
    value = _json(cond.value)
    if cond.op == "eq":
        return (
            sql.SQL("(payload @> %s AND payload #> %s = %s)"),
            [Jsonb(_nest(cond.path, value)), path, Jsonb(value)],
        )
    if cond.op == "contains":
        if isinstance(value, dict | list):
            return sql.SQL("payload @> %s"), [Jsonb(_nest(cond.path, value))]
        # A scalar: a list at the field holding it, or the field equal to it (both indexed).
        return (
            sql.SQL("(payload @> %s OR payload @> %s)"),
            [Jsonb(_nest(cond.path, [value])), Jsonb(_nest(cond.path, value))],
        )
    if cond.op == "ne":
        # Only jobs whose payload is known (PostgreSQL has it once the job finished, ADR 0001).
        return sql.SQL("(payload IS NOT NULL AND payload #> %s IS DISTINCT FROM %s)"), [path, Jsonb(value)]
    if cond.op == "exists":
        return sql.SQL("payload #> %s IS NOT NULL"), [path]
    if cond.op in _ORDERING_SQL:
        # jsonb orders across types (any number sorts after any string): compare only like with like.
        kind = "number" if isinstance(value, int | float) else "string"
        return (
            sql.SQL("(jsonb_typeof(payload #> %s) = {} AND payload #> %s {} %s)").format(
                sql.Literal(kind), sql.SQL(_ORDERING_SQL[cond.op])
            ),
            [path, path, Jsonb(value)],
        )
    raise ValueError(f"unknown operator {cond.op!r}")


@dataclass(frozen=True, slots=True)
class JobFilter:
    """ListJobs filters; empty or None means "any"."""

    queue: str = ""
    state: int = 0
    type: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    #: Every one of these (key, value) labels, sorted by key.
    labels: tuple[tuple[str, str], ...] = ()
    #: Every one of these payload conditions, in request order.
    where: tuple[FieldCondition, ...] = ()


def _job(row: tuple[Any, ...]) -> job_pb2.Job:
    (
        job_id,
        queue,
        type_,
        state,
        priority,
        payload,
        result,
        error,
        progress_percent,
        progress_message,
        attempts,
        retry,
        timeout_ms,
        labels,
        idempotency_key,
        worker,
        created_at,
        run_at,
        started_at,
        finished_at,
        updated_at,
    ) = row
    job = job_pb2.Job(
        id=job_id,
        queue=queue,
        type=type_ or "",
        state=state,
        priority=priority or 0,
        attempt=attempts,
        idempotency_key=idempotency_key or "",
        worker=worker or "",
        labels=labels or {},
    )
    if payload is not None:
        job.payload.CopyFrom(public_payload(payload.encode(), job_id))
    else:
        job.payload.SetInParent()  # "Responses always fill this field."
    if result is not None:
        job.result.CopyFrom(public_result(result.encode(), job_id))
    if error is not None:
        job.error.message = str(error.get("message", ""))
        job.error.kind = str(error.get("kind", ""))
        job.error.retryable = bool(error.get("retryable", False))
    if progress_percent is not None:
        job.progress.percent = progress_percent
        job.progress.message = progress_message or ""
    if retry is not None:
        job.retry.ParseFromString(retry)
    if timeout_ms is not None:
        job.timeout.FromMilliseconds(timeout_ms)
    for field, value in (
        (job.created_at, created_at),
        (job.run_at, run_at),
        (job.started_at, started_at),
        (job.finished_at, finished_at),
        (job.updated_at, updated_at),
    ):
        if value is not None:
            field.FromDatetime(value)
    return job


def list_jobs_sql(
    filters: JobFilter, after: tuple[datetime, str] | None, limit: int
) -> tuple[sql.Composable, list[Any]]:
    """ListJobs' query and parameters: ``filters``, keyset after ``after``, newest first, ``limit`` rows."""
    where: list[sql.Composable] = []
    params: list[Any] = []
    if filters.queue:
        where.append(sql.SQL("queue = %s"))
        params.append(filters.queue)
    if filters.state:
        # A literal (a validated JobState number), not a parameter: the planner can then use the
        # partial jobs_state_created_idx for the states it holds, in a prepared statement too.
        where.append(sql.SQL("state = {}").format(sql.Literal(int(filters.state))))
    if filters.type:
        where.append(sql.SQL("type = %s"))
        params.append(filters.type)
    if filters.created_after is not None:
        where.append(sql.SQL("created_at >= %s"))
        params.append(filters.created_after)
    if filters.created_before is not None:
        where.append(sql.SQL("created_at < %s"))
        params.append(filters.created_before)
    if filters.labels:
        # One containment of every pair, served by jobs_labels_idx; its partial predicate is spelled
        # out (a label asked for is never in '{}') so that the planner can use the index.
        where.append(sql.SQL("labels <> '{}'::jsonb AND labels @> %s"))
        params.append(Jsonb(dict(filters.labels)))
    for cond in filters.where:
        predicate, values = condition_sql(cond)
        where.append(predicate)
        params.extend(values)
    if after is not None:
        # Keyset paging: a row comparison the (…, created_at DESC, job_id DESC) indexes serve.
        where.append(sql.SQL("(created_at, job_id) < (%s, %s)"))
        params.extend(after)
    query: sql.Composable = sql.SQL(_JOB_SELECT)
    if where:
        query += sql.SQL("WHERE ") + sql.SQL(" AND ").join(where)
    query += sql.SQL(" ORDER BY created_at DESC, job_id DESC LIMIT %s")
    params.append(limit)
    return query, params


#: GetFinishedStats windows, shortest first, in seconds.
FINISHED_WINDOWS_S = (60, 300, 3600)

# One pass over the queue's rows finished within the longest window (an index-only range scan of
# jobs_queue_finished_idx), counted per final state and window. now() is the transaction's start,
# so every window ends at the same instant, which finished_stats reads in the same transaction.
_WINDOW_COUNTS = ", ".join(
    f"count(*) FILTER (WHERE finished_at > now() - interval '{w} seconds')" for w in FINISHED_WINDOWS_S
)
FINISHED_STATS_SQL = f"""
SELECT state, {_WINDOW_COUNTS}
FROM jobs
WHERE queue = %s AND finished_at > now() - interval '{max(FINISHED_WINDOWS_S)} seconds'
GROUP BY state
"""


@dataclass(frozen=True, slots=True)
class FinishedCounts:
    """Jobs of one queue finished within each of FINISHED_WINDOWS_S before ``as_of``."""

    as_of: datetime
    #: JobState number -> count per window (in FINISHED_WINDOWS_S order).
    by_state: dict[int, tuple[int, ...]]


#: GetJobSeries windows: (bucket seconds, buckets) by SeriesWindow number.
SERIES_WINDOWS = {1: (60, 60), 2: (900, 96), 3: (7200, 84)}
#: Longest a series query may run before PostgreSQL stops it (bounded cost on a large table).
SERIES_TIMEOUT_MS = 5000

# One pass over the finished rows of the window (a range scan of jobs_queue_finished_idx with a
# queue, of jobs_finished_idx, whose predicate the state literals match, without), grouped by bucket.
# Wait: enqueue (or run_at, when later) to the last start; run: last start to finish; a job that
# never started (cancelled while waiting) has neither, and percentile_cont skips its NULLs.
_SERIES_SQL = """
SELECT floor((extract(epoch FROM finished_at) - %(start)s) / %(bucket)s)::int AS b,
       count(*) FILTER (WHERE state = 5), count(*) FILTER (WHERE state = 6),
       count(*) FILTER (WHERE state = 7), count(*) FILTER (WHERE state = 8),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
           ORDER BY greatest(0, extract(epoch FROM started_at - greatest(created_at, coalesce(run_at, created_at))))),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
           ORDER BY greatest(0, extract(epoch FROM finished_at - started_at)))
FROM jobs
WHERE state IN (5, 6, 7, 8) AND finished_at >= to_timestamp(%(start)s) AND finished_at < to_timestamp(%(end)s) {queue}
GROUP BY 1
"""


@dataclass(frozen=True, slots=True)
class SeriesRow:
    """One bucket's numbers: counts by final state, and (p50, p95, p99) of wait and run, in seconds."""

    bucket: int
    succeeded: int
    failed: int
    dead_lettered: int
    cancelled: int
    wait: tuple[float, float, float]
    run: tuple[float, float, float]


def _percentiles(value: list[float | None] | None) -> tuple[float, float, float]:
    if not value:
        return (0.0, 0.0, 0.0)
    p50, p95, p99 = (float(v or 0.0) for v in value)
    return (p50, p95, p99)


class Queries:
    """The results service's reads from PostgreSQL.

    Args:
        pool: An open connection pool on the results database.
        connect_timeout_s: Longest wait for a pooled connection (then psycopg_pool.PoolTimeout,
            which the server maps to UNAVAILABLE).
    """

    def __init__(self, pool: AsyncConnectionPool[Any], connect_timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout = connect_timeout_s

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The pool this reads through."""
        return self._pool

    async def get_job(self, job_id: str) -> job_pb2.Job | None:
        """The job ``job_id`` as last projected, or None."""
        async with self._pool.connection(self._timeout) as conn:
            cur = await conn.execute(_JOB_SELECT + "WHERE job_id = %s", (job_id,))
            row = await cur.fetchone()
        return _job(row) if row is not None else None

    async def list_jobs(
        self, filters: JobFilter, after: tuple[datetime, str] | None, limit: int
    ) -> list[tuple[job_pb2.Job, datetime]]:
        """Jobs matching ``filters``, newest first by (created_at, job_id), strictly after ``after``.

        Returns:
            Up to ``limit`` jobs, each with its exact created_at (for the next page's key).
        """
        query, params = list_jobs_sql(filters, after, limit)
        async with self._pool.connection(self._timeout) as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        return [(_job(row), row[16]) for row in rows]

    async def job_exists(self, job_id: str) -> bool:
        """Whether anything of ``job_id`` was projected: its row or any of its events."""
        async with self._pool.connection(self._timeout) as conn:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE job_id = %s)"
                " OR EXISTS (SELECT 1 FROM job_events WHERE job_id = %s)",
                (job_id, job_id),
            )
            row = await cur.fetchone()
        return bool(row and row[0])

    async def list_events(self, job_id: str, after: tuple[int, int] | None, limit: int) -> list[event_pb2.JobEvent]:
        """``job_id``'s events after the stream id ``after``, oldest first, in their public form.

        History rows (one per job and projected batch) are read in order of their first event
        and merged by event id, so an event stored twice by a replay is returned once. Reading
        stops as soon as no row left can hold an event older than the ``limit``-th found.
        """
        after_key = after if after is not None else (-1, -1)
        found: dict[tuple[int, int], bytes] = {}
        row_key = (-1, -1)
        page = max(limit, 16)
        async with self._pool.connection(self._timeout) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT first_ms, first_seq, events FROM job_events"
                    " WHERE job_id = %s AND (last_ms, last_seq) > (%s, %s) AND (first_ms, first_seq) > (%s, %s)"
                    " ORDER BY first_ms, first_seq LIMIT %s",
                    (job_id, *after_key, *row_key, page),
                )
                rows = await cur.fetchall()
                for _first_ms, _first_seq, packed in rows:
                    for ms, seq, data in unpack_events(packed):
                        if (ms, seq) > after_key:
                            found.setdefault((ms, seq), data)
                if len(rows) < page:
                    break
                row_key = (rows[-1][0], rows[-1][1])
                # Rows not read yet hold only events newer than row_key.
                if len(found) >= limit and sorted(found)[limit - 1] <= row_key:
                    break
        ids = sorted(found)[:limit]
        # Stored as Redis held them, without the job id (ADR 0001): fill it in for clients.
        return [public_event(decode_event(f"{ms}-{seq}", found[ms, seq], job_id)) for ms, seq in ids]

    async def finished_stats(self, queue: str) -> FinishedCounts:
        """How many of ``queue``'s jobs finished within each window, per final state."""
        async with self._pool.connection(self._timeout) as conn, conn.transaction():
            cur = await conn.execute("SELECT now()")
            row = await cur.fetchone()
            assert row is not None
            as_of: datetime = row[0]
            cur = await conn.execute(FINISHED_STATS_SQL, (queue,))
            rows = await cur.fetchall()
        return FinishedCounts(as_of, {int(r[0]): tuple(int(c) for c in r[1:]) for r in rows})

    async def job_series(self, queue: str, bucket_s: int, buckets: int) -> tuple[int, list[SeriesRow]]:
        """Finished jobs per bucket over the last ``buckets`` buckets of ``bucket_s`` seconds (of ``queue``, or all).

        Buckets are aligned on multiples of ``bucket_s`` since the epoch; the last one holds the
        database's now(). Returns the first bucket's start (epoch seconds) and the non-empty buckets.

        Raises:
            psycopg.errors.QueryCanceled: The query ran past SERIES_TIMEOUT_MS.
        """
        async with self._pool.connection(self._timeout) as conn, conn.transaction():
            await conn.execute(f"SET LOCAL statement_timeout = {int(SERIES_TIMEOUT_MS)}")
            cur = await conn.execute("SELECT extract(epoch FROM now())::float8")
            row = await cur.fetchone()
            assert row is not None
            end = (int(row[0]) // bucket_s + 1) * bucket_s
            start = end - bucket_s * buckets
            query = _SERIES_SQL.format(queue="AND queue = %(queue)s" if queue else "")
            cur = await conn.execute(query, {"start": start, "end": end, "bucket": bucket_s, "queue": queue})
            rows = await cur.fetchall()
        return start, [
            SeriesRow(int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), _percentiles(r[5]), _percentiles(r[6]))
            for r in rows
            if 0 <= int(r[0]) < buckets
        ]
