"""Writing validated jobs into their queues' streams, one Lua call per queue per batch.

Shared by the producer (Enqueue, EnqueueBatch, DeleteSchedule's in-flight tick) and the
worker's scheduler loop (a schedule tick's job), so both go through one validation and
enqueue path without either service importing the other.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import grpc
import structlog

from conveyor.common import crypto, faults, metrics, tracing
from conveyor.common.codec import length_delimited, timestamp_bytes, varint
from conveyor.common.defaults import DEFAULT_RETRY
from conveyor.common.errors import InvalidArgument, ResourceExhausted
from conveyor.common.ids import make_job_id, new_ulids
from conveyor.common.keys import DEFAULT_PRIORITY, queue_keys
from conveyor.common.queue_registry import QueueRegistry
from conveyor.common.redis import RedisClient, hget
from conveyor.common.schedules import TICK_KEY_WINDOW_MS, InFlight, ScheduleStore, tick_idempotency_key
from conveyor.common.scripts import NewJob, Scripts
from conveyor.common.validate import ValidJob, validate_all
from conveyor.v1 import event_pb2, job_pb2, producer_service_pb2

log = structlog.get_logger("conveyor.schedules")

_PAYLOAD_TAG = bytes([(5 << 3) | 2])  # Job.payload_json, length-delimited


# Tags (field number << 3 | wire type) of the fields the fast path writes.
_JOB_TYPE, _JOB_PRIORITY, _JOB_IDEM, _JOB_RATE_KEY = b"\x1a", b"\x30", b"\x52", b"\xb2\x01"
_JOB_TRACEPARENT, _JOB_TRACESTATE = b"\xba\x01", b"\xc2\x01"
_EVENT_QUEUED = b"\x18" + varint(event_pb2.EVENT_TYPE_QUEUED)
_EVENT_TIME, _EVENT_JOB = b"\x2a", b"\x62"


def build_job(
    valid: ValidJob, priority: int, now_ns: int, traceparent: str = "", tracestate: str = ""
) -> tuple[bytes, bytes]:
    """The Job as stored in the stream, and its QUEUED (or DELAYED) event.

    Both leave out what the keys already say (job id, queue), the Job leaves out what its
    readers fill in (created_at, which is its ULID's millisecond, and a retry policy equal
    to the default: ADR 0010), and the QUEUED event carries only the job's type and
    priority: a waiting job's bytes are its memory cost (ADR 0001). The payload is appended
    as raw bytes to the serialized rest. The common job (no labels, timeout, delay or retry
    policy of its own) is encoded by hand: building and serializing protobuf objects was the
    producer's largest cost per job. ``traceparent``/``tracestate`` (W3C trace context of the
    job's send span) are written only when given, i.e. while tracing is on (ADR 0018).
    """
    r = valid.request
    payload = valid.payload_json
    if valid.retry is DEFAULT_RETRY and not valid.due_ms and not r.labels and not r.HasField("timeout"):
        kind = r.type.encode()
        head = length_delimited(_JOB_TYPE, kind) + _JOB_PRIORITY + varint(priority)
        stored = b"".join(
            (
                head,
                length_delimited(_JOB_IDEM, r.idempotency_key.encode()) if r.idempotency_key else b"",
                length_delimited(_JOB_RATE_KEY, r.rate_key.encode()) if r.rate_key else b"",
                length_delimited(_JOB_TRACEPARENT, traceparent.encode()) if traceparent else b"",
                length_delimited(_JOB_TRACESTATE, tracestate.encode()) if tracestate else b"",
                _PAYLOAD_TAG,
                varint(len(payload)),
                payload,
            )
        )
        return stored, _EVENT_QUEUED + length_delimited(_EVENT_TIME, timestamp_bytes(now_ns)) + length_delimited(
            _EVENT_JOB, head
        )
    job = job_pb2.Job(
        type=r.type,
        priority=priority,
        labels=r.labels,
        idempotency_key=r.idempotency_key,
        rate_key=r.rate_key,
        traceparent=traceparent,
        tracestate=tracestate,
    )
    if valid.retry is not DEFAULT_RETRY:
        job.retry.CopyFrom(valid.retry)
    if r.HasField("timeout"):
        job.timeout.CopyFrom(r.timeout)
    if valid.due_ms:
        job.run_at.FromMilliseconds(valid.due_ms)
    stored = job.SerializeToString() + _PAYLOAD_TAG + varint(len(payload)) + payload
    event = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_DELAYED if valid.due_ms else event_pb2.EVENT_TYPE_QUEUED)
    if valid.due_ms:
        event.next_run_at.FromMilliseconds(valid.due_ms)
    event.time.FromNanoseconds(now_ns)
    event.job.type = r.type
    event.job.priority = priority
    return stored, event.SerializeToString()


def batch_error(queue: str, exc: Exception) -> producer_service_pb2.EnqueueError:
    """The per-job error of an EnqueueBatch for the jobs of ``queue``, whose write raised ``exc``.

    Classified by the one table of Redis faults (conveyor.common.faults): OOM is
    RESOURCE_EXHAUSTED, every other fault UNAVAILABLE; anything else is a bug (INTERNAL,
    logged with its traceback).
    """
    fault = faults.redis_fault(exc)
    if fault is None:
        log.error("enqueue_failed", queue=queue, exc_info=exc)
        return producer_service_pb2.EnqueueError(
            code=grpc.StatusCode.INTERNAL.value[0],
            message=f"queue {queue!r}: internal error (see the producer's log); "
            "sending these jobs again with the same idempotency keys is safe",
        )
    if fault in (faults.CONNECTION, faults.TIMEOUT):
        # The call may have reached Redis: its jobs may be there, which only a key makes safe to repeat.
        written = "this queue's jobs may or may not have been written: send them again with the same idempotency keys"
    else:
        written = "none of this queue's jobs were written: send them again"
    return producer_service_pb2.EnqueueError(
        code=fault.code.value[0], message=f"queue {queue!r}: {fault.advice}; {written}"
    )


class QueueDefaults:
    """Each queue's default priority (SetDefaultPriority), read from Redis at most once a second.

    A change reaches every producer within DEFAULTS_TTL_S; reading it on every enqueue would
    cost a round trip per batch for a setting that almost never changes.
    """

    DEFAULTS_TTL_S = 1.0
    #: Queues remembered at most (any queue name a client enqueues to is a key): the oldest
    #: entry goes first, and costs one HGET when that queue is used again.
    MAX_QUEUES = 1024

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._cache: dict[str, tuple[int, float]] = {}

    async def priority(self, queue: str) -> int:
        cached = self._cache.get(queue)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        raw = await hget(self._redis, queue_keys(queue).limits, "prio")
        value = int(raw) if raw else DEFAULT_PRIORITY
        self._cache.pop(queue, None)  # re-inserted last: the dict's order is the age of its entries
        while len(self._cache) >= self.MAX_QUEUES:
            del self._cache[next(iter(self._cache))]
        self._cache[queue] = (value, now + self.DEFAULTS_TTL_S)
        return value

    def __len__(self) -> int:
        return len(self._cache)


class Enqueuer:
    """Validates and writes jobs.

    Args:
        redis: Client for the queues' Redis.
        scripts: Scripts registered on that client.
        max_payload_bytes: Largest payload accepted, as JSON bytes.
        max_batch: Most jobs in one EnqueueBatch.
    """

    def __init__(self, redis: RedisClient, scripts: Scripts, max_payload_bytes: int, max_batch: int) -> None:
        self._redis = redis
        self._scripts = scripts
        self._max_payload_bytes = max_payload_bytes
        self._max_batch = max_batch
        self._registry = QueueRegistry(redis)
        self._defaults = QueueDefaults(redis)

    async def enqueue(
        self, requests: list[producer_service_pb2.EnqueueRequest], batch: bool
    ) -> list[producer_service_pb2.EnqueueResponse]:
        """Validate all requests, then write them; responses are in request order."""
        if batch and not requests:
            raise InvalidArgument({"jobs": "at least one job is required"})
        if len(requests) > self._max_batch:
            raise ResourceExhausted(f"jobs: {len(requests)} jobs in one batch; the limit is {self._max_batch}")
        return await self.write(validate_all(requests, self._max_payload_bytes, batch), batch)

    def validate_one(self, request: producer_service_pb2.EnqueueRequest) -> ValidJob:
        """Validate one unary Enqueue's request (raises InvalidArgument naming the bad fields)."""
        return validate_all([request], self._max_payload_bytes, False)[0]

    async def write(self, valid: list[ValidJob], batch: bool) -> list[producer_service_pb2.EnqueueResponse]:
        """Write validated jobs, one script call per queue; responses are in ``valid``'s order.

        With ``batch`` false any failure raises (a unary Enqueue's status); with ``batch`` true
        a queue whose write failed gives its jobs an error and the others go on, unless every
        queue failed, which raises.
        """
        defaults: dict[str, int] = {}
        for v in valid:
            if not v.priority and v.request.queue not in defaults:
                defaults[v.request.queue] = await self._defaults.priority(v.request.queue)
        by_queue: dict[str, list[tuple[int, NewJob]]] = defaultdict(list)
        ulids = new_ulids(len(valid))
        # Read after the ids: a job's created_at is its ULID's millisecond (ADR 0010), and its
        # QUEUED event's time must not come before it.
        now_ns = time.time_ns()
        spans = None if tracing.tracer is None else _send_spans(tracing.tracer, valid, ulids, batch)
        encryption = crypto.current()
        for index, (v, ulid) in enumerate(zip(valid, ulids, strict=True)):
            priority = v.priority or defaults[v.request.queue]
            if encryption.keyring is not None and encryption.encrypts(v.request.queue):
                # Sealed here, once, for its job id (ADR 0025): streams, events and PostgreSQL
                # only ever hold the ciphertext. A duplicate's sealed copy is never written.
                sealed = encryption.keyring.seal(v.payload_json, crypto.PAYLOAD, make_job_id(v.request.queue, ulid))
                v = dataclasses.replace(v, payload_json=sealed)
            if spans is None:
                stored, queued_event = build_job(v, priority, now_ns)
            else:
                stored, queued_event = build_job(v, priority, now_ns, *tracing.stored_context(spans[index]))
            by_queue[v.request.queue].append(
                (
                    index,
                    NewJob(
                        ulid=ulid,
                        priority=priority,
                        job=stored,
                        queued_event=queued_event,
                        idempotency_key=v.request.idempotency_key,
                        idempotency_window_ms=v.idempotency_window_ms,
                        due_ms=v.due_ms,
                        rate_key=v.request.rate_key,
                    ),
                )
            )
        responses: list[producer_service_pb2.EnqueueResponse] = [producer_service_pb2.EnqueueResponse() for _ in valid]
        # Atomic per queue (one Lua call writes all of a queue's jobs or none), not across
        # queues: each queue may live on its own Redis Cluster shard (ADR 0014). A queue whose
        # write fails does not stop the others; its jobs' results say why.
        failed: list[tuple[str, list[int], Exception]] = []
        for queue, items in by_queue.items():
            try:
                await self._register(queue)
                results = await self._scripts.enqueue(queue_keys(queue), [job for _, job in items])
            except Exception as exc:
                if spans is not None:
                    tracing.end_all((spans[index] for index, _ in items), exc)
                if not batch:
                    raise
                failed.append((queue, [index for index, _ in items], exc))
                continue
            created: dict[str, int] = {}
            for (index, _), result in zip(items, results, strict=True):
                r = responses[index]
                r.job_id = make_job_id(queue, result.ulid)
                r.created = result.created
                r.state = result.state  # type: ignore[assignment]
                if result.created:
                    job_type = valid[index].request.type
                    created[job_type] = created.get(job_type, 0) + 1
                if spans is not None:
                    span = spans[index]
                    # An idempotency key that is known answers with the job that has it.
                    span.set_attribute("messaging.message.id", r.job_id)
                    span.set_attribute("conveyor.job.created", result.created)
                    span.end()
            for job_type, n in created.items():
                metrics.job_event(queue, job_type, "enqueued", n)
        if failed:
            if len(failed) == len(by_queue):
                # Nothing was accepted: the call fails with the status (UNAVAILABLE,
                # RESOURCE_EXHAUSTED...), exactly as a single Enqueue would.
                raise failed[0][2]
            for queue, indexes, cause in failed:
                error = batch_error(queue, cause)
                for index in indexes:
                    responses[index].error.CopyFrom(error)
            log.warning(
                "enqueue_batch_partial",
                accepted=len(valid) - sum(len(indexes) for _, indexes, _ in failed),
                rejected=sum(len(indexes) for _, indexes, _ in failed),
                failed_queues=[queue for queue, _, _ in failed],
            )
        return responses

    async def _register(self, queue: str) -> None:
        # Discovery for the results service and operators; cached, and idle queues leave (queue_registry).
        await self._registry.register(queue)


def _send_spans(tracer: tracing.Tracer, valid: list[ValidJob], ulids: list[str], batch: bool) -> list[tracing.Span]:
    """One ``send {queue}`` PRODUCER span per job, children of the current context (the caller's,
    from the RPC's metadata, or none: a new trace). Each job's own span is its creation context,
    so each job has a trace of its own even in a batch (ADR 0018)."""
    spans = []
    for v, ulid in zip(valid, ulids, strict=True):
        queue = v.request.queue
        attributes = tracing.messaging_attributes(queue, "send", make_job_id(queue, ulid))
        attributes["conveyor.job.type"] = v.request.type
        if batch:
            attributes["messaging.batch.message_count"] = len(valid)
        spans.append(tracer.start_span(f"send {queue}", kind=tracing.SpanKind.PRODUCER, attributes=attributes))
    return spans


async def enqueue_tick(enqueuer: Enqueuer, store: ScheduleStore, tick: InFlight) -> str:
    """Enqueue the job of a claimed tick (idempotently) and record it; returns the job id.

    Safe to repeat, in any process: the idempotency key is derived from the schedule id
    and the tick, so a repeat returns the same job.
    """
    request = producer_service_pb2.EnqueueRequest()
    request.CopyFrom(tick.spec.template)
    request.idempotency_key = tick_idempotency_key(tick.schedule_id, tick.tick_ms)
    if not request.HasField("idempotency_window"):
        request.idempotency_window.FromMilliseconds(TICK_KEY_WINDOW_MS)
    (response,) = await enqueuer.enqueue([request], batch=False)
    await store.fired(tick.schedule_id, tick.tick_ms, response.job_id, time.time_ns() // 1_000_000)
    log.info(
        "schedule_fired",
        schedule_id=tick.schedule_id,
        tick_ms=tick.tick_ms,
        job_id=response.job_id,
        created=response.created,
    )
    return response.job_id
