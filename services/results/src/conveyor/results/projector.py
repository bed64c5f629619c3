"""The projector: reads every queue's event stream as consumer group ``results`` and folds the events into PostgreSQL.

One projector task runs per results process. A reader task pulls batches with XREADGROUP
(and, at start and every ``claim_interval_s``, its own pending entries and stale ones of
dead peers) and folds each into job rows; a writer task commits each batch in one
transaction and only then acks it, while the reader already fetches the next one.

Invariant 3 (DESIGN.md): an event is acked only after PostgreSQL committed it.
Invariant 5: PostgreSQL or Redis being down stops nobody; events wait in Redis, the
projector retries with backoff and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import structlog
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import ResponseError

from conveyor.common import faults, tracing
from conveyor.common.codec import FINAL_EVENTS, FINAL_STATES, STATE_AFTER_EVENT, struct_to_json
from conveyor.common.defaults import DEFAULT_RETRY
from conveyor.common.ids import parse_job_id, ulid_time_ms
from conveyor.common.keys import QUEUES, RESULTS_GROUP, queue_keys
from conveyor.common.redis import REDIS_UNAVAILABLE, RedisClient, by_slot, on_slot_of
from conveyor.common.scripts import Scripts
from conveyor.common.supervise import LoopStatus, Supervisor
from conveyor.results import pgerrors
from conveyor.results.store import EVENT_HEAD, HistoryRow, JobRow, SetAside, Store
from conveyor.v1 import event_pb2, job_pb2

log = structlog.get_logger("conveyor.results.projector")

#: How long a job left unfinished by a batch is kept back for its outcome (ADR 0020; CONVEYOR_PROJECTION_DEFER_MS).
DEFAULT_DEFER_MS = 10_000
#: How much longer than its BLOCK time one XREADGROUP may take before the connection is presumed dead.
READ_GRACE_S = 10.0

# Only these outcomes may be reopened, by a newer QUEUED/DELAYED (re-queued dead letters).
_REOPENABLE_STATES = frozenset({job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_DEAD_LETTERED})
_REQUEUE_EVENTS = frozenset({event_pb2.EVENT_TYPE_QUEUED, event_pb2.EVENT_TYPE_DELAYED})
_OUTCOME_WITH_ERROR = frozenset(
    {event_pb2.EVENT_TYPE_FAILED, event_pb2.EVENT_TYPE_DEAD_LETTERED, event_pb2.EVENT_TYPE_CANCELLED}
)
_EMPTY_LABELS = "{}"
_DEFAULT_RETRY_BYTES = DEFAULT_RETRY.SerializeToString()
# TimeoutError: a blocking read that outlived its grace (see READ_GRACE_S).
_READ_ERRORS: tuple[type[BaseException], ...] = (*REDIS_UNAVAILABLE, TimeoutError)
_TRIM_ERRORS: tuple[type[BaseException], ...] = (*REDIS_UNAVAILABLE, ResponseError)
_decode_event = event_pb2.JobEvent.FromString
_pack_head = EVENT_HEAD.pack


def _us(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _entry_fields(fields: Any) -> tuple[bytes | None, bytes | None]:
    """(``e``, ``j``) of a stream entry's fields: a raw [k, v, k, v...] reply (the hot path) or a dict."""
    if isinstance(fields, dict):
        return fields.get(b"e"), fields.get(b"j")
    if len(fields) == 4 and fields[0] == b"j" and fields[2] == b"e":  # as the Lua scripts write them
        return fields[3], fields[1]
    data = ulid = None
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"e":
            data = fields[i + 1]
        elif fields[i] == b"j":
            ulid = fields[i + 1]
    return data, ulid


class Carried:
    """A job a batch left unfinished, kept back for its outcome (ADR 0020): its folded row and history so far."""

    __slots__ = ("born", "held", "history", "row", "stream")

    def __init__(self, born: float, stream: str, row: JobRow, history: list[Any]) -> None:
        self.born = born
        self.stream = stream
        self.row = row
        #: As Batch._history: [first_ms, first_seq, last_ms, last_seq, entry ids, records...].
        self.history = history
        #: How many of the entry ids are held back (not acked by any batch yet): the first ``held``.
        self.held = len(history[4])


#: job id -> the job kept back, oldest first (insertion order is the order they were kept back in).
Carry = dict[str, Carried]


class Batch:
    """Entries read together: their folded job rows, their history rows, and the ids to ack per stream.

    ``events`` (one job_events row per job, see store.HistoryRow) is filled by ``finish``.
    Given the projector's ``carry`` (ADR 0020), a job kept back by an earlier batch is folded on
    top of what was kept: its row and history are the carried ones, updated in place; ``settle``
    then decides what is written now and what stays back.
    """

    __slots__ = ("_carry", "_history", "acks", "events", "malformed", "queues", "rows", "size", "traces")

    def __init__(self, carry: Carry | None = None) -> None:
        self.rows: dict[str, JobRow] = {}
        #: job id -> [first_ms, first_seq, last_ms, last_seq, [entry ids], packed records...]
        self._history: dict[str, list[Any]] = {}
        self._carry = carry
        self.events: list[HistoryRow] = []
        self.acks: dict[str, list[bytes]] = {}
        #: stream -> queue of every stream in ``acks``.
        self.queues: dict[str, str] = {}
        #: Entries that are not a JobEvent of a job: set aside with the batch, never dropped.
        self.malformed: list[SetAside] = []
        self.size = 0
        #: While tracing is on: (job id, queue, traceparent, tracestate) of each outcome whose
        #: job carries a trace context; its PostgreSQL write becomes a span of that trace.
        self.traces: list[tuple[str, str, str, str]] = []

    def add(self, queue: str, stream: str, entries: Sequence[Any], deleted: Sequence[bytes] = ()) -> None:
        """Fold one stream's entries (in id order) into the batch.

        ``entries`` are (id, fields) pairs, fields either as Redis sent them ([k, v, ...]) or as
        a dict. ``deleted`` are ids whose entries Redis no longer has (XAUTOCLAIM): nothing to
        project, but they are acked with the rest.
        """
        acks = self.acks.setdefault(stream, [])
        self.queues[stream] = queue
        acks.extend(deleted)
        prefix = queue + "/"
        fold = self._fold_one
        for entry_id, fields in entries:
            if entry_id is None:  # a deleted entry as Redis 6.2 reported it
                continue
            acks.append(entry_id)
            if not fields:
                continue  # deleted while pending: nothing left to project
            if fields.__class__ is list and len(fields) == 4 and fields[0] == b"j" and fields[2] == b"e":
                ulid, data = fields[1], fields[3]  # as the Lua scripts write them: the hot path
            else:
                data, ulid = _entry_fields(fields)
            if not data:
                continue
            try:
                fold(queue, prefix, entry_id, ulid, data)
            except (DecodeError, ValueError) as exc:
                # A poison entry must not wedge the projector, nor be lost: it is set aside in the
                # batch's commit (projection_set_aside), where an operator sees it.
                job_id = prefix + ulid.decode("utf-8", "replace") if ulid else ""
                error = f"malformed event: {exc}"
                log.error("event_malformed", queue=queue, job_id=job_id, entry_id=entry_id.decode(), error=error)
                self.malformed.append(SetAside(queue, job_id, entry_id.decode(), bytes(data), "", error))
        self.size += len(entries) + len(deleted)

    def _fold_one(self, queue: str, prefix: str, entry_id: bytes, ulid: bytes | None, data: bytes) -> None:
        ms_raw, _, seq_raw = entry_id.partition(b"-")
        ms, seq = int(ms_raw), int(seq_raw or 0)
        event = _decode_event(data)
        # Redis keeps events without their job id (ADR 0001): the stream's queue and the
        # entry's ULID give it. An event that does carry one is accepted as a fallback.
        job_id = prefix + ulid.decode() if ulid else event.job_id
        if not job_id:
            raise ValueError("event without job id")
        record = _pack_head(ms, seq, len(data)) + data  # store.pack_event, inline: once per event
        history = self._history.get(job_id)
        if history is None:
            carry = self._carry
            if carry and job_id in carry:
                # Kept back by an earlier batch: fold on top of what was kept.
                kept = carry[job_id]
                history = self._history[job_id] = kept.history
                self.rows[job_id] = kept.row
        if history is None:
            self._history[job_id] = [ms, seq, ms, seq, [entry_id], record]
        else:
            history[4].append(entry_id)
            if ms < history[0] or (ms == history[0] and seq < history[1]):
                history[0], history[1] = ms, seq
            if ms > history[2] or (ms == history[2] and seq > history[3]):
                history[2], history[3] = ms, seq
            history.append(record)
        etype = event.type
        state = STATE_AFTER_EVENT.get(etype)
        if state is None:
            return  # an event type this version does not know: kept in the history only
        row = self.rows.get(job_id)
        if row is None:
            row = self.rows[job_id] = JobRow(job_id, queue)
        elif row.state in FINAL_STATES and not (row.state in _REOPENABLE_STATES and etype in _REQUEUE_EVENTS):
            return  # Invariant 2: a final state is never overwritten (a late ACTIVE is ignored)
        if event.HasField("time"):
            t = event.time
            at_us = t.seconds * 1_000_000 + t.nanos // 1000
        else:
            at_us = ms * 1000
        apply_event(row, event, etype, state, ms, seq, at_us)
        if etype in FINAL_EVENTS and tracing.tracer is not None and event.job.traceparent:
            self.traces.append((job_id, queue, event.job.traceparent, event.job.tracestate))

    def __bool__(self) -> bool:
        return bool(self.size or self.rows or self._history or self.malformed)

    def settle(self, now: float, window_s: float, max_jobs: int) -> None:
        """Keep back the jobs this batch leaves unfinished, and write those kept back long enough (ADR 0020).

        A job first left unfinished less than ``window_s`` ago stays in the carry, with its history
        and its entry ids: nothing of it is committed or acked with this batch, so that a job whose
        outcome follows within the window is written once, as its final row, instead of a QUEUED
        row now and an UPDATE later. A carried job that finished here leaves the carry and is
        written; carried jobs whose window ended join this batch (all of them with ``window_s`` 0).
        At most ``max_jobs`` are held: beyond, a newly unfinished job is written at once (the jobs
        held are older, so nearer their outcome).
        """
        carry = self._carry
        if carry is None:
            return
        held: set[bytes] = set()
        for job_id, row in list(self.rows.items()):
            kept = carry.get(job_id)
            if row.state in FINAL_STATES:
                if kept is not None:  # finished now: written with what was held back, and acked with it
                    del carry[job_id]
                    ids = kept.history[4][: kept.held]
                    self.acks.setdefault(kept.stream, []).extend(ids)
                    self.queues[kept.stream] = kept.row.queue
                    self.size += len(ids)
                continue
            if kept is None:
                if window_s <= 0 or len(carry) >= max_jobs:
                    continue  # written now: the jobs already held are older, nearer their outcome
                history = self._history[job_id]
                carry[job_id] = Carried(now, queue_keys(row.queue).events, row, history)
            else:
                history = kept.history  # the same list, updated in place by this batch's events
                kept.held = len(history[4])
            del self.rows[job_id]
            del self._history[job_id]
            held.update(history[4])
        if held:
            for stream, ids in self.acks.items():
                keep = [i for i in ids if i not in held]
                self.size -= len(ids) - len(keep)
                self.acks[stream] = keep
        while carry:
            job_id = next(iter(carry))
            kept = carry[job_id]
            if now - kept.born < window_s:
                break
            del carry[job_id]
            self.rows[job_id] = kept.row
            self._history[job_id] = kept.history
            ids = kept.history[4]
            self.acks.setdefault(kept.stream, []).extend(ids)
            self.queues[kept.stream] = kept.row.queue
            self.size += len(ids)

    def finished(self) -> dict[str, list[tuple[str, str]]]:
        """Queue -> (ULID, final event id) of the jobs this batch leaves final (projected or set aside)."""
        out: dict[str, list[tuple[str, str]]] = {}
        for row in self.rows.values():
            if row.state in FINAL_STATES:
                ulid = row.job_id.rpartition("/")[2]
                out.setdefault(row.queue, []).append((ulid, f"{row.last_ms}-{row.last_seq}"))
        return out

    def finish(self) -> list[JobRow]:
        """The folded rows, with created_at filled in where no event carried the job; fills ``events``."""
        rows = list(self.rows.values())
        for row in rows:
            if row.created_us is None:
                # The ULID holds the creation millisecond: a stable sort key until the job itself arrives.
                parsed = parse_job_id(row.job_id)
                row.created_us = ulid_time_ms(parsed[1]) * 1000 if parsed else row.updated_us
        self.events = [
            (job_id, h[0], h[1], h[2], h[3], h[5] if len(h) == 6 else b"".join(h[5:]))
            for job_id, h in self._history.items()
        ]
        return rows


def apply_event(row: JobRow, event: event_pb2.JobEvent, etype: int, state: int, ms: int, seq: int, at_us: int) -> None:
    """Apply one event to a row folded from the job's earlier events of the same batch."""
    if event.HasField("job"):
        _take_job(row, event.job, etype in FINAL_EVENTS)
    row.state = state
    row.last_ms, row.last_seq = ms, seq
    if at_us > row.updated_us:
        row.updated_us = at_us
    if event.attempt > row.attempts:
        row.attempts = event.attempt
    if event.worker:
        row.worker = event.worker
    if etype == event_pb2.EVENT_TYPE_ACTIVE:
        row.started_us = at_us
    elif etype == event_pb2.EVENT_TYPE_PROGRESS:
        row.progress_percent = event.progress.percent
        row.progress_message = event.progress.message
    elif etype == event_pb2.EVENT_TYPE_SUCCEEDED:
        if event.result_json:
            row.result = event.result_json.decode("utf-8", "replace")
        elif event.HasField("result"):
            row.result = json_format.MessageToJson(event.result, indent=None)
        row.finished_us = at_us
    elif etype in _OUTCOME_WITH_ERROR:
        if event.HasField("error"):
            row.error = _error_json(event.error)
        row.finished_us = at_us
    elif etype == event_pb2.EVENT_TYPE_RETRY_SCHEDULED:
        if event.HasField("error"):
            row.error = _error_json(event.error)
        if event.HasField("next_run_at"):
            row.run_at_us = _us(event.next_run_at)
    elif etype in _REQUEUE_EVENTS:
        row.queued_ms, row.queued_seq = ms, seq
        row.finished_us = None
        if event.HasField("next_run_at"):
            row.run_at_us = _us(event.next_run_at)


def _error_json(error: job_pb2.JobError) -> str:
    return _dumps({"message": error.message, "kind": error.kind, "retryable": error.retryable})


def _take_job(row: JobRow, job: job_pb2.Job, stored: bool) -> None:
    """The job's own fields, from an event carrying it (QUEUED, or a final event with the payload).

    ``stored``: the job is the stored Job (a final event's), whose missing retry policy means
    the default one (ADR 0010); a QUEUED event's job names only the type and priority.
    """
    row.type = job.type
    row.priority = job.priority
    row.idempotency_key = job.idempotency_key or None
    row.labels = _dumps(dict(job.labels)) if job.labels else _EMPTY_LABELS
    if job.HasField("retry"):
        row.retry = job.retry.SerializeToString()
        row.max_attempts = job.retry.max_attempts
    elif stored:
        row.retry, row.max_attempts = _DEFAULT_RETRY_BYTES, DEFAULT_RETRY.max_attempts
    else:
        row.retry, row.max_attempts = None, None
    row.timeout_ms = (job.timeout.seconds * 1000 + job.timeout.nanos // 1_000_000) if job.HasField("timeout") else None
    if job.HasField("created_at"):
        row.created_us = _us(job.created_at)
    if job.HasField("run_at"):
        row.run_at_us = _us(job.run_at)
    if job.payload_json:
        row.payload = job.payload_json.decode("utf-8", "replace")
    elif job.HasField("payload"):
        row.payload = struct_to_json(job.payload).decode()


def _trace_write(
    tracer: tracing.Tracer, batch: Batch, rows: int, set_aside: list[SetAside], start_ns: int, end_ns: int
) -> None:
    """One CLIENT span per traced outcome in ``batch``, covering the transaction that committed it.

    Each is a child of its job's creation context (the send span the stored Job names), so the
    write of a job's outcome belongs to the job's trace; a batch commits many jobs' outcomes at
    once, hence one span per job, all with the same times (ADR 0018).
    """
    refused = {item.job_id: item for item in set_aside}
    for job_id, queue, traceparent, tracestate in batch.traces:
        attributes: dict[str, Any] = {
            "db.system.name": "postgresql",
            "db.operation.name": "upsert",
            "db.collection.name": "jobs",
            "db.operation.batch.size": rows,
            "messaging.system": tracing.SYSTEM,
            "messaging.destination.name": queue,
            "messaging.message.id": job_id,
        }
        span = tracer.start_span(
            "upsert jobs",
            context=tracing.job_context(traceparent, tracestate),
            kind=tracing.SpanKind.CLIENT,
            attributes=attributes,
            start_time=start_ns,
        )
        item = refused.get(job_id)
        if item is not None:
            tracing.fail(span, "SetAside", f"SQLSTATE {item.sqlstate}: {item.error}")
        span.end(end_time=end_ns)


async def _xreadgroup(
    client: RedisClient,
    consumer: str,
    streams: Iterable[str],
    start: bytes | str,
    count: int,
    block: int | None = None,
) -> list[Any]:
    """XREADGROUP as Redis answers it: [[stream, [[id, [field, value, ...] or None], ...]], ...].

    The command name is sent as bytes, which redis-py finds no reply callback for: the reply is
    returned raw instead of being turned into a dict per entry (a third of the read's cost).

    On a Redis Cluster the streams are read per hash slot (one command each, at once), which is
    only right without ``block``: Projector._read_blocking runs the blocking reads of several slots.
    """
    groups = by_slot(client, streams)
    if len(groups) > 1:
        replies = await asyncio.gather(*(_xreadgroup(client, consumer, g, start, count, block) for g in groups))
        return [entry for reply in replies for entry in reply]
    if not groups:
        return []
    keys = groups[0]
    args: list[Any] = [b"XREADGROUP", b"GROUP", RESULTS_GROUP, consumer, b"COUNT", count]
    if block is not None:
        args += [b"BLOCK", block]
    args += [b"STREAMS", *keys, *([start] * len(keys))]
    reply = await on_slot_of(client, keys[0], *args)
    return list(reply or [])


class _Backoff:
    """Exponential backoff with jitter, capped: 0.1 s, 0.2 s, ... 2 s."""

    def __init__(self, base: float = 0.1, cap: float = 2.0) -> None:
        self._base, self._cap, self._n = base, cap, 0

    def reset(self) -> None:
        self._n = 0

    def next(self) -> float:
        delay = min(self._cap, self._base * float(1 << self._n))
        self._n = min(self._n + 1, 16)
        return delay * (0.5 + random.random() / 2)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, waking early when ``stop`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Projector:
    """Projects every queue's events into PostgreSQL through ``store``.

    Args:
        redis: Client for commands that return at once (acks, pending reads, claims, trims).
        blocking: Client without a read timeout, for XREADGROUP BLOCK.
        store: Where batches are written.
        consumer: This process's consumer name in group ``results`` (unique per process).
        batch_size: COUNT of each XREADGROUP, per stream.
        retention_s: Events older than this (and acked) are trimmed from the streams.
        claim_idle_ms: Pending entries idle this long are taken over from other consumers.
        claim_interval_s: How often to look for such entries.
        stale_consumer_ms: Other consumers idle this long with nothing pending are deleted from the
            group (each restart of a results process with a pid-based name adds one).
        refresh_s: How often the set of queues is re-read.
        block_ms: Longest wait of one XREADGROUP (bounds how long stopping takes).
        coalesce_ms: When a read returns a small batch, how long to wait for more before writing.
        defer_ms: How long a job left unfinished by a batch is kept back, folded in memory, in case its
            outcome follows: a job that finishes within it is written once, as its final row (ADR 0020).
            A read that finds nothing (``block_ms`` of quiet) writes everything held at once. 0 writes
            every batch's rows at once.
        defer_max: Most jobs kept back at a time (about 1 KB each); beyond it new ones are written at once.
    """

    def __init__(
        self,
        redis: RedisClient,
        blocking: RedisClient,
        store: Store,
        *,
        consumer: str,
        batch_size: int = 1000,
        retention_s: float = 300.0,
        claim_idle_ms: int = 60_000,
        claim_interval_s: float = 30.0,
        stale_consumer_ms: int = 3_600_000,
        refresh_s: float = 2.0,
        block_ms: int = 1000,
        coalesce_ms: int = 10,
        defer_ms: int = DEFAULT_DEFER_MS,
        defer_max: int = 20_000,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._redis = redis
        self._blocking = blocking
        self._store = store
        self._scripts = Scripts(redis)
        self.consumer = consumer
        self._batch_size = batch_size
        self._retention_ms = int(retention_s * 1000)
        self._claim_idle_ms = claim_idle_ms
        self._claim_interval_s = claim_interval_s
        self._stale_consumer_ms = stale_consumer_ms
        self._refresh_s = refresh_s
        #: Set when a read failed: this consumer's pending entries are read again first.
        self._reread_pending = False
        self._block_ms = block_ms
        self._coalesce_s = coalesce_ms / 1000
        self._defer_s = defer_ms / 1000
        self._defer_max = defer_max
        #: Jobs kept back for their outcome (ADR 0020), oldest first; the next reads fold into them.
        self._carry: Carry = {}
        #: stream key -> queue name, for every queue whose group is known to exist.
        self._streams: dict[str, str] = {}
        #: Redis Cluster: the blocking read of each slot's streams still running (task, when it is overdue).
        self._slot_reads: dict[tuple[str, ...], tuple[asyncio.Future[list[Any]], float]] = {}
        self._refreshed_at = -1e9
        self._claimed_at = -1e9
        self._trimmed_at: dict[str, float] = {}
        #: Events committed and acked since start (for operators and benchmarks).
        self.projected = 0
        #: Entries set aside since start (see pgerrors).
        self.set_aside = 0
        # Reader (Redis) and writer (PostgreSQL) report apart: one working must not hide the other failing.
        self._reader_status = supervisor.status("projector-reader") if supervisor else LoopStatus("projector-reader")
        self._writer_status = supervisor.status("projector") if supervisor else LoopStatus("projector")

    async def run(self, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set; then finish the batches in flight (commit and ack) and return."""
        batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=2)
        # A restart (the Supervisor's, after a bug) re-reads this consumer's pending entries first.
        self._streams.clear()
        self._refreshed_at = self._claimed_at = -1e9
        self._carry.clear()  # its entries are pending for this consumer: re-read below
        reader = asyncio.create_task(self._read(stop, batches), name="results-reader")
        log.info("projector_started", consumer=self.consumer)
        try:
            await self._write(stop, batches)
        finally:
            reader.cancel()
            (outcome,) = await asyncio.gather(reader, return_exceptions=True)
            self._cancel_slot_reads()
            log.info("projector_stopped", consumer=self.consumer, projected=self.projected)
        if isinstance(outcome, Exception):
            # A reader that died of a bug takes the process down (server.serve) rather than idling.
            raise outcome

    # -- reading ---------------------------------------------------------------------------

    async def _read(self, stop: asyncio.Event, out: asyncio.Queue[Batch | None]) -> None:
        backoff = _Backoff()
        try:
            while not stop.is_set():
                try:
                    await self._read_once(out)
                    backoff.reset()
                    self._reader_status.ok()
                except ResponseError as exc:
                    self._reader_status.failed(exc)
                    self._reread_pending = True
                    if "NOGROUP" in str(exc):
                        # A stream or its group vanished (deleted, Redis restarted empty): create it again.
                        log.warning("results_group_missing", error=str(exc))
                        self._streams.clear()
                        self._refreshed_at = -1e9
                    else:
                        log.warning("redis_error", error=str(exc))
                    await _sleep(stop, backoff.next())
                except Exception as exc:
                    if not isinstance(exc, _READ_ERRORS) and not faults.is_transient(exc):
                        raise
                    self._reader_status.failed(exc)
                    # A read whose reply was lost left entries pending for this consumer: read them
                    # again now rather than wait claim_idle_ms to claim them back from ourselves.
                    self._reread_pending = True
                    log.warning("redis_unavailable", error=str(exc) or type(exc).__name__)
                    await _sleep(stop, backoff.next())
        except asyncio.CancelledError:
            raise  # run() cancels the reader only once the writer has ended
        except BaseException:
            await out.put(None)  # a bug: the writer finishes what is queued, then run() re-raises this
            raise
        # Stopping: the deferred jobs are written as they are, and the end marker waits behind the
        # batches in flight, which the writer commits and acks.
        if self._carry:
            batch = Batch(self._carry)
            batch.settle(time.monotonic(), 0.0, 0)
            await out.put(batch)
        await out.put(None)

    async def _read_once(self, out: asyncio.Queue[Batch | None]) -> None:
        now = time.monotonic()
        if self._reread_pending:
            # The held-back jobs' entries are pending for this consumer too: the re-read brings them back.
            self._carry.clear()
            self._cancel_slot_reads()  # their deliveries, if any, are pending: read below
            for stream, queue in list(self._streams.items()):
                await self._read_pending(queue, stream, out)
            self._reread_pending = False
        if now - self._refreshed_at >= self._refresh_s:
            for stream, queue in await self._discover():
                # Entries delivered to this consumer before a restart, never acked.
                await self._read_pending(queue, stream, out)
            self._refreshed_at = time.monotonic()
        if now - self._claimed_at >= self._claim_interval_s:
            await self._claim_stale(out)
            self._claimed_at = time.monotonic()
        if not self._streams:
            await asyncio.sleep(min(self._refresh_s, self._block_ms / 1000))
            return
        # The blocking client has no socket timeout; a connection that died silently must not hang
        # the reader forever. Entries lost in flight stay pending and are claimed back later.
        block_ms = self._block_ms
        carry = self._carry
        if carry:
            # Held-back jobs are written once their window ends, whether or not anything else arrives.
            due = carry[next(iter(carry))].born + self._defer_s - time.monotonic()
            block_ms = max(1, min(block_ms, int(due * 1000) + 1))
        reply = await self._read_blocking(block_ms)
        if reply:
            batch = Batch(carry)
            for stream, entries in reply:
                key = stream.decode()
                batch.add(self._streams[key], key, entries)
            read = batch.size
            if read < self._batch_size // 4 and self._coalesce_s > 0:
                # Events are trickling in (one Enqueue at a time): a commit per handful of events
                # costs a WAL flush each. Wait a moment for more and write them together.
                await asyncio.sleep(self._coalesce_s)
                more = await _xreadgroup(self._redis, self.consumer, self._streams, ">", self._batch_size - read)
                for stream, entries in more:
                    key = stream.decode()
                    batch.add(self._streams[key], key, entries)
            await self._put(out, batch)
        elif carry:
            # A quiet stream: the outcomes are not coming soon, so what is held is written now (a
            # waiting job shows in PostgreSQL after block_ms of quiet, not after the whole window).
            batch = Batch(carry)
            batch.settle(time.monotonic(), 0.0, 0)
            await out.put(batch)
        else:
            # Idle: events past the retention still leave Redis (invariant 7), not only after the next batch.
            await self._trim(list(self._streams))

    async def _read_blocking(self, block_ms: int) -> list[Any]:
        """XREADGROUP ``>`` on every stream, waiting up to ``block_ms`` for something new.

        One server (or every queue in one slot): one read. A Redis Cluster: one blocking read per
        hash slot, run at once; this returns what the first ones to answer brought, and leaves the
        others running for the next call (cancelling a read could lose the reply of entries Redis
        already delivered; they would stay pending until claimed back).
        """
        groups = by_slot(self._blocking, self._streams)
        if len(groups) <= 1:
            async with asyncio.timeout(block_ms / 1000 + READ_GRACE_S):
                return await _xreadgroup(
                    self._blocking, self.consumer, self._streams, ">", self._batch_size, block=block_ms
                )
        now = time.monotonic()
        for group in groups:
            key = tuple(group)
            if key not in self._slot_reads:
                read = _xreadgroup(self._blocking, self.consumer, group, ">", self._batch_size, block=block_ms)
                self._slot_reads[key] = (asyncio.ensure_future(read), now + block_ms / 1000 + READ_GRACE_S)
        await asyncio.wait(
            [task for task, _ in self._slot_reads.values()],
            timeout=block_ms / 1000,
            return_when=asyncio.FIRST_COMPLETED,
        )
        reply: list[Any] = []
        failed: BaseException | None = None
        now = time.monotonic()
        for key, (task, deadline) in list(self._slot_reads.items()):
            if task.done():
                del self._slot_reads[key]
                if task.exception() is not None:
                    failed = failed or task.exception()
                else:
                    reply += task.result()
            elif now > deadline:
                # A connection that died silently: what it had delivered is pending, and re-read.
                del self._slot_reads[key]
                task.cancel()
                failed = failed or TimeoutError(f"XREADGROUP on {len(key)} streams took longer than its block time")
        if failed is not None:
            # What the other reads brought is pending for this consumer: the re-read after the error finds it.
            raise failed
        return reply

    def _cancel_slot_reads(self) -> None:
        for task, _ in self._slot_reads.values():
            task.cancel()
        self._slot_reads.clear()

    async def _put(self, out: asyncio.Queue[Batch | None], batch: Batch) -> None:
        """Hand ``batch`` to the writer, less the jobs kept back for their outcome (ADR 0020)."""
        batch.settle(time.monotonic(), self._defer_s, self._defer_max)
        if batch:
            await out.put(batch)

    async def _discover(self) -> list[tuple[str, str]]:
        """Re-read the queue set; create group ``results`` on new queues' streams. Returns the new (stream, queue)."""
        members: set[bytes] = await self._redis.smembers(QUEUES)  # type: ignore[misc]  # redis-py's sync|async union
        names = sorted(m.decode() for m in members)
        new: list[tuple[str, str]] = []
        for queue in names:
            stream = queue_keys(queue).events
            if stream in self._streams:
                continue
            try:
                await self._redis.xgroup_create(stream, RESULTS_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._streams[stream] = queue
            new.append((stream, queue))
            log.info("queue_discovered", queue=queue)
        return new

    async def _read_pending(self, queue: str, stream: str, out: asyncio.Queue[Batch | None]) -> None:
        # Id "<n>" (not ">") returns this consumer's pending entries after n: page through them.
        start: bytes = b"0"
        while True:
            reply = await _xreadgroup(self._redis, self.consumer, [stream], start, self._batch_size)
            entries = reply[0][1] if reply else []
            if not entries:
                return
            batch = Batch()
            batch.add(queue, stream, entries)
            await out.put(batch)
            log.info("pending_reread", queue=queue, entries=len(entries))
            start = entries[-1][0]

    async def _claim_stale(self, out: asyncio.Queue[Batch | None]) -> None:
        """Take over entries pending longer than claim_idle_ms (a results process died holding them)."""
        for stream, queue in list(self._streams.items()):
            cursor: bytes | str = b"0-0"
            while True:
                reply = await self._redis.xautoclaim(
                    stream,
                    RESULTS_GROUP,
                    self.consumer,
                    min_idle_time=self._claim_idle_ms,
                    start_id=cursor,
                    count=self._batch_size,
                )
                cursor, entries = reply[0], reply[1]
                # Redis 7 reports entries deleted while pending separately; ack them too.
                deleted = reply[2] if len(reply) > 2 else []
                if entries or deleted:
                    batch = Batch()
                    batch.add(queue, stream, entries, deleted)
                    await out.put(batch)
                    log.info("pending_claimed", queue=queue, entries=len(entries), deleted=len(deleted))
                if cursor in (b"0-0", "0-0"):
                    break
            for info in await self._redis.xinfo_consumers(stream, RESULTS_GROUP):
                name = info["name"]
                if info["pending"] == 0 and info["idle"] >= self._stale_consumer_ms and name != self.consumer.encode():
                    await self._redis.xgroup_delconsumer(stream, RESULTS_GROUP, name)
                    log.info("consumer_deleted", queue=queue, consumer=name.decode())

    # -- writing ---------------------------------------------------------------------------

    async def _write(self, stop: asyncio.Event, batches: asyncio.Queue[Batch | None]) -> None:
        while True:
            batch = await batches.get()
            if batch is None:
                return
            if not await self._commit(stop, batch):
                return  # stopping while PostgreSQL is down: the entries stay pending for next time
            await self._ack(stop, batch)

    async def _commit(self, stop: asyncio.Event, batch: Batch) -> bool:
        """Commit ``batch`` (rows refused for their own data set aside in the same commit); retry anything else.

        Every PostgreSQL error but classes 22/23 (pgerrors) is retried with capped backoff, the
        same batch, for as long as it lasts: nothing is acked before its commit. While it lasts
        the projector's LoopStatus says so, and the process's health turns NOT_SERVING.
        """
        rows = batch.finish()
        backoff = _Backoff(cap=5.0)
        while True:
            started_ns = time.time_ns()
            try:
                set_aside = await self._store.write(rows, batch.events, batch.malformed)
            except Exception as exc:
                fault = pgerrors.pg_fault(exc)
                if fault is None:
                    raise  # a bug: the Supervisor restarts the projector; the entries stay pending
                self._writer_status.failed(exc)
                sqlstate, message = pgerrors.describe(exc)
                log.warning(
                    "postgres_unavailable", fault=fault.name, sqlstate=sqlstate, error=message, entries=batch.size
                )
            else:
                self._writer_status.ok()
                for item in set_aside:
                    self.set_aside += 1
                    log.error(
                        "event_set_aside",
                        queue=item.queue,
                        job_id=item.job_id,
                        entry_id=item.entry_id,
                        sqlstate=item.sqlstate,
                        error=item.error,
                    )
                if batch.traces and tracing.tracer is not None:
                    _trace_write(tracing.tracer, batch, len(rows), set_aside, started_ns, time.time_ns())
                return True
            if stop.is_set():
                log.warning("batch_abandoned", entries=batch.size)
                return False
            await _sleep(stop, backoff.next())

    async def _ack(self, stop: asyncio.Event, batch: Batch) -> None:
        """After the commit: let the finished jobs' live records expire, then ack the entries.

        Retention counts from projection (issue 10): a finished job's live record stays in Redis
        (done score +inf) until its outcome is committed here, so GetJob and Watch never lose a
        job that PostgreSQL does not have yet.
        """
        backoff = _Backoff()
        # Per stream, one script call sets the finished jobs' expiry and acks the entries (ADR 0030).
        todo: dict[str, tuple[str, list[tuple[str, str]], list[bytes]]] = {
            stream: (batch.queues[stream], [], ids) for stream, ids in batch.acks.items() if ids
        }
        for queue, jobs in batch.finished().items():
            stream = queue_keys(queue).events
            todo[stream] = (queue, jobs, todo[stream][2] if stream in todo else [])
        while True:
            try:
                for stream, (queue, jobs, ids) in list(todo.items()):
                    await self._scripts.projected(queue_keys(queue), jobs, self._retention_ms, ids)
                    del todo[stream]
                break
            except Exception as exc:
                transient = faults.is_transient(exc) or isinstance(exc, REDIS_UNAVAILABLE)
                if isinstance(exc, ResponseError) and not transient:
                    # NOGROUP: the stream went away, and its pending entries with it.
                    log.warning("ack_failed", error=str(exc), entries=batch.size)
                    break
                if not transient:
                    raise
                # Committed already: replaying these entries later is harmless, so give up on stop.
                self._reader_status.failed(exc)
                log.warning("ack_failed", error=str(exc) or type(exc).__name__, entries=batch.size)
                if stop.is_set():
                    return
                await _sleep(stop, backoff.next())
        self.projected += batch.size
        await self._trim(list(batch.acks))

    async def _trim(self, streams: list[str]) -> None:
        """Trim acked events older than the retention, at most once a second per stream."""
        now = time.monotonic()
        cutoff_ms = int(time.time() * 1000) - self._retention_ms
        for stream in streams:
            if now - self._trimmed_at.get(stream, -1e9) < 1.0:
                continue
            self._trimmed_at[stream] = now
            queue = self._streams.get(stream)
            if queue is None:
                continue
            try:
                await self._scripts.trim_events(queue_keys(queue), cutoff_ms)
            except _TRIM_ERRORS as exc:
                log.warning("trim_failed", queue=queue, error=str(exc))
