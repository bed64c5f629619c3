"""A busy connection pool makes callers wait for a free connection, not fail (make_redis)."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.common import redis as conveyor_redis
from conveyor.common.redis import RedisClient, make_redis
from tests.support.wait import wait_for


async def _taken(client: RedisClient) -> None:
    """Until the pool's only connection is in use (redis-py keeps them in _in_use_connections)."""

    async def in_use() -> bool:
        return bool(client.connection_pool._in_use_connections)  # type: ignore[union-attr]

    await wait_for(in_use, "the busy call to take the connection", within=5, interval=0.001)


async def test_a_call_that_finds_every_connection_busy_waits_for_one(redis_url: str) -> None:
    client = make_redis(redis_url, max_connections=1)
    try:
        # The only connection is busy for 0.3 s; a second call used to fail at once with
        # "Too many connections" (UNAVAILABLE to a Watch caller). It now waits, then runs.
        busy = asyncio.create_task(client.blpop(["conveyor-test:pool-nothing"], timeout=0.3))
        await _taken(client)
        assert await client.ping() is True
        assert await busy is None
    finally:
        await client.aclose()


async def test_a_pool_busy_past_the_wait_answers_connection_error(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conveyor_redis, "POOL_WAIT_S", 0.05)
    client = make_redis(redis_url, max_connections=1)
    try:
        busy = asyncio.create_task(client.blpop(["conveyor-test:pool-nothing"], timeout=0.5))
        await _taken(client)
        with pytest.raises(conveyor_redis.aioredis.ConnectionError):
            await client.ping()
        await busy
    finally:
        await client.aclose()
