"""PostgreSQL writes of the results service: schema migrations and the batch upsert of projected events.

All SQL that changes the database lives here (reads are in queries.py). A batch is written
in one transaction: one set-based upsert of the folded job rows and one insert of the raw
events (one history row per job), both with binary array parameters (DESIGN.md: text arrays
cost 24% end to end), packed by pgarrays rather than psycopg's per-element list dumper.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from conveyor.common.ids import parse_job_id
from conveyor.results import pgerrors
from conveyor.results.pgarrays import (
    PackedArray,
    bytea_array,
    float8_array,
    int2_array,
    int4_array,
    int8_array,
    text_array,
)
from conveyor.v1 import job_pb2

log = structlog.get_logger("conveyor.results.store")

#: pg_advisory_xact_lock key that serialises migrations across results processes ("conveyor" in ASCII).
MIGRATION_LOCK = 0x636F6E7665796F72

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One ``migrations/NNNN_name.sql`` file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationMismatch(RuntimeError):
    """A migration already applied to this database differs from the packaged file."""


def load_migrations() -> list[Migration]:
    """The packaged migrations, in version order."""
    found: list[Migration] = []
    for entry in resources.files("conveyor.results").joinpath("migrations").iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


class JobRow:
    """A job's row as folded from one batch of its events (see projector.fold).

    Times are microseconds since the epoch; JSON columns are JSON text. ``type`` is None
    when no event of the batch carried the job itself, which tells the upsert to keep
    the row's job fields (type, priority, labels, created_at...) as they are.
    """

    __slots__ = (
        "attempts",
        "created_us",
        "error",
        "finished_us",
        "idempotency_key",
        "job_id",
        "labels",
        "last_ms",
        "last_seq",
        "max_attempts",
        "payload",
        "priority",
        "progress_message",
        "progress_percent",
        "queue",
        "queued_ms",
        "queued_seq",
        "result",
        "retry",
        "run_at_us",
        "started_us",
        "state",
        "timeout_ms",
        "type",
        "updated_us",
        "worker",
    )

    def __init__(self, job_id: str, queue: str) -> None:
        self.job_id = job_id
        self.queue = queue
        self.type: str | None = None
        self.state = 0
        self.priority: int | None = None
        self.payload: str | None = None
        self.result: str | None = None
        self.error: str | None = None
        self.progress_percent: float | None = None
        self.progress_message: str | None = None
        self.attempts = 0
        self.max_attempts: int | None = None
        self.retry: bytes | None = None
        self.timeout_ms: int | None = None
        self.labels: str | None = None
        self.idempotency_key: str | None = None
        self.worker: str | None = None
        self.created_us: int | None = None
        self.run_at_us: int | None = None
        self.started_us: int | None = None
        self.finished_us: int | None = None
        self.updated_us = 0
        self.last_ms = 0
        self.last_seq = 0
        self.queued_ms = 0
        self.queued_seq = 0


#: One job_events row: (job_id, first_ms, first_seq, last_ms, last_seq, packed events); see pack_event.
HistoryRow = tuple[str, int, int, int, int, bytes]

#: The head of a job_events record: the event's stream id (ms, seq) and its length (see pack_event).
EVENT_HEAD = struct.Struct(">qqi")


def pack_event(ms: int, seq: int, data: bytes) -> bytes:
    """One record of a job_events row: the event's stream id, its length, the serialized event."""
    return EVENT_HEAD.pack(ms, seq, len(data)) + data


def unpack_events(packed: bytes) -> list[tuple[int, int, bytes]]:
    """The (event_ms, event_seq, data) records of a job_events row, as packed."""
    out: list[tuple[int, int, bytes]] = []
    view = memoryview(packed)
    pos, end, head = 0, len(packed), EVENT_HEAD.size
    while pos < end:
        ms, seq, size = EVENT_HEAD.unpack_from(packed, pos)
        pos += head
        out.append((ms, seq, bytes(view[pos : pos + size])))
        pos += size
    return out


_FINAL = ",".join(
    str(s)
    for s in (
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_FAILED,
        job_pb2.JOB_STATE_DEAD_LETTERED,
        job_pb2.JOB_STATE_CANCELLED,
    )
)
_REOPENABLE = ",".join(str(s) for s in (job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_DEAD_LETTERED))


def _ts(column: str) -> str:
    # Exact microseconds to timestamptz; NULL stays NULL.
    return f"(timestamptz 'epoch' + {column} * interval '1 microsecond')"


# The columns of JobRow in the order of the unnest() arrays, with their array types.
_JOB_COLUMNS: tuple[tuple[str, str], ...] = (
    ("job_id", "text"),
    ("queue", "text"),
    ("type", "text"),
    ("state", "int2"),
    ("priority", "int2"),
    ("payload", "text"),
    ("result", "text"),
    ("error", "text"),
    ("progress_percent", "float8"),
    ("progress_message", "text"),
    ("attempts", "int4"),
    ("max_attempts", "int4"),
    ("retry", "bytea"),
    ("timeout_ms", "int8"),
    ("labels", "text"),
    ("idempotency_key", "text"),
    ("worker", "text"),
    ("created_us", "int8"),
    ("run_at_us", "int8"),
    ("started_us", "int8"),
    ("finished_us", "int8"),
    ("updated_us", "int8"),
    ("last_ms", "int8"),
    ("last_seq", "int8"),
    ("queued_ms", "int8"),
    ("queued_seq", "int8"),
)

# Invariant 2 (DESIGN.md): one row per job whatever is replayed, and monotonic state.
# A row changes only when the batch's last applied event is newer than the row's, and
#  - the row is not final, or
#  - the row is FAILED/DEAD_LETTERED and the batch re-queued the job after that outcome;
# or when the batch carries a final outcome that the row (not final) has not seen yet,
# newer than the row's latest (re)queue: a final event delivered late still wins, so a
# late ACTIVE never overwrites SUCCEEDED in either delivery order.
# Job fields (type, priority, labels...) come from the batch only when it carried the job
# (b.type IS NOT NULL); everything a batch may not carry is COALESCEd with the row.
UPSERT_JOBS = f"""
INSERT INTO jobs AS j (
    job_id, queue, type, state, priority, payload, result, error, progress_percent, progress_message,
    attempts, max_attempts, retry, timeout_ms, labels, idempotency_key, worker,
    created_at, run_at, started_at, finished_at, updated_at,
    last_event_ms, last_event_seq, queued_event_ms, queued_event_seq)
SELECT
    b.job_id, b.queue, b.type, b.state, b.priority, b.payload::jsonb, b.result::jsonb, b.error::jsonb,
    b.progress_percent, b.progress_message, b.attempts, b.max_attempts, b.retry, b.timeout_ms,
    b.labels::jsonb, b.idempotency_key, b.worker,
    {_ts("b.created_us")}, {_ts("b.run_at_us")}, {_ts("b.started_us")}, {_ts("b.finished_us")},
    {_ts("b.updated_us")}, b.last_ms, b.last_seq, b.queued_ms, b.queued_seq
FROM unnest({", ".join(f"%b::{t}[]" for _, t in _JOB_COLUMNS)})
    AS b({", ".join(c for c, _ in _JOB_COLUMNS)})
ON CONFLICT (job_id) DO UPDATE SET
    type = COALESCE(EXCLUDED.type, j.type),
    priority = CASE WHEN EXCLUDED.type IS NULL THEN j.priority ELSE EXCLUDED.priority END,
    max_attempts = CASE WHEN EXCLUDED.type IS NULL THEN j.max_attempts ELSE EXCLUDED.max_attempts END,
    retry = CASE WHEN EXCLUDED.type IS NULL THEN j.retry ELSE EXCLUDED.retry END,
    timeout_ms = CASE WHEN EXCLUDED.type IS NULL THEN j.timeout_ms ELSE EXCLUDED.timeout_ms END,
    labels = CASE WHEN EXCLUDED.type IS NULL THEN j.labels ELSE EXCLUDED.labels END,
    idempotency_key = CASE WHEN EXCLUDED.type IS NULL THEN j.idempotency_key ELSE EXCLUDED.idempotency_key END,
    created_at = CASE WHEN EXCLUDED.type IS NULL THEN j.created_at ELSE EXCLUDED.created_at END,
    payload = COALESCE(EXCLUDED.payload, j.payload),
    state = EXCLUDED.state,
    result = COALESCE(EXCLUDED.result, j.result),
    error = COALESCE(EXCLUDED.error, j.error),
    progress_percent = COALESCE(EXCLUDED.progress_percent, j.progress_percent),
    progress_message = CASE WHEN EXCLUDED.progress_percent IS NULL THEN j.progress_message
                            ELSE EXCLUDED.progress_message END,
    attempts = GREATEST(j.attempts, EXCLUDED.attempts),
    worker = COALESCE(EXCLUDED.worker, j.worker),
    run_at = COALESCE(EXCLUDED.run_at, j.run_at),
    started_at = COALESCE(EXCLUDED.started_at, j.started_at),
    -- The batch's fold is final exactly when the job is finished; a re-queue clears it.
    finished_at = EXCLUDED.finished_at,
    updated_at = GREATEST(j.updated_at, EXCLUDED.updated_at),
    last_event_ms = EXCLUDED.last_event_ms,
    last_event_seq = EXCLUDED.last_event_seq,
    queued_event_ms = CASE WHEN (EXCLUDED.queued_event_ms, EXCLUDED.queued_event_seq)
                                > (j.queued_event_ms, j.queued_event_seq)
                           THEN EXCLUDED.queued_event_ms ELSE j.queued_event_ms END,
    queued_event_seq = CASE WHEN (EXCLUDED.queued_event_ms, EXCLUDED.queued_event_seq)
                                 > (j.queued_event_ms, j.queued_event_seq)
                            THEN EXCLUDED.queued_event_seq ELSE j.queued_event_seq END
WHERE (
    (j.last_event_ms, j.last_event_seq) < (EXCLUDED.last_event_ms, EXCLUDED.last_event_seq)
    AND (j.state NOT IN ({_FINAL})
         OR (j.state IN ({_REOPENABLE})
             AND (j.last_event_ms, j.last_event_seq) < (EXCLUDED.queued_event_ms, EXCLUDED.queued_event_seq)))
) OR (
    EXCLUDED.state IN ({_FINAL}) AND j.state NOT IN ({_FINAL})
    AND (j.queued_event_ms, j.queued_event_seq) < (EXCLUDED.last_event_ms, EXCLUDED.last_event_seq)
)
"""

# One row per job and batch. A replay with the same first event finds its row: it appends its
# records unless they are already there as they are (an exact replay changes nothing); readers
# merge duplicates by event id, so appending is always safe and never loses an event.
INSERT_EVENTS = """
INSERT INTO job_events AS h (job_id, first_ms, first_seq, last_ms, last_seq, events)
SELECT * FROM unnest(%b::text[], %b::int8[], %b::int8[], %b::int8[], %b::int8[], %b::bytea[])
ON CONFLICT (job_id, first_ms, first_seq) DO UPDATE SET
    events = h.events || EXCLUDED.events,
    last_ms = CASE WHEN (EXCLUDED.last_ms, EXCLUDED.last_seq) > (h.last_ms, h.last_seq)
                   THEN EXCLUDED.last_ms ELSE h.last_ms END,
    last_seq = CASE WHEN (EXCLUDED.last_ms, EXCLUDED.last_seq) > (h.last_ms, h.last_seq)
                    THEN EXCLUDED.last_seq ELSE h.last_seq END
WHERE position(EXCLUDED.events IN h.events) = 0
"""


def job_columns(rows: list[JobRow]) -> list[PackedArray]:
    """The unnest() arrays of ``rows``, one per column of _JOB_COLUMNS, packed (see pgarrays)."""
    return [
        text_array([r.job_id for r in rows]),
        text_array([r.queue for r in rows]),
        text_array([r.type for r in rows]),
        int2_array([r.state for r in rows]),
        int2_array([r.priority for r in rows]),
        text_array([r.payload for r in rows]),
        text_array([r.result for r in rows]),
        text_array([r.error for r in rows]),
        float8_array([r.progress_percent for r in rows]),
        text_array([r.progress_message for r in rows]),
        int4_array([r.attempts for r in rows]),
        int4_array([r.max_attempts for r in rows]),
        bytea_array([r.retry for r in rows]),
        int8_array([r.timeout_ms for r in rows]),
        text_array([r.labels for r in rows]),
        text_array([r.idempotency_key for r in rows]),
        text_array([r.worker for r in rows]),
        int8_array([r.created_us for r in rows]),
        int8_array([r.run_at_us for r in rows]),
        int8_array([r.started_us for r in rows]),
        int8_array([r.finished_us for r in rows]),
        int8_array([r.updated_us for r in rows]),
        int8_array([r.last_ms for r in rows]),
        int8_array([r.last_seq for r in rows]),
        int8_array([r.queued_ms for r in rows]),
        int8_array([r.queued_seq for r in rows]),
    ]


def history_columns(history: list[HistoryRow]) -> list[PackedArray]:
    """The unnest() arrays of INSERT_EVENTS for ``history``."""
    return [
        text_array([h[0] for h in history]),
        int8_array([h[1] for h in history]),
        int8_array([h[2] for h in history]),
        int8_array([h[3] for h in history]),
        int8_array([h[4] for h in history]),
        bytea_array([h[5] for h in history]),
    ]


@dataclass(frozen=True, slots=True)
class SetAside:
    """One stream entry the projector could not fold because of its own data (see pgerrors)."""

    queue: str
    job_id: str
    entry_id: str
    event: bytes
    #: The SQLSTATE PostgreSQL answered, or "" when the entry could not even be decoded.
    sqlstate: str
    error: str


INSERT_SET_ASIDE = """
INSERT INTO projection_set_aside (queue, job_id, entry_id, event, sqlstate, error)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bytea[], %b::text[], %b::text[])
ON CONFLICT (queue, entry_id) DO UPDATE SET
    event = EXCLUDED.event, sqlstate = EXCLUDED.sqlstate, error = EXCLUDED.error
"""


def _text(value: str) -> str:
    # The set-aside row must be storable whatever the event held: text columns refuse NUL.
    return value.replace("\x00", "\ufffd")


def set_aside_columns(items: list[SetAside]) -> list[PackedArray]:
    """The unnest() arrays of INSERT_SET_ASIDE for ``items``."""
    return [
        text_array([_text(i.queue) for i in items]),
        text_array([_text(i.job_id) for i in items]),
        text_array([i.entry_id for i in items]),
        bytea_array([i.event for i in items]),
        text_array([i.sqlstate for i in items]),
        text_array([_text(i.error) for i in items]),
    ]


def entries_of(queue: str, job_id: str, history: list[HistoryRow], sqlstate: str, error: str) -> list[SetAside]:
    """The stream entries of a job's history rows, to set aside with ``error``."""
    return [
        SetAside(queue, job_id, f"{ms}-{seq}", data, sqlstate, error)
        for h in history
        for ms, seq, data in unpack_events(h[5])
    ]


async def open_pool(
    url: str, max_size: int, *, attempt_timeout_s: float = 10.0, lock_timeout_s: float = 5.0
) -> AsyncConnectionPool[Any]:
    """An open pool on ``url``; while PostgreSQL cannot be reached, log and keep trying.

    Connections are in autocommit mode: reads need no transaction, writes open one explicitly.
    Every statement waits at most ``lock_timeout_s`` for a lock (0: forever): a table someone
    locked makes the projector retry (SQLSTATE 55P03) and an RPC answer UNAVAILABLE, instead
    of hanging with its connection.
    """
    kwargs: dict[str, Any] = {"autocommit": True}
    if lock_timeout_s > 0:
        kwargs["options"] = f"-c lock_timeout={max(1, int(lock_timeout_s * 1000))}"
    delay = 0.5
    while True:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url, min_size=1, max_size=max_size, open=False, kwargs=kwargs, name="results"
        )
        try:
            await pool.open(wait=True, timeout=attempt_timeout_s)
            return pool
        except PoolTimeout:
            # wait() closed the pool: the next attempt starts a new one.
            log.warning("postgres_unavailable", retry_in_s=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _drop_if_read_only(conn: psycopg.AsyncConnection[Any], exc: psycopg.Error) -> None:
    """Close a connection that found the database read-only, so that the pool replaces it.

    A session keeps the default_transaction_read_only it started with (and after a failover
    it may still be talking to the demoted server): only a new connection sees the change.
    """
    if pgerrors.pg_fault(exc) is pgerrors.READ_ONLY:
        await conn.close()


class Store:
    """The results service's writes to PostgreSQL.

    Args:
        pool: An open connection pool on the results database.
        connect_timeout_s: Longest wait for a pooled connection before a write fails
            (psycopg_pool.PoolTimeout), so that an outage surfaces quickly as a retry.
    """

    def __init__(self, pool: AsyncConnectionPool[Any], connect_timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._timeout = connect_timeout_s

    async def migrate(self) -> list[int]:
        """Apply the packaged migrations not applied yet, in one transaction.

        ``pg_advisory_xact_lock`` makes concurrent starts of several results processes
        take turns: the first applies, the others then find nothing to do.

        Returns:
            The versions applied by this call.
        """
        migrations = load_migrations()
        applied: list[int] = []
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            await conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text")
            cur = await conn.execute("SELECT version, checksum FROM schema_migrations")
            done = {int(row[0]): row[1] for row in await cur.fetchall()}
            for migration in migrations:
                if migration.version in done:
                    # An applied migration must never change: the schema would silently differ
                    # from what the code expects. Fail at start, naming the file, instead.
                    if done[migration.version] != migration.checksum:
                        raise MigrationMismatch(
                            f"migration {migration.version:04d}_{migration.name}.sql differs from the one applied "
                            "to this database: restore it and put the change in a new migration "
                            "(for throwaway development data: make clean)"
                        )
                    continue
                # Without parameters psycopg sends the file as one simple query: many statements are fine.
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
                applied.append(migration.version)
        return applied

    async def write(
        self, rows: list[JobRow], events: list[HistoryRow], malformed: list[SetAside] | None = None
    ) -> list[SetAside]:
        """Upsert ``rows`` and insert the history rows ``events`` in one transaction.

        Both are sorted by key first, so that two results processes writing overlapping
        jobs lock them in the same order and cannot deadlock.

        When PostgreSQL refuses the data of a row (SQLSTATE class 22 or 23), the batch is
        written again in a new transaction, bisected with savepoints down to the jobs it
        refuses: their events are set aside (projection_set_aside) in the same commit as the
        rest. Any other error is raised: the caller retries the whole batch.

        Args:
            malformed: Entries that could not be decoded, set aside with the batch.

        Returns:
            What was set aside (``malformed`` included).
        """
        rows = sorted(rows, key=lambda r: r.job_id)
        events = sorted(events)
        try:
            async with self._pool.connection(self._timeout) as conn:
                try:
                    async with conn.transaction(), conn.cursor() as cur:
                        if rows:
                            await cur.execute(UPSERT_JOBS, job_columns(rows))
                        if events:
                            await cur.execute(INSERT_EVENTS, history_columns(events))
                        if malformed:
                            await cur.execute(INSERT_SET_ASIDE, set_aside_columns(malformed))
                except psycopg.Error as exc:
                    await _drop_if_read_only(conn, exc)
                    raise
            return list(malformed or ())
        except psycopg.Error as exc:
            if not pgerrors.is_row_error(exc):
                raise
            log.warning("batch_refused_bisecting", sqlstate=exc.sqlstate, error=str(exc).strip(), jobs=len(rows))
        return await self._write_bisecting(rows, events, list(malformed or ()))

    async def _write_bisecting(
        self, rows: list[JobRow], events: list[HistoryRow], set_aside: list[SetAside]
    ) -> list[SetAside]:
        by_job: dict[str, JobRow] = {r.job_id: r for r in rows}
        history: dict[str, list[HistoryRow]] = {}
        for h in events:
            history.setdefault(h[0], []).append(h)
        job_ids = sorted(by_job.keys() | history.keys())

        async def write(conn: psycopg.AsyncConnection[Any], cur: psycopg.AsyncCursor[Any], ids: list[str]) -> None:
            try:
                async with conn.transaction():  # a savepoint: a refusal undoes only this part
                    part = [by_job[j] for j in ids if j in by_job]
                    if part:
                        await cur.execute(UPSERT_JOBS, job_columns(part))
                    part_events = [h for j in ids for h in history.get(j, ())]
                    if part_events:
                        await cur.execute(INSERT_EVENTS, history_columns(part_events))
                return
            except psycopg.Error as exc:
                if not pgerrors.is_row_error(exc):
                    raise
                if len(ids) > 1:
                    mid = len(ids) // 2
                    await write(conn, cur, ids[:mid])
                    await write(conn, cur, ids[mid:])
                    return
                job_id = ids[0]
                row = by_job.get(job_id)
                parsed = parse_job_id(job_id)
                queue = row.queue if row is not None else (parsed[0] if parsed else "")
                sqlstate, message = pgerrors.describe(exc)
                set_aside.extend(entries_of(queue, job_id, history.get(job_id, []), sqlstate, message))

        async with self._pool.connection(self._timeout) as conn:
            try:
                async with conn.transaction(), conn.cursor() as cur:
                    await write(conn, cur, job_ids)
                    if set_aside:
                        await cur.execute(INSERT_SET_ASIDE, set_aside_columns(set_aside))
            except psycopg.Error as exc:
                await _drop_if_read_only(conn, exc)
                raise
        return set_aside


# DeleteJobs: the named jobs in a final state (SUCCEEDED 5, FAILED 6, DEAD_LETTERED 7, CANCELLED 8),
# locked so that the projector cannot move one out of its final state between the check and the
# delete; their history rows, then the rows. NOWAIT is not used: a row the projector holds is
# waited for (one batch's transaction), then checked again by the predicate.
DELETE_FINISHED = """
WITH doomed AS (
    SELECT job_id FROM jobs WHERE job_id = ANY(%(ids)s) AND state IN (5, 6, 7, 8) FOR UPDATE
), history AS (
    DELETE FROM job_events e USING doomed d WHERE e.job_id = d.job_id
)
DELETE FROM jobs j USING doomed d WHERE j.job_id = d.job_id RETURNING j.job_id
"""


async def delete_finished_jobs(
    pool: AsyncConnectionPool[Any], job_ids: list[str], connect_timeout_s: float = 5.0
) -> tuple[list[str], dict[str, int]]:
    """Delete those of ``job_ids`` that are finished, each with its whole history, in one transaction.

    Returns:
        The ids deleted, and the state of each id kept because it is not finished (ids not
        recorded at all are in neither).
    """
    async with pool.connection(connect_timeout_s) as conn, conn.transaction():
        cur = await conn.execute(DELETE_FINISHED, {"ids": job_ids})
        deleted = sorted(str(r[0]) for r in await cur.fetchall())
        cur = await conn.execute("SELECT job_id, state FROM jobs WHERE job_id = ANY(%s)", (job_ids,))
        kept = {str(r[0]): int(r[1]) for r in await cur.fetchall()}
    return deleted, kept
