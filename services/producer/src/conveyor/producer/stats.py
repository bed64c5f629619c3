"""Statistics and introspection: queue counts (GetQueueStats, ListQueues) and live workers (ListWorkers).

The live counts of a queue come from one Redis script (one instant, so they agree with each
other); finished-job counts come from the results service, and its absence never fails the
call: the Redis part is returned with the reason the rest is missing.
"""

from __future__ import annotations

import structlog

from conveyor.common.errors import ConveyorError, NotFound
from conveyor.common.introspection import QueueSnapshot, QueueStatsScript, WorkerDirectory
from conveyor.common.keys import QUEUES, queue_keys
from conveyor.common.redis import RedisClient
from conveyor.common.scripts import LimitsSnapshot, Scripts
from conveyor.producer.dead_letters import queue_of
from conveyor.producer.history import History
from conveyor.producer.limits import describe
from conveyor.v1 import admin_service_pb2

log = structlog.get_logger("conveyor.producer.stats")


def _queue_stats(
    queue: str, snap: QueueSnapshot, live: dict[str, set[str]], limits: LimitsSnapshot
) -> admin_service_pb2.QueueStats:
    """The message for ``snap``; ``live`` maps each live worker id to the queues it serves."""
    stats = admin_service_pb2.QueueStats(
        held=snap.held,
        limits=describe(queue, limits),
        queue=queue,
        paused=snap.paused,
        queued=snap.queued,
        delayed=snap.delayed,
        retry_scheduled=snap.retry_scheduled,
        active=snap.active,
        dead_lettered=snap.dead_lettered,
        workers=sum(1 for queues in live.values() if queue in queues),
        orphaned=sum(n for consumer, n in snap.holders.items() if consumer not in live),
    )
    for band in sorted(snap.bands, reverse=True):
        queued, active = snap.bands[band]
        if queued or active:
            stats.bands.add(priority=band, queued=queued, active=active)
    if snap.oldest_queued_id:
        stats.oldest_queued_time.FromMilliseconds(int(snap.oldest_queued_id.partition("-")[0]))
    if snap.next_due_ms is not None:
        stats.next_due_time.FromMilliseconds(snap.next_due_ms)
    stats.read_time.FromMicroseconds(snap.read_us)
    return stats


class Stats:
    """Reads queue statistics and the worker registry.

    Args:
        redis: The producer's Redis client.
        history: The results service client (finished-job counts).
    """

    def __init__(self, redis: RedisClient, history: History) -> None:
        self._redis = redis
        self._history = history
        self._script = QueueStatsScript(redis)
        self._scripts = Scripts(redis)
        self._workers = WorkerDirectory(redis)

    async def _queues(self) -> set[str]:
        """Queues ever enqueued to (keys.QUEUES)."""
        members: set[bytes] = await self._redis.smembers(QUEUES)  # type: ignore[misc]  # redis-py's sync|async union
        return {m.decode() for m in members}

    async def workers(self, queue: str = "") -> list[admin_service_pb2.WorkerInfo]:
        """The live workers (serving ``queue``, if given), by worker id."""
        if queue:
            queue_of(queue)
        found = []
        for _, raw in sorted((await self._workers.live()).items()):
            info = admin_service_pb2.WorkerInfo.FromString(raw)
            if not queue or queue in info.queues:
                found.append(info)
        return found

    async def _live(self) -> dict[str, set[str]]:
        """Live worker id -> the queues it serves."""
        return {info.worker_id: set(info.queues) for info in await self.workers()}

    async def queue(self, queue: str) -> admin_service_pb2.GetQueueStatsResponse:
        """GetQueueStats: live counts of one queue, plus recent finished jobs when the results service answers.

        Raises:
            InvalidArgument: ``queue`` is not a valid queue name.
            NotFound: No job was ever enqueued to ``queue`` and no live worker serves it.
        """
        keys = queue_of(queue)
        used = await self._redis.sismember(QUEUES, queue)  # type: ignore[misc]  # redis-py's sync|async union
        snap = await self._script.read(keys)
        limits = await self._scripts.limits(keys)
        # The registry is read after the counts: a claim whose holder is still listed now was not orphaned then.
        live = await self._live()
        if not used and not any(queue in queues for queues in live.values()):
            raise NotFound(f"queue {queue!r} not found: nothing was ever enqueued to it and no worker serves it")
        response = admin_service_pb2.GetQueueStatsResponse(stats=_queue_stats(queue, snap, live, limits))
        try:
            response.finished.CopyFrom(await self._history.finished_stats(queue))
        except ConveyorError as exc:
            log.warning("finished_stats_unavailable", queue=queue, error=str(exc))
            response.finished_unavailable = str(exc)
        return response

    async def queues(self) -> list[admin_service_pb2.QueueStats]:
        """ListQueues: every known queue with its live counts (one instant per queue), by name.

        Known: ever enqueued to, or served by a live worker.
        """
        names = sorted((await self._queues()).union(*(await self._live()).values()))
        snaps = [await self._script.read(queue_keys(q)) for q in names]
        limits = [await self._scripts.limits(queue_keys(q)) for q in names]
        # Read again after the counts: a claim whose holder is still listed now was not orphaned then.
        live = await self._live()
        return [_queue_stats(q, snap, live, lim) for q, snap, lim in zip(names, snaps, limits, strict=True)]
