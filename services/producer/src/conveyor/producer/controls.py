"""Queue controls: pause and resume."""

from __future__ import annotations

import redis.asyncio as aioredis

from conveyor.producer.dead_letters import queue_of


class QueueControls:
    """Pause and resume: a flag in Redis (it survives every restart) and a wake-up signal."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def pause(self, queue: str) -> bool:
        keys = queue_of(queue)
        return bool(await self._redis.set(keys.paused, b"1", nx=True))

    async def resume(self, queue: str) -> bool:
        keys = queue_of(queue)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.paused)
            # Blocked workers wait on the signal stream too: they claim at once, not after a poll.
            pipe.xadd(keys.signal, {"s": "resume"}, maxlen=16, approximate=True)
            deleted, _ = await pipe.execute()
        return bool(deleted)
