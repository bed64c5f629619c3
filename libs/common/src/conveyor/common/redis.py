"""Redis connections: checked at start-up, with timeouts that fail fast when Redis is down."""

from __future__ import annotations

import asyncio
import random
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor.common import faults

log = structlog.get_logger("conveyor.redis")

#: Exceptions that mean "Redis is not reachable right now" (UNAVAILABLE to clients).
#: Includes redis-py's BusyLoadingError (a ConnectionError): Redis is still loading its AOF.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)

#: Start-up retries while Redis cannot be reached: the first wait, and the longest one.
CONNECT_FIRST_DELAY_S = 0.1
CONNECT_MAX_DELAY_S = 5.0


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
        # No transparent retries. A command whose connection broke may have run (Redis stopping
        # right after it, a cut network): sending a script such as enqueue or claim again would
        # run it twice. Callers see the error: RPCs answer UNAVAILABLE, loops back off and retry
        # what is safe to retry. (The sync redis.retry.Retry this used to pass never retried
        # anything on the asyncio client: its call_with_retry does not await.)
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


async def connect_redis(
    url: str,
    *,
    blocking: bool = False,
    wait: bool = False,
    max_delay_s: float = CONNECT_MAX_DELAY_S,
    max_connections: int = 64,
) -> aioredis.Redis:
    """A checked client for ``url`` (see make_redis and check_server).

    Args:
        url: redis:// URL.
        blocking: See make_redis.
        wait: While Redis cannot be reached (refused, timed out, still loading its AOF),
            log ``redis_unavailable_at_start`` and try again with capped exponential backoff
            (0.1 s doubling up to ``max_delay_s``, with jitter) instead of raising: a service
            started before Redis waits for it rather than exiting into a crash loop.
            A RedisConfigError (eviction policy, version) is never retried.
        max_delay_s: Longest wait between two tries when ``wait`` is set.
        max_connections: Pool size (see make_redis).

    Raises:
        RedisConfigError: Redis is reachable but configured in a way that can lose jobs.
        redis.exceptions.ConnectionError, TimeoutError, OSError: Redis cannot be reached
            and ``wait`` is not set.
    """
    client = make_redis(url, blocking=blocking, max_connections=max_connections)
    delay = CONNECT_FIRST_DELAY_S
    attempt = 0
    while True:
        attempt += 1
        try:
            await check_server(client)
        except Exception as exc:
            # Refused, timed out, and the replies that pass (LOADING, BUSY, READONLY...): faults.py.
            # A RedisConfigError is none of these: it is never retried.
            if not wait or not faults.is_transient(exc):
                await client.aclose()
                raise
            pause = min(delay, max_delay_s) * (0.5 + random.random() / 2)
            log.warning(
                "redis_unavailable_at_start",
                redis=redacted(url),
                attempt=attempt,
                retry_in_s=round(pause, 3),
                error=str(exc) or type(exc).__name__,
            )
            await asyncio.sleep(pause)
            delay = min(delay * 2, max_delay_s)
            continue
        except BaseException:
            await client.aclose()
            raise
        if attempt > 1:
            log.info("redis_connected", redis=redacted(url), attempts=attempt)
        return client


def redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


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
