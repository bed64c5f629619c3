"""The Lua scripts (lua/*.lua) and typed calls to them.

Every multi-step change of queue state happens in one of these scripts, so two
workers or producers can never interleave half-done changes (DESIGN.md).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from conveyor.common.keys import RESULTS_GROUP, WORKER_GROUP, QueueKeys
from conveyor.common.redis import RedisClient, register_script

_INCLUDE = re.compile(r"^--#include (\w+)\n", re.MULTILINE)


def _source(name: str) -> str:
    """A script's source, with the shared parts it asks for spliced in (records.lua, prelude.lua).

    A part is spliced in once, where it is first asked for (prelude.lua includes records.lua).
    """
    lua = resources.files("conveyor.common") / "lua"
    seen: set[str] = set()

    def splice(match: re.Match[str]) -> str:
        part = match.group(1)
        if part in seen:
            return ""
        seen.add(part)
        return _INCLUDE.sub(splice, (lua / f"{part}.lua").read_text())

    return _INCLUDE.sub(splice, (lua / f"{name}.lua").read_text())


#: How often one call loads and runs a script whose cache Redis emptied (SCRIPT FLUSH, a failover
#: to a replica that never saw it). NOSCRIPT means the script did not run, so running it again is
#: safe; redis-py reloads once, and a flush landing between that load and the run would otherwise
#: reach the caller.
NOSCRIPT_TRIES = 3


class ReloadingScript:
    """A script registered on an asyncio client that survives its cache being flushed."""

    __slots__ = ("_script",)

    def __init__(self, client: RedisClient, name: str) -> None:
        self._script = register_script(client, _source(name))

    @property
    def sha(self) -> str:
        """The script's SHA1, as EVALSHA sends it."""
        return str(self._script.sha)

    async def __call__(self, keys: Any = None, args: Any = None) -> Any:
        for _ in range(NOSCRIPT_TRIES - 1):
            try:
                return await self._script(keys=keys, args=args)
            except NoScriptError:
                continue
        return await self._script(keys=keys, args=args)


#: Record.entry_id of a job held back by its rate key's limits (its job bytes are parked).
HELD = "h"
#: RetryDeadLetters / PurgeDeadLetters with all=true handle at most this many per call (then more=true).
DEAD_LETTERS_PER_CALL = 1000


@dataclass(frozen=True, slots=True)
class Record:
    """A job's live record in the queue's state hash.

    Stored as ``state|attempt|priority|entry|first_event|final_event[|consumer]``; the
    consumer is there while the job is ACTIVE (with the attempt, it fences completions).
    ``first_event`` may be stored as a bare sequence number, meaning the entry id's millisecond
    (ADR 0031, as the prelude's read_record reads it); ``first_event_id`` is always the full id.
    """

    state: int
    attempt: int
    priority: int
    entry_id: str
    first_event_id: str
    final_event_id: str
    consumer: str = ""

    @classmethod
    def parse(cls, raw: bytes | str) -> Record:
        text = raw.decode() if isinstance(raw, bytes) else raw
        state, attempt, priority, entry_id, first, final, *owner = text.split("|", 6)
        if first and "-" not in first:
            ms, dash, _ = entry_id.partition("-")
            # No entry id to count from (an older version rewrote the record): "0-<seq>" sorts
            # before every real event, so a replay from it misses nothing.
            first = f"{ms}-{first}" if dash else f"0-{first}"
        return cls(int(state), int(attempt), int(priority), entry_id, first, final, owner[0] if owner else "")


@dataclass(slots=True)  # made once per job on the enqueue path: not frozen (see Claimed below)
class NewJob:
    """One job for the enqueue script."""

    ulid: str
    priority: int
    job: bytes
    queued_event: bytes
    idempotency_key: str = ""
    idempotency_window_ms: int = 0
    #: When the job becomes due, ms since the epoch; 0 = now.
    due_ms: int = 0
    #: Flow-control key (per-key rate limits and concurrency caps); "" = none.
    rate_key: str = ""


@dataclass(slots=True)  # one per job on the enqueue path: not frozen (see Claimed below)
class EnqueueResult:
    ulid: str
    created: bool
    state: int


# Claimed and Outcome are made once per job on the worker's hot path: not frozen, as a frozen
# dataclass's __init__ sets each field through object.__setattr__ (about three times the cost).
@dataclass(slots=True)
class Claimed:
    """A job a worker claimed (treat as read-only)."""

    band: int
    entry_id: str
    ulid: str
    attempt: int
    job: bytes
    active_event_id: str


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What a claim returned."""

    claimed: list[Claimed]
    #: When nothing was claimed: stream key -> last id, to block on for anything newer.
    wait_from: dict[str, str]
    #: When nothing was claimed: ms when the earliest delayed job is due, if any.
    next_due_ms: int | None


@dataclass(slots=True)
class Outcome:
    """A final outcome for the complete script (treat as read-only)."""

    band: int
    entry_id: str
    ulid: str
    attempt: int
    state: int
    event: bytes
    #: For RETRY_SCHEDULED: when the next attempt is due, ms since the epoch.
    due_ms: int = 0
    #: The job's rate key ("" = none): its concurrency slot is given back.
    rate_key: str = ""


@dataclass(frozen=True, slots=True)
class LimitsSnapshot:
    """A queue's flow-control settings and what they hold back, read in one step."""

    #: The limits hash: rate, conc, key_rate, key_conc, rate:<key>, conc:<key>.
    settings: dict[str, str]
    #: Back-offs in force: "" (the whole queue) or a rate key -> end, ms since the epoch.
    backoffs: dict[str, int]
    #: Keys held back now: (key, until ms, jobs held).
    blocked: list[tuple[str, int, int]]
    #: Jobs running now across all workers.
    running: int


# Hot-path scripts take their per-job values packed into one argument (see the .lua headers):
# redis-py encodes each argument separately, which cost more than the work itself.
_JOB_HEAD = struct.Struct(">26sBHddI")
_LEN = struct.Struct(">I")
_KEY_LEN = struct.Struct(">B")
_OUTCOME_HEAD = struct.Struct(">BH")
_OUTCOME_MID = struct.Struct(">26sIBdI")
_BEAT_TAIL = struct.Struct(">26sI")


def _claimed(raw: list[Any]) -> list[Claimed]:
    return [
        Claimed(
            band=int(raw[i]),
            entry_id=_text(raw[i + 1]),
            ulid=_text(raw[i + 2]),
            attempt=int(raw[i + 3]),
            job=raw[i + 4],
            active_event_id=_text(raw[i + 5]),
        )
        for i in range(0, len(raw), 6)
    ]


class Heartbeat:
    """The heartbeat script on a synchronous client, for the worker's heartbeat thread.

    A thread with its own connection keeps claims alive even while a CPU-bound handler
    holds the event loop (invariant 4).
    """

    def __init__(self, client: Any) -> None:
        #: The synchronous client (the worker registry beats on it too).
        self.client = client
        self._script = client.register_script(_source("heartbeat"))

    def beat(self, keys: QueueKeys, consumer: str, claims: list[Claimed]) -> list[bool | str]:
        """Reset the idle time of each claim still held.

        Returns:
            Per claim: True (held), False (lost to another worker) or, when CancelJob asked
            the running attempt to stop, the reason.
        """
        parts: list[bytes] = []
        for c in claims:
            entry_id = c.entry_id.encode()
            parts += [_OUTCOME_HEAD.pack(c.band, len(entry_id)), entry_id, _BEAT_TAIL.pack(c.ulid.encode(), c.attempt)]
        raw = self._script(keys=keys.script_keys(), args=[WORKER_GROUP, consumer, len(claims), b"".join(parts)])
        return [_text(r) if isinstance(r, bytes) else bool(r) for r in raw]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Scripts:
    """The registered scripts of one Redis client."""

    def __init__(self, client: RedisClient) -> None:
        self._enqueue = ReloadingScript(client, "enqueue")
        self._claim = ReloadingScript(client, "claim")
        self._complete = ReloadingScript(client, "complete")
        self._progress = ReloadingScript(client, "progress")
        self._job_events = ReloadingScript(client, "job_events")
        self._trim_events = ReloadingScript(client, "trim_events")
        self._expire_records = ReloadingScript(client, "expire_records")
        self._projected = ReloadingScript(client, "projected")
        self._reclaim = ReloadingScript(client, "reclaim")
        self._recover = ReloadingScript(client, "recover")
        self._cancel = ReloadingScript(client, "cancel")
        self._retry_dead = ReloadingScript(client, "retry_dead")
        self._purge_dead = ReloadingScript(client, "purge_dead")
        self._limits = ReloadingScript(client, "limits")

    async def enqueue(self, keys: QueueKeys, jobs: list[NewJob]) -> list[EnqueueResult]:
        """Add ``jobs`` to one queue atomically; known idempotency keys return their job."""
        idem_keys: list[str] = []
        idem_index: dict[str, int] = {}
        parts: list[bytes] = []
        for job in jobs:
            index = 0
            if job.idempotency_key:
                index = idem_index.get(job.idempotency_key, 0)
                if not index:
                    idem_keys.append(keys.idempotency(job.idempotency_key))
                    index = idem_index[job.idempotency_key] = len(idem_keys)
            parts += [
                _JOB_HEAD.pack(
                    job.ulid.encode(),
                    job.priority,
                    index,
                    float(job.idempotency_window_ms),
                    float(job.due_ms),
                    len(job.job),
                ),
                job.job,
                _LEN.pack(len(job.queued_event)),
                job.queued_event,
                _KEY_LEN.pack(len(rate_key := job.rate_key.encode())),
                rate_key,
            ]
        raw = await self._enqueue(keys=[*keys.script_keys(), *idem_keys], args=[len(jobs), b"".join(parts)])
        triples = iter(raw)
        return [EnqueueResult(_text(u), bool(c), int(st)) for u, c, st in zip(triples, triples, triples, strict=True)]

    async def claim(self, keys: QueueKeys, consumer: str, count: int) -> ClaimResult:
        """Promote due delayed jobs, then claim up to ``count`` jobs, highest band first."""
        claimed_raw, wait_raw, next_due = await self._claim(
            keys=keys.script_keys(), args=[WORKER_GROUP, consumer, count]
        )
        claimed = _claimed(claimed_raw)
        wait_from = {
            key: last
            for key, raw in zip([*keys.bands, keys.signal], wait_raw, strict=False)
            if (last := _text(raw))  # "" = not worth waiting on (the whole queue may start nothing now)
        }
        return ClaimResult(claimed, wait_from, int(float(next_due)) if next_due else None)

    async def complete(
        self, keys: QueueKeys, consumer: str, retention_ms: int, outcomes: list[Outcome]
    ) -> list[str | None]:
        """Ack and record outcomes; None for each outcome refused because the claim moved on."""
        parts: list[bytes] = []
        for o in outcomes:
            entry_id = o.entry_id.encode()
            parts += [
                _OUTCOME_HEAD.pack(o.band, len(entry_id)),
                entry_id,
                _OUTCOME_MID.pack(o.ulid.encode(), o.attempt, o.state, float(o.due_ms), len(o.event)),
                o.event,
                _KEY_LEN.pack(len(rate_key := o.rate_key.encode())),
                rate_key,
            ]
        raw = await self._complete(
            keys=keys.script_keys(), args=[WORKER_GROUP, consumer, retention_ms, len(outcomes), b"".join(parts)]
        )
        return [None if r == 0 else _text(r) for r in raw]

    async def progress(self, keys: QueueKeys, consumer: str, ulid: str, attempt: int, event: bytes) -> str | None:
        """Append a PROGRESS event; None when this consumer no longer holds the job's claim."""
        raw = await self._progress(keys=[keys.events, keys.state], args=[consumer, ulid, attempt, event])
        return None if raw == 0 else _text(raw)

    async def job_events(
        self, keys: QueueKeys, ulid: str, start: str, scan: int = 2000
    ) -> tuple[list[tuple[str, bytes]], str]:
        """One job's events in [start, ...) of the event stream, scanning at most ``scan`` entries.

        ``start`` is an inclusive id, or ``"(" + id`` for exclusive. Returns the matches
        and the id to continue after ("" at the end of the stream).
        """
        matches, next_id = await self._job_events(keys=[keys.events], args=[ulid, start, scan])
        pairs = [(_text(matches[i]), matches[i + 1]) for i in range(0, len(matches), 2)]
        return pairs, _text(next_id)

    async def reclaim(
        self, keys: QueueKeys, consumer: str, min_idle_ms: int, count: int, max_deliveries: int, retention_ms: int
    ) -> tuple[list[Claimed], list[str]]:
        """Take over up to ``count`` jobs idle longer than ``min_idle_ms``; dead-letter poison ones.

        Returns:
            The jobs now claimed by ``consumer``, and the ulids that went to the dead letters.
        """
        claimed_raw, dead = await self._reclaim(
            keys=keys.script_keys(), args=[WORKER_GROUP, consumer, min_idle_ms, count, max_deliveries, retention_ms]
        )
        return _claimed(claimed_raw), [_text(u) for u in dead]

    async def recover(self, keys: QueueKeys, consumer: str, most: int = 1000) -> list[Claimed]:
        """This consumer's own ACTIVE jobs in its pending list (a lost claim reply, a restart under the same id)."""
        return _claimed(await self._recover(keys=keys.script_keys(), args=[WORKER_GROUP, consumer, most]))

    async def cancel(self, keys: QueueKeys, ulid: str, event: bytes, retention_ms: int, reason: str) -> tuple[int, int]:
        """Cancel one job: (1 cancelled now | 2 running attempt signalled | 0 already final | -1 unknown, state)."""
        outcome, state = await self._cancel(keys=keys.script_keys(), args=[ulid, event, retention_ms, reason])
        return int(outcome), int(state)

    async def retry_dead(
        self, keys: QueueKeys, ulid: str = "", most: int = DEAD_LETTERS_PER_CALL
    ) -> tuple[list[str], bool]:
        """Queue dead letters again: one ulid (found through the index), or up to ``most`` of the oldest when empty.

        Returns the ulids queued and whether dead letters are left (only for "all").
        """
        retried, more = await self._retry_dead(keys=keys.script_keys(), args=[ulid, most])
        return [_text(u) for u in retried], bool(more)

    async def purge_dead(self, keys: QueueKeys, ulid: str = "", most: int = DEAD_LETTERS_PER_CALL) -> tuple[int, bool]:
        """Delete dead letters: one ulid (found through the index), or up to ``most`` of the oldest when empty.

        Returns how many were deleted and whether dead letters are left (only for "all").
        """
        purged, more = await self._purge_dead(keys=[keys.dead, keys.dead_index], args=[ulid, most])
        return int(purged), bool(more)

    async def set_limit(self, keys: QueueKeys, field: str, value: str) -> None:
        """Set one flow-control setting (see lua/limits.lua for the fields and formats)."""
        await self._limits(keys=keys.script_keys(), args=["set", field, value])

    async def clear_limit(self, keys: QueueKeys, field: str) -> bool:
        """Remove one flow-control setting; False when it was not set."""
        return bool(await self._limits(keys=keys.script_keys(), args=["clear", field]))

    async def back_off(self, keys: QueueKeys, rate_key: str, duration_ms: int) -> int:
        """Hold back starts of the queue (``rate_key`` "") or of one key; returns the end in force (ms)."""
        return int(await self._limits(keys=keys.script_keys(), args=["backoff", rate_key, duration_ms]))

    async def clear_back_off(self, keys: QueueKeys, rate_key: str) -> bool:
        """End the back-off of the queue (``rate_key`` "") or of one key now; False when none was in force."""
        return bool(await self._limits(keys=keys.script_keys(), args=["clearbackoff", rate_key]))

    async def limits(self, keys: QueueKeys) -> LimitsSnapshot:
        """The queue's limits, back-offs, held-back keys and running jobs, at one instant."""
        settings, backoffs, blocked, running = await self._limits(keys=keys.script_keys(), args=["get"])
        return LimitsSnapshot(
            settings={_text(settings[i]): _text(settings[i + 1]) for i in range(0, len(settings), 2)},
            backoffs={_text(backoffs[i]): int(backoffs[i + 1]) for i in range(0, len(backoffs), 2)},
            blocked=[(_text(blocked[i]), int(blocked[i + 1]), int(blocked[i + 2])) for i in range(0, len(blocked), 3)],
            running=int(running),
        )

    async def expire_records(self, keys: QueueKeys, limit: int = 1000) -> int:
        """Drop up to ``limit`` live records whose retention has passed; returns how many."""
        return int(await self._expire_records(keys=[keys.state, keys.done], args=[limit]))

    async def projected(
        self, keys: QueueKeys, jobs: list[tuple[str, str]], retention_ms: int, acks: Sequence[bytes] = ()
    ) -> int:
        """Events committed to PostgreSQL: the finished jobs' live records expire ``retention_ms`` from
        now, then ``acks`` are acknowledged in group ``results``, in one step (ADR 0030).

        Args:
            jobs: (ulid, id of the job's last event committed) pairs; a job whose record holds a
                newer outcome than that event keeps its record until that outcome is projected.
            acks: Ids of entries of the queue's event stream to acknowledge.

        Returns:
            How many records' expiry was set.
        """
        if not jobs and not acks:
            return 0
        # One argument per list, not one per element: redis-py packs arguments one by one in
        # Python, which for a batch's thousand ids cost more than folding the batch (ADR 0030).
        pairs = " ".join(f"{ulid} {event_id}" for ulid, event_id in jobs)
        args: list[str | int | bytes] = [retention_ms, pairs]
        if acks:
            args += [RESULTS_GROUP, b" ".join(acks)]
        return int(await self._projected(keys=[keys.state, keys.events, keys.done], args=args))

    async def trim_events(self, keys: QueueKeys, cutoff_ms: int) -> int:
        """Trim events older than ``cutoff_ms`` that the results service has acknowledged."""
        return int(await self._trim_events(keys=[keys.events], args=[RESULTS_GROUP, f"{cutoff_ms}-0"]))
