"""Read-side scripts for operators: a queue's counts at one instant, and the live worker registry.

Workers register themselves (:class:`WorkerRegistry`, on the heartbeat thread's synchronous
client): one script call per heartbeat adds the id to the registry set and refreshes the
worker's entry with a TTL. A worker that stops cleanly deletes its entry; a dead one's entry
expires after the TTL, and the next listing forgets its id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from conveyor.common.keys import BANDS, WORKER_GROUP, WORKERS, QueueKeys, worker_key
from conveyor.common.redis import RedisClient
from conveyor.common.scripts import ReloadingScript, _source, _text


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """One queue's live counts, all read in one script (one instant)."""

    #: The Redis server's clock when they were read, in microseconds since the epoch.
    read_us: int
    paused: bool
    dead_lettered: int
    delayed: int
    retry_scheduled: int
    #: ms since the epoch when the earliest delayed/retry-scheduled job is due, if any.
    next_due_ms: int | None
    #: Stream id of the oldest entry waiting to be claimed ("" when none waits).
    oldest_queued_id: str
    #: Per priority band (1..9): (queued, active).
    bands: dict[int, tuple[int, int]]
    #: Consumer (worker id) -> claims it holds (active jobs), all bands.
    holders: dict[str, int]
    #: Waiting jobs held back by their rate key's limits (not in any band's stream meanwhile).
    held: int = 0
    #: Running jobs that started after being held (claimed from the admitted stream).
    admitted_active: int = 0

    @property
    def queued(self) -> int:
        return sum(q for q, _ in self.bands.values())

    @property
    def active(self) -> int:
        return sum(a for _, a in self.bands.values()) + self.admitted_active


class QueueStatsScript:
    """The queue_stats script on an async client."""

    def __init__(self, client: RedisClient) -> None:
        self._script = ReloadingScript(client, "queue_stats")

    async def read(self, keys: QueueKeys) -> QueueSnapshot:
        raw = await self._script(keys=keys.script_keys(), args=[WORKER_GROUP])
        return snapshot_of(raw)


def snapshot_of(raw: list[Any]) -> QueueSnapshot:
    """The queue_stats script's reply, parsed."""
    time_s, time_us, paused, dead, delayed, retry, next_due, oldest, held, admitted_active = raw[:10]
    counts = raw[10 : 10 + 2 * len(BANDS)]
    holders = raw[10 + 2 * len(BANDS) :]
    return QueueSnapshot(
        read_us=int(time_s) * 1_000_000 + int(time_us),
        paused=bool(int(paused)),
        dead_lettered=int(dead),
        delayed=int(delayed),
        retry_scheduled=int(retry),
        next_due_ms=int(float(_text(next_due))) if _text(next_due) else None,
        oldest_queued_id=_text(oldest),
        bands={band: (int(counts[2 * i]), int(counts[2 * i + 1])) for i, band in enumerate(BANDS)},
        holders={_text(holders[i]): int(holders[i + 1]) for i in range(0, len(holders), 2)},
        held=int(held),
        admitted_active=int(admitted_active),
    )


class WorkerRegistry:
    """A worker's own entry in the registry, on a synchronous client (the heartbeat thread's).

    Args:
        client: A synchronous redis-py client.
        worker_id: This worker's id.
    """

    def __init__(self, client: Any, worker_id: str) -> None:
        self._client = client
        self._worker_id = worker_id
        self._key = worker_key(worker_id)
        self._beat = client.register_script(_source("worker_beat"))  # sync: the heartbeat thread
        self._leave = client.register_script("redis.call('SREM', KEYS[1], ARGV[1]) return redis.call('DEL', KEYS[2])")

    def beat(self, info: bytes, ttl_ms: int) -> None:
        """Register or refresh this worker (one round trip)."""
        self._beat(keys=[WORKERS, self._key], args=[self._worker_id, info, ttl_ms])

    def deregister(self) -> None:
        """Leave the registry at once (a clean stop)."""
        # A script rather than MULTI, which redis-py does not offer on a Redis Cluster (same slot).
        self._leave(keys=[WORKERS, self._key], args=[self._worker_id])


class WorkerDirectory:
    """Reads the live workers' entries (ListWorkers), forgetting the dead ones."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._list = ReloadingScript(client, "list_workers")

    async def live(self) -> dict[str, bytes]:
        """Worker id -> WorkerInfo bytes of every live worker."""
        members: set[bytes] = await self._client.smembers(WORKERS)  # type: ignore[misc]  # redis-py's sync|async union
        ids = sorted(_text(m) for m in members)
        if not ids:
            return {}
        raw = await self._list(keys=[WORKERS, *(worker_key(i) for i in ids)], args=ids)
        return {_text(raw[i]): bytes(raw[i + 1]) for i in range(0, len(raw), 2)}
