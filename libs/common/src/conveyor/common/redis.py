"""Redis connections: checked at start-up, with timeouts that fail fast when Redis is down."""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

#: Exceptions that mean "Redis is not reachable right now" (UNAVAILABLE to clients).
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisConfigError(RuntimeError):
    """Redis is configured in a way that can lose jobs."""


def make_redis(url: str, *, blocking: bool = False, max_connections: int = 64) -> aioredis.Redis:
    """A client for ``url`` returning bytes.

    Args:
        url: redis:// URL.
        blocking: For clients that issue XREAD/XREADGROUP BLOCK: no read timeout.
        max_connections: Pool size.
    """
    client = aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=2.0,
        socket_timeout=None if blocking else 5.0,
        socket_keepalive=True,
        health_check_interval=30,
        max_connections=max_connections,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return cast(aioredis.Redis, client)


async def check_server(client: aioredis.Redis) -> dict[str, Any]:
    """Refuse a Redis that may evict keys (it would silently drop jobs); return its INFO."""
    info: dict[str, Any] = await client.info()
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        raise RedisConfigError(
            f"Redis maxmemory-policy is {policy!r}; Conveyor needs 'noeviction' so that jobs are never evicted"
        )
    version = tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:2])
    if version < (7, 0):
        raise RedisConfigError(f"Redis {info.get('redis_version')} is too old; Conveyor needs 7.0 or newer")
    return info


async def connect_redis(url: str, *, blocking: bool = False) -> aioredis.Redis:
    """A checked client for ``url`` (see make_redis and check_server)."""
    client = make_redis(url, blocking=blocking)
    await check_server(client)
    return client


# redis-py types its asyncio commands as "Awaitable[T] | T" (shared with the sync
# client), which strict mypy cannot await. These typed wrappers are for the few
# plain commands the services call directly.
async def hget(client: aioredis.Redis, key: str, field: str) -> bytes | None:
    """HGET key field."""
    return cast(
        "bytes | None",
        await client.execute_command(  # type: ignore[no-untyped-call]
            "HGET", key, field
        ),
    )


async def sadd(client: aioredis.Redis, key: str, *members: str) -> int:
    """SADD key member..."""
    return int(
        await client.execute_command(  # type: ignore[no-untyped-call]
            "SADD", key, *members
        )
    )


async def smembers(client: aioredis.Redis, key: str) -> set[bytes]:
    """SMEMBERS key."""
    return set(
        await client.execute_command(  # type: ignore[no-untyped-call]
            "SMEMBERS", key
        )
    )
