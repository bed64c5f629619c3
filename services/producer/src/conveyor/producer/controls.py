"""Queue controls: pause and resume."""

from __future__ import annotations

from conveyor.common.redis import RedisClient, register_script
from conveyor.producer.dead_letters import queue_of

#: Resume in one step (a script, so that it is atomic on a Redis Cluster too, where MULTI is not
#: offered by redis-py): drop the flag, and wake blocked workers through the signal stream.
_RESUME = """
local deleted = redis.call('DEL', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 16, '*', 's', 'resume')
return deleted
"""


class QueueControls:
    """Pause and resume: a flag in Redis (it survives every restart) and a wake-up signal."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._resume = register_script(redis, _RESUME)

    async def pause(self, queue: str) -> bool:
        keys = queue_of(queue)
        return bool(await self._redis.set(keys.paused, b"1", nx=True))

    async def resume(self, queue: str) -> bool:
        keys = queue_of(queue)
        # Blocked workers wait on the signal stream too: they claim at once, not after a poll.
        return bool(await self._resume(keys=[keys.paused, keys.signal]))
