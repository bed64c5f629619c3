"""Registry stamps written before ADR 0026 move to their new key when a service connects."""

from __future__ import annotations

import redis.asyncio

from conveyor.common.keys import LEGACY_QUEUES_TOUCHED, QUEUES_TOUCHED
from conveyor.common.queue_registry import QueueSweeper
from conveyor.common.redis import connect_redis, migrate_registry


async def test_old_touched_stamps_move_at_connect_keeping_the_newer(
    redis_client: redis.asyncio.Redis, redis_url: str
) -> None:
    await redis_client.zadd(LEGACY_QUEUES_TOUCHED, {"old": 100, "both": 500})
    await redis_client.zadd(QUEUES_TOUCHED, {"both": 300, "new": 900})
    client = await connect_redis(redis_url)
    try:
        assert not await redis_client.exists(LEGACY_QUEUES_TOUCHED)
        moved = dict(await redis_client.zrange(QUEUES_TOUCHED, 0, -1, withscores=True))
        assert moved == {b"old": 100.0, b"both": 500.0, b"new": 900.0}
        assert await migrate_registry(client) is False  # nothing left to move
    finally:
        await client.aclose()


async def test_forget_checks_the_registry_then_the_queue(redis_client: redis.asyncio.Redis, redis_url: str) -> None:
    client = await connect_redis(redis_url)
    try:
        sweeper = QueueSweeper(client, idle_s=60.0, registration_ttl_s=1.0)
        assert await sweeper.forget("nowhere") == (False, "not registered")
        await redis_client.sadd("conveyor:queues", "q")
        await redis_client.zadd(QUEUES_TOUCHED, {"q": 1})
        await redis_client.set("conveyor:{q}:paused", b"1")
        assert await sweeper.forget("q") == (False, "paused")
        await redis_client.delete("conveyor:{q}:paused")
        assert await sweeper.forget("q") == (True, "forgotten")
        assert not await redis_client.sismember("conveyor:queues", "q")
        assert await redis_client.zscore(QUEUES_TOUCHED, "q") is None
    finally:
        await client.aclose()
