"""Watch: replay a job's events, then follow them live.

One reader per queue's event stream per process (an EventTail) fans events out to
every local watcher of that queue: a thousand watchers cost one blocking read, not
a thousand. A watcher subscribes to the tail *before* it replays, and drops live
events whose id it has already sent, so there is neither a gap nor a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from conveyor.common.codec import FINAL_EVENTS, decode_event, public_event
from conveyor.common.errors import InvalidArgument, NotFound, ResourceExhausted
from conveyor.common.ids import parse_job_id, parse_stream_id, stream_id_key
from conveyor.common.keys import QueueKeys, queue_keys
from conveyor.common.redis import REDIS_UNAVAILABLE, hget
from conveyor.common.scripts import Record, Scripts
from conveyor.producer.history import History
from conveyor.v1 import event_pb2

log = structlog.get_logger("conveyor.producer.watch")

#: Events one watcher may have waiting before it is cut off (it can resume with after_event_id).
WATCHER_BUFFER = 10_000
_OVERFLOW = None


@dataclass(eq=False)
class Subscription:
    """One watcher's inbox on a tail."""

    ulid: str
    inbox: asyncio.Queue[tuple[tuple[int, int], event_pb2.JobEvent] | None] = field(
        default_factory=lambda: asyncio.Queue(WATCHER_BUFFER + 1)
    )
    overflowed: bool = False

    def offer(self, key: tuple[int, int], event: event_pb2.JobEvent) -> None:
        if self.overflowed:
            return
        if self.inbox.qsize() >= WATCHER_BUFFER:
            self.overflowed = True
            self.inbox.put_nowait(_OVERFLOW)
        else:
            self.inbox.put_nowait((key, event))


class EventTail:
    """Follows one queue's event stream and hands each event to its job's subscribers."""

    def __init__(self, client: aioredis.Redis, keys: QueueKeys, block_ms: int = 5000) -> None:
        self._client = client
        self._keys = keys
        self._block_ms = block_ms
        self._subs: dict[str, set[Subscription]] = {}
        self._last_id = "0-0"
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def idle(self) -> bool:
        return not self._subs

    async def subscribe(self, ulid: str) -> Subscription:
        """Subscribe to one job; returns once the tail's start position is fixed."""
        sub = Subscription(ulid)
        self._subs.setdefault(ulid, set()).add(sub)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"event-tail:{self._keys.queue}")
        await self._ready.wait()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.ulid)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.ulid]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _start_position(self) -> str:
        try:
            info = await self._client.xinfo_stream(self._keys.events)
        except aioredis.ResponseError:  # no stream yet: everything that comes is new
            return "0-0"
        last = info["last-generated-id"]
        return str(last.decode() if isinstance(last, bytes) else last)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                if not self._ready.is_set():
                    self._last_id = await self._start_position()
                    self._ready.set()
                replies = await self._client.xread({self._keys.events: self._last_id}, count=512, block=self._block_ms)
                backoff = 0.05
            except REDIS_UNAVAILABLE as exc:
                log.warning("event_tail_redis_unavailable", queue=self._keys.queue, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for _stream, entries in replies or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode()
                    ulid = fields[b"j"].decode()
                    subs = self._subs.get(ulid)
                    if subs:
                        event = decode_event(entry_id, fields[b"e"], f"{self._keys.queue}/{ulid}")
                        key = stream_id_key(entry_id)
                        for sub in list(subs):
                            sub.offer(key, event)


class Watcher:
    """Serves Watch for every queue.

    Args:
        redis: Client for ordinary commands.
        tail_redis: Client for blocking reads (no socket timeout).
        scripts: Scripts on ``redis``.
        history: Where events of jobs that left Redis are read from (the results service).
    """

    def __init__(self, redis: aioredis.Redis, tail_redis: aioredis.Redis, scripts: Scripts, history: History) -> None:
        self._redis = redis
        self._tail_redis = tail_redis
        self._scripts = scripts
        self._history = history
        self._tails: dict[str, EventTail] = {}

    async def close(self) -> None:
        for tail in self._tails.values():
            await tail.close()
        self._tails.clear()

    async def watch(self, job_id: str, after_event_id: str = "") -> AsyncIterator[event_pb2.JobEvent]:
        """Yield the job's events after ``after_event_id`` (all when empty) until its final event."""
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
                yield event
            if not found and not await self._history.exists(job_id):
                raise NotFound(f"job {job_id} not found")
            return
        record = Record.parse(raw)
        tail = self._tail(keys)
        sub = await tail.subscribe(ulid)
        try:
            last = after
            async for key, event in self._replay(keys, ulid, job_id, record, after, after_event_id):
                last = key
                yield public_event(event)
                if event.type in FINAL_EVENTS:
                    return
            while True:
                item = await sub.inbox.get()
                if item is _OVERFLOW:
                    raise ResourceExhausted(
                        f"watcher fell more than {WATCHER_BUFFER} events behind; "
                        f"resume with after_event_id={last[0]}-{last[1]}"
                    )
                key, event = item
                if key <= last:
                    continue
                last = key
                yield public_event(event)
                if event.type in FINAL_EVENTS:
                    return
        finally:
            tail.unsubscribe(sub)
            if tail.idle:
                self._tails.pop(queue, None)
                await tail.close()

    def _tail(self, keys: QueueKeys) -> EventTail:
        tail = self._tails.get(keys.queue)
        if tail is None:
            tail = self._tails[keys.queue] = EventTail(self._tail_redis, keys)
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
