"""Watch and WatchQueue: replay events, then follow them live.

One reader per queue's event stream per process (an EventTail) fans events out to
every local watcher of that queue, whether it follows one job (Watch) or the whole
queue (WatchQueue): a thousand watchers cost one blocking read, not a thousand. A
watcher subscribes to the tail *before* it replays, and drops live events whose id it
has already sent, so there is neither a gap nor a repeat.

Every watcher has a bounded inbox (``buffer`` events, CONVEYOR_WATCH_BUFFER). A Watch
that falls further behind ends with RESOURCE_EXHAUSTED (it resumes with
after_event_id); a WatchQueue drops its backlog, is told so by a gap message (range
and count) and continues live.

A live event reaches every watcher as the same serialized response (:class:`LiveEvent`):
with a thousand watchers of a burst, the producer's CPU per delivery decides how late the
last one is. Most of it is gRPC's own send; what the producer adds on top is kept to an
append and at most one wake-up per watcher (ADR 0011).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.commands.core import AsyncScript

from conveyor.common import faults
from conveyor.common.codec import FINAL_EVENTS, decode_event, public_event
from conveyor.common.errors import InvalidArgument, NotFound, ResourceExhausted
from conveyor.common.ids import parse_job_id, parse_stream_id, stream_id_key
from conveyor.common.keys import QueueKeys, queue_keys
from conveyor.common.redis import RedisClient, hget, register_script, xread
from conveyor.common.scripts import Record, Scripts
from conveyor.common.supervise import Supervisor
from conveyor.common.validate import queue_problem
from conveyor.producer.history import History
from conveyor.v1 import event_pb2, producer_service_pb2

log = structlog.get_logger("conveyor.producer.watch")

#: Events one watcher may have waiting before it is cut off (it can resume with after_event_id).
WATCHER_BUFFER = 10_000
#: Watch and WatchQueue streams one producer serves at once, by default (CONVEYOR_MAX_WATCHES).
MAX_WATCHES = 10_000
#: Events read per XRANGE when a WatchQueue replays.
_PAGE = 512
#: The oldest event and the first page of a range, read at one instant (a script rather than MULTI,
#: which redis-py does not offer on a Redis Cluster). KEYS[1] events  ARGV start, end, count.
_FIRST_PAGE = """
return {redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1),
        redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])}
"""


def _entries(raw: list[Any]) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries as a script returns them, shaped as redis-py's XRANGE answers them."""
    return [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True))) for entry_id, fields in raw]


#: Ends a Watch inbox that overflowed.
_OVERFLOW = None


class LiveEvent:
    """One live event as every local watcher sends it: converted for clients and serialized once per tail.

    ``data`` is the serialized ``WatchResponse``; it is also the serialized
    ``WatchQueueResponse`` carrying the event, since both messages hold the event as field 1
    and nothing else (a test checks this), so one encoding serves both kinds of watcher.
    """

    __slots__ = ("_data", "event", "final", "key")

    def __init__(self, key: tuple[int, int], event: event_pb2.JobEvent) -> None:
        self.key = key
        self.event = event
        self.final = event.type in FINAL_EVENTS
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        # Serialized on first use: a tail whose watchers all follow other jobs never pays for it.
        if self._data is None:
            self._data = producer_service_pb2.WatchResponse(event=self.event).SerializeToString()
        return self._data


class Subscription:
    """One Watch watcher's inbox on a tail: at most ``buffer`` events, then an overflow mark.

    A deque and one waiter future rather than an asyncio.Queue: a burst of events costs an
    append per watcher and at most one wake-up, and the watcher takes whatever has arrived
    without waiting again.
    """

    __slots__ = ("_waiter", "buffer", "inbox", "overflowed", "ulid")

    def __init__(self, ulid: str, buffer: int = WATCHER_BUFFER) -> None:
        self.ulid = ulid
        self.buffer = buffer
        self.inbox: deque[LiveEvent | None] = deque()
        self.overflowed = False
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, live: LiveEvent) -> None:
        if self.overflowed:
            return
        if len(self.inbox) >= self.buffer:
            self.overflowed = True
            self.inbox.append(_OVERFLOW)
        else:
            self.inbox.append(live)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        """Return once the inbox holds something."""
        while not self.inbox:
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None


@dataclass(frozen=True)
class Gap:
    """``dropped`` events a queue watcher lost, just before the event with id ``before_id``."""

    dropped: int
    before_id: str


class QueueSubscription:
    """One WatchQueue watcher's inbox on a tail: at most ``buffer`` events.

    When an event arrives and the inbox is full, the whole backlog is dropped and
    remembered as one :class:`Gap` (merged with a gap not yet taken), then the new event
    is queued: memory stays bounded and the watcher continues live. A gap is always
    taken together with the event that follows it.
    """

    def __init__(self, queue: str, buffer: int, event_types: frozenset[int]) -> None:
        self.queue = queue
        self.buffer = buffer
        self.event_types = event_types
        #: Events up to this stream id were read by the tail before this subscription (fixed on subscribe).
        self.boundary: tuple[int, int] | None = None
        self._events: deque[tuple[tuple[int, int], event_pb2.JobEvent, LiveEvent | None]] = deque()
        #: Dropped events just before ``_events[0]`` (set only while ``_events`` is not empty).
        self._gap: Gap | None = None
        self._wakeup = asyncio.Event()

    @property
    def pending(self) -> int:
        """Events waiting in the inbox."""
        return len(self._events)

    def offer(self, key: tuple[int, int], event: event_pb2.JobEvent, live: LiveEvent | None = None) -> None:
        """Queue ``event``; ``live``, when given, is the same event already serialized by the tail."""
        if self.event_types and event.type not in self.event_types:
            return
        if len(self._events) >= self.buffer:
            dropped = len(self._events) + (self._gap.dropped if self._gap else 0)
            self._events.clear()
            self._gap = Gap(dropped, event.id)
            log.info("watch_queue_backlog_dropped", queue=self.queue, dropped=dropped, buffer=self.buffer)
        self._events.append((key, event, live))
        self._wakeup.set()

    async def next(self) -> tuple[Gap | None, tuple[int, int], event_pb2.JobEvent]:
        """The oldest event, and the gap just before it if events were dropped there."""
        gap, key, event, _live = await self.next_live()
        return gap, key, event

    async def next_live(self) -> tuple[Gap | None, tuple[int, int], event_pb2.JobEvent, LiveEvent | None]:
        """Like :meth:`next`, with the tail's serialized form of the event when it has one."""
        while not self._events:
            self._wakeup.clear()
            await self._wakeup.wait()
        gap, self._gap = self._gap, None
        key, event, live = self._events.popleft()
        return gap, key, event, live


class EventTail:
    """Follows one queue's event stream and hands each event to its job's subscribers.

    The read loop runs under the process's Supervisor (loop ``watch-tail:<queue>``): any error,
    a Redis fault (connection killed, UNBLOCKED on a role change, LOADING...) or a bug, restarts
    it with capped jittered backoff and counts towards the process's health. It resumes from the
    last id it handed out, so watchers get neither a gap nor a repeat.
    """

    def __init__(
        self, client: RedisClient, keys: QueueKeys, block_ms: int = 5000, supervisor: Supervisor | None = None
    ) -> None:
        self._client = client
        self._keys = keys
        self._block_ms = block_ms
        self._supervisor = supervisor or Supervisor()
        self._stop = asyncio.Event()
        self._subs: dict[str, set[Subscription]] = {}
        self._queue_subs: set[QueueSubscription] = set()
        self._last_id = "0-0"
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def idle(self) -> bool:
        return not self._subs and not self._queue_subs

    async def subscribe(self, ulid: str, buffer: int = WATCHER_BUFFER) -> Subscription:
        """Subscribe to one job; returns once the tail's start position is fixed."""
        sub = Subscription(ulid, buffer)
        self._subs.setdefault(ulid, set()).add(sub)
        self._start()
        await self._ready.wait()
        return sub

    async def subscribe_queue(self, sub: QueueSubscription) -> None:
        """Subscribe to every event; on return ``sub.boundary`` is the last id it will not get."""
        self._queue_subs.add(sub)
        if self._ready.is_set():
            sub.boundary = stream_id_key(self._last_id)
        self._start()
        await self._ready.wait()

    def unsubscribe_queue(self, sub: QueueSubscription) -> None:
        self._queue_subs.discard(sub)

    @property
    def loop_name(self) -> str:
        """The tail's name in the Supervisor."""
        return f"watch-tail:{self._keys.queue}"

    def _start(self) -> None:
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(
                self._supervisor.run(self.loop_name, self._run, self._stop), name=f"event-tail:{self._keys.queue}"
            )

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.ulid)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.ulid]

    async def close(self) -> None:
        if self._task is not None:
            self._stop.set()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _start_position(self) -> str:
        try:
            info = await self._client.xinfo_stream(self._keys.events)
        except aioredis.ResponseError as exc:
            if faults.is_transient(exc):
                raise  # READONLY, BUSY, MASTERDOWN...: a fault, not "no such stream"
            return "0-0"  # no stream yet: everything that comes is new
        last = info["last-generated-id"]
        return str(last.decode() if isinstance(last, bytes) else last)

    async def _run(self) -> None:
        """The read loop; every error goes to the Supervisor, which restarts it (from ``_last_id``)."""
        status = self._supervisor.status(self.loop_name)
        while True:
            if not self._ready.is_set():
                self._last_id = await self._start_position()
                for qsub in self._queue_subs:
                    if qsub.boundary is None:
                        qsub.boundary = stream_id_key(self._last_id)
                self._ready.set()
            replies = await xread(self._client, {self._keys.events: self._last_id}, count=512, block=self._block_ms)
            status.ok()
            for _stream, entries in replies or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode()
                    ulid = fields[b"j"].decode()
                    subs = self._subs.get(ulid)
                    if not subs and not self._queue_subs:
                        continue
                    # Decoded, converted for clients and serialized once per tail, not once per watcher.
                    event = public_event(decode_event(entry_id, fields[b"e"], f"{self._keys.queue}/{ulid}"))
                    live = LiveEvent(stream_id_key(entry_id), event)
                    if subs:
                        for sub in list(subs):
                            sub.offer(live)
                    for qsub in list(self._queue_subs):
                        qsub.offer(live.key, event, live)


def _watch_response(event: event_pb2.JobEvent) -> bytes:
    """``event`` as a serialized ``WatchResponse`` (the same bytes as a ``WatchQueueResponse`` with it)."""
    return producer_service_pb2.WatchResponse(event=event).SerializeToString()


class Watcher:
    """Serves Watch for every queue.

    Args:
        redis: Client for ordinary commands.
        tail_redis: Client for blocking reads (no socket timeout).
        scripts: Scripts on ``redis``.
        history: Where events of jobs that left Redis are read from (the results service).
        buffer: Events one stream may have waiting (CONVEYOR_WATCH_BUFFER).
        max_watches: Most Watch and WatchQueue streams open at once (CONVEYOR_MAX_WATCHES);
            one more ends at once with RESOURCE_EXHAUSTED.
        supervisor: The process's Supervisor, which runs the event tails.

    ``redis`` should be a pool of its own (CONVEYOR_WATCH_REDIS_POOL_SIZE): a burst of
    replays then waits for or fails on that pool, never the one Enqueue uses.
    """

    def __init__(
        self,
        redis: RedisClient,
        tail_redis: RedisClient,
        scripts: Scripts,
        history: History,
        buffer: int = WATCHER_BUFFER,
        max_watches: int = MAX_WATCHES,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._redis = redis
        self._first_page: AsyncScript | None = None  # registered on first use
        self._supervisor = supervisor or Supervisor()
        self._max_watches = max_watches
        #: Watch and WatchQueue streams open now (at most max_watches).
        self._streams = 0
        self._tail_redis = tail_redis
        self._scripts = scripts
        self._history = history
        self._buffer = buffer
        self._tails: dict[str, EventTail] = {}
        #: Live-record reads of _ends_at in flight, shared by the watchers of one job that reach
        #: its final event together (a burst of N watchers made N reads of the same record).
        self._ending: dict[tuple[str, str, tuple[int, int]], asyncio.Future[bool | None]] = {}

    @property
    def streams(self) -> int:
        """Watch and WatchQueue streams open now."""
        return self._streams

    def _open_stream(self) -> None:
        if self._streams >= self._max_watches:
            raise ResourceExhausted(
                f"this producer already serves {self._streams} Watch/WatchQueue streams, its limit "
                f"(CONVEYOR_MAX_WATCHES={self._max_watches}); retry later, on another producer replica, "
                "or close streams you no longer read"
            )
        self._streams += 1

    async def close(self) -> None:
        for tail in self._tails.values():
            await tail.close()
        self._tails.clear()

    async def watch(self, request: producer_service_pb2.WatchRequest, context: object = None) -> AsyncIterator[bytes]:
        """The job's events after ``request.after_event_id`` (all when empty) until its current final event.

        Each is a serialized ``WatchResponse``, ready for the wire. The signature is a gRPC
        handler's: ProducerServicer serves Watch with this generator itself (one generator
        layer less on every event sent to every watcher).
        """
        self._open_stream()
        try:
            job_id, after_event_id = request.job_id, request.after_event_id
            parsed = parse_job_id(job_id)
            if parsed is None:
                raise InvalidArgument({"job_id": "must be a job id like '<queue>/<ULID>'"})
            after: tuple[int, int] = (0, 0)
            if after_event_id:
                parsed_after = parse_stream_id(after_event_id)
                if parsed_after is None:
                    raise InvalidArgument({"after_event_id": "must be an event id like '1732540000000-0'"})
                after = parsed_after
            queue, ulid = parsed
            keys = queue_keys(queue)
            raw = await hget(self._redis, keys.state, ulid)
            if raw is None:
                # The job left Redis (finished longer ago than the retention), or never existed.
                found = False
                async for event in self._history.events(job_id, after_event_id):
                    found = True
                    yield _watch_response(event)
                if not found and not await self._history.exists(job_id):
                    raise NotFound(f"job {job_id} not found")
                return
            record = Record.parse(raw)
            tail = self._tail(keys)
            sub = await tail.subscribe(ulid, self._buffer)
            try:
                last = after
                async for key, event in self._replay(keys, ulid, job_id, record, after, after_event_id):
                    last = key
                    yield _watch_response(public_event(event))
                    if event.type in FINAL_EVENTS:
                        ends = await self._ends_at(keys, ulid, key)
                        if ends is None:
                            async for later in self._history.events(job_id, event.id):
                                yield _watch_response(later)
                            return
                        if ends:
                            return
                inbox = sub.inbox
                while True:
                    if not inbox:
                        await sub.wait()
                    live = inbox.popleft()
                    if live is None:  # the overflow mark
                        raise ResourceExhausted(
                            f"watcher fell more than {self._buffer} events behind; "
                            f"resume with after_event_id={last[0]}-{last[1]}"
                        )
                    if live.key <= last:
                        continue
                    last = live.key
                    yield live.data  # serialized once by the tail for every watcher
                    if live.final:
                        ends = await self._ends_at(keys, ulid, live.key)
                        if ends is None:
                            async for later in self._history.events(job_id, live.event.id):
                                yield _watch_response(later)
                            return
                        if ends:
                            return
            finally:
                tail.unsubscribe(sub)
                await self._release(tail, queue)
        finally:
            self._streams -= 1

    async def _ends_at(self, keys: QueueKeys, ulid: str, key: tuple[int, int]) -> bool | None:
        """Whether the final event with stream id ``key`` is the job's *current* final event.

        A final event is not always the end: RetryDeadLetters (or any re-run) gives the job a
        new attempt after it, and the live record then says QUEUED/ACTIVE with no final event,
        or names a later one. Only the event the live record names as final ends a Watch.
        None when the live record is gone (the job finished and left Redis after its outcome
        was projected): the caller sends what the results service holds after this event.

        Watchers asking about the same event while a read is out share that read; an answer is
        never kept past it, so a watcher that asks later (the job re-run meanwhile) reads again.
        """
        token = (keys.state, ulid, key)
        pending = self._ending.get(token)
        if pending is None:
            pending = self._ending[token] = asyncio.ensure_future(self._read_ends_at(keys, ulid, key))
            pending.add_done_callback(functools.partial(self._ended_read, token))
        # Shielded: a watcher that goes away must not cancel the read the others wait on.
        return await asyncio.shield(pending)

    def _ended_read(self, token: tuple[str, str, tuple[int, int]], done: asyncio.Future[bool | None]) -> None:
        self._ending.pop(token, None)
        if not done.cancelled():
            done.exception()  # retrieved: every watcher that waited got it, and none may have

    async def _read_ends_at(self, keys: QueueKeys, ulid: str, key: tuple[int, int]) -> bool | None:
        raw = await hget(self._redis, keys.state, ulid)
        if raw is None:
            return None
        final = Record.parse(raw).final_event_id
        return bool(final) and stream_id_key(final) <= key

    async def watch_queue(
        self, request: producer_service_pb2.WatchQueueRequest, context: object = None
    ) -> AsyncIterator[bytes]:
        """Every event of ``request.queue`` (and gap markers), forever: see WatchQueue in the proto.

        Each is a serialized ``WatchQueueResponse``, ready for the wire; like :meth:`watch`,
        this generator is the gRPC handler itself.
        """
        self._open_stream()
        try:
            queue, after_event_id, replay = request.queue, request.after_event_id, request.replay
            event_types: Iterable[int] = request.event_types
            bad: dict[str, str] = {}
            if (problem := queue_problem(queue)) is not None:
                bad["queue"] = problem
            after = (0, 0)
            if after_event_id:
                parsed_after = parse_stream_id(after_event_id)
                if parsed_after is None:
                    bad["after_event_id"] = "must be an event id like '1732540000000-0'"
                else:
                    after = parsed_after
                if replay:
                    bad["replay"] = "set at most one of after_event_id and replay"
            types = list(event_types)
            for i, value in enumerate(types):
                if value == event_pb2.EVENT_TYPE_UNSPECIFIED or value not in event_pb2.EventType.values():
                    bad[f"event_types[{i}]"] = "must be a known event type other than EVENT_TYPE_UNSPECIFIED"
            if bad:
                raise InvalidArgument(bad)
            keys = queue_keys(queue)
            tail = self._tail(keys)
            sub = QueueSubscription(queue, self._buffer, frozenset(types))
            await tail.subscribe_queue(sub)
            try:
                last, last_id = after, after_event_id
                if after_event_id or replay:
                    async for item in self._replay_queue(keys, after, after_event_id, sub):
                        if isinstance(item, producer_service_pb2.WatchQueueGap):
                            yield producer_service_pb2.WatchQueueResponse(gap=item).SerializeToString()
                            continue
                        (last, event) = item
                        last_id = event.id
                        yield producer_service_pb2.WatchQueueResponse(event=event).SerializeToString()
                while True:
                    gap, key, event, live = await sub.next_live()
                    if gap is not None:
                        yield producer_service_pb2.WatchQueueResponse(
                            gap=producer_service_pb2.WatchQueueGap(
                                reason=producer_service_pb2.WATCH_QUEUE_GAP_REASON_SLOW_CLIENT,
                                after_event_id=last_id,
                                before_event_id=gap.before_id,
                                dropped=gap.dropped,
                            )
                        ).SerializeToString()
                    if key <= last:
                        continue
                    last, last_id = key, event.id
                    yield live.data if live is not None else _watch_response(event)
            finally:
                tail.unsubscribe_queue(sub)
                await self._release(tail, queue)
        finally:
            self._streams -= 1

    async def _replay_queue(
        self, keys: QueueKeys, after: tuple[int, int], after_event_id: str, sub: QueueSubscription
    ) -> AsyncIterator[tuple[tuple[int, int], event_pb2.JobEvent] | producer_service_pb2.WatchQueueGap]:
        """The queue's events Redis holds after ``after`` up to the subscription's boundary, oldest first.

        When resuming (``after_event_id``) after an id older than the oldest event Redis
        holds, a TRIMMED gap comes first. Redis does not say which ids a trim removed, so
        this is conservative: the gap runs up to that oldest event (or up to "now" when the
        queue has no events in Redis). The oldest event and the first page are read in one
        MULTI, so a trim cannot slip between the check and the read.
        """
        boundary = sub.boundary or (0, 0)
        start = f"({after[0]}-{after[1]}" if after > (0, 0) else "-"
        end = f"{boundary[0]}-{boundary[1]}"
        if self._first_page is None:
            self._first_page = register_script(self._redis, _FIRST_PAGE)
        oldest, entries = await self._first_page(keys=[keys.events], args=[start, end, _PAGE])
        oldest, entries = _entries(oldest), _entries(entries)
        if after_event_id:
            gap = await self._trimmed_gap(keys, after, after_event_id, oldest[0][0].decode() if oldest else "")
            if gap is not None:
                yield gap
        while True:
            for entry_id, fields in entries:
                event = decode_event(entry_id, fields[b"e"], f"{keys.queue}/{fields[b'j'].decode()}")
                if not sub.event_types or event.type in sub.event_types:
                    yield stream_id_key(entry_id), public_event(event)
            if len(entries) < _PAGE:
                return
            start = "(" + entries[-1][0].decode()
            entries = await self._redis.xrange(keys.events, min=start, max=end, count=_PAGE)

    async def _trimmed_gap(
        self, keys: QueueKeys, after: tuple[int, int], after_event_id: str, oldest_id: str
    ) -> producer_service_pb2.WatchQueueGap | None:
        """A TRIMMED gap when events after ``after`` may have left Redis (``oldest_id``: the oldest it holds)."""
        if oldest_id:
            if after >= stream_id_key(oldest_id):
                return None
        else:
            try:
                info = await self._redis.xinfo_stream(keys.events)
            except aioredis.ResponseError as exc:
                if faults.is_transient(exc):
                    raise  # a fault (UNAVAILABLE to the caller), not "no such stream"
                info = None  # no stream at all: whatever came after `after` is gone
            if info is not None:
                last = info["last-generated-id"]
                last_id = last.decode() if isinstance(last, bytes) else str(last)
                if after >= stream_id_key(last_id):
                    return None  # nothing was ever added after it
        return producer_service_pb2.WatchQueueGap(
            reason=producer_service_pb2.WATCH_QUEUE_GAP_REASON_TRIMMED,
            after_event_id=after_event_id,
            before_event_id=oldest_id,
        )

    async def _release(self, tail: EventTail, queue: str) -> None:
        """Close ``tail`` once its last watcher left."""
        if tail.idle:
            if self._tails.get(queue) is tail:
                del self._tails[queue]
            await tail.close()
            if queue not in self._tails:  # no newer tail of the queue took the name meanwhile
                self._supervisor.loops.pop(tail.loop_name, None)

    def _tail(self, keys: QueueKeys) -> EventTail:
        tail = self._tails.get(keys.queue)
        if tail is None:
            tail = self._tails[keys.queue] = EventTail(self._tail_redis, keys, supervisor=self._supervisor)
        return tail

    async def _replay(
        self, keys: QueueKeys, ulid: str, job_id: str, record: Record, after: tuple[int, int], after_event_id: str
    ) -> AsyncIterator[tuple[tuple[int, int], event_pb2.JobEvent]]:
        """Events already recorded, oldest first: from PostgreSQL for any part Redis trimmed, then Redis."""
        first = stream_id_key(record.first_event_id)
        start_key = max(first, after) if after_event_id else first
        oldest = await self._redis.xrange(keys.events, count=1)
        oldest_key = stream_id_key(oldest[0][0]) if oldest else None
        if oldest_key is None or start_key < oldest_key:
            # Redis trimmed the start of this job's events; the results service kept them.
            async for event in self._history.events(job_id, after_event_id):
                key = stream_id_key(event.id)
                if oldest_key is not None and key >= oldest_key:
                    break
                after = key
                yield key, event
            start = f"({after[0]}-{after[1]}" if after > (0, 0) else "-"
        elif after_event_id:
            start = f"({after[0]}-{after[1]}"
        else:
            start = record.first_event_id
        while True:
            matches, next_id = await self._scripts.job_events(keys, ulid, start)
            for event_id, data in matches:
                yield stream_id_key(event_id), decode_event(event_id, data, job_id)
            if not next_id:
                return
            start = "(" + next_id
