"""Redis connections: checked at start-up, with timeouts that fail fast when Redis is down."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias, cast
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis as sync_redis
import redis.asyncio as aioredis
import redis.cluster as sync_cluster
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, ReadOnlyError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor.common import faults
from conveyor.common.keys import LEGACY_QUEUES_TOUCHED, QUEUES_TOUCHED

log = structlog.get_logger("conveyor.redis")

#: Exceptions that mean "Redis is not reachable right now" (UNAVAILABLE to clients).
#: Includes redis-py's BusyLoadingError (a ConnectionError): Redis is still loading its AOF.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)

#: Start-up retries while Redis cannot be reached: the first wait, and the longest one.
CONNECT_FIRST_DELAY_S = 0.1
CONNECT_MAX_DELAY_S = 5.0


#: An asyncio client of one Redis server, or of a Redis Cluster (``redis+cluster://`` URLs; ADR 0026).
RedisClient: TypeAlias = aioredis.Redis | RedisCluster
#: The synchronous counterpart (the worker's heartbeat thread, the producer's /metrics).
SyncRedisClient: TypeAlias = sync_redis.Redis | sync_cluster.RedisCluster

#: URL schemes that name a Redis Cluster: ``redis+cluster://[user:password@]host:port[,host:port...]``
#: (``rediss+cluster://`` for TLS). Any listed node is enough to discover the others; listing several
#: lets a service start while one of them is down.
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}


class RedisConfigError(RuntimeError):
    """Redis is configured in a way that can lose jobs."""


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (see CLUSTER_SCHEMES)."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_config(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The seed nodes of a cluster URL and the connection options it carries (user, password, TLS).

    Raises:
        RedisConfigError: The URL names no node, a node without a port, or a database other than 0
            (a Redis Cluster has only database 0).
    """
    scheme, _, rest = url.partition("://")
    tls = CLUSTER_SCHEMES[scheme.lower()]
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    options: dict[str, Any] = {}
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, sep, password = userinfo.partition(":")
        if sep:
            options["password"] = unquote(password)
            if user:
                options["username"] = unquote(user)
        elif user:
            options["password"] = unquote(user)
    if path not in ("", "0"):
        raise RedisConfigError(f"a Redis Cluster has only database 0; {redacted(url)} names database {path!r}")
    nodes: list[tuple[str, int]] = []
    for part in netloc.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise RedisConfigError(f"Redis Cluster URL {redacted(url)}: {part!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    if tls:
        options["ssl"] = True
    for name, value in parse_qsl(query):
        if name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"):
            options[name] = value
    return nodes, options


def _timeouts(blocking: bool) -> dict[str, Any]:
    return {
        "decode_responses": False,
        "socket_connect_timeout": 2.0,
        "socket_timeout": None if blocking else 5.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


#: Longest wait of a call for a free pooled connection (make_redis), in seconds.
POOL_WAIT_S = 5.0


def make_redis(url: str, *, blocking: bool = False, max_connections: int = 64) -> RedisClient:
    """A client for ``url`` returning bytes: one server, or a cluster for ``redis+cluster://`` URLs.

    Args:
        url: redis://, rediss://, unix:// URL, or redis+cluster://host:port[,host:port...].
        blocking: For clients that issue XREAD/XREADGROUP BLOCK: no read timeout.
        max_connections: Pool size (per node, for a cluster).
    """
    if is_cluster_url(url):
        nodes, options = cluster_config(url)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            max_connections=max_connections,
            # No transparent retries here either (see below): a command whose node died may have run.
            # MOVED and ASK replies are still followed (the command did not run there); a refused
            # connection or CLUSTERDOWN reaches the caller, which backs off, and the next command
            # re-reads the cluster's slots and finds the promoted replica.
            cluster_error_retry_attempts=0,
            require_full_coverage=False,
            **_timeouts(blocking),
            **options,
        )
        return cast(RedisCluster, cluster)
    # A blocking pool: a call that finds every connection busy waits up to POOL_WAIT_S for one
    # (backpressure) instead of failing at once with "Too many connections" (a burst of Watch
    # replays did that to callers, as UNAVAILABLE). Still busy after the wait: ConnectionError.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, **_timeouts(blocking)
    )
    # No transparent retries. A command whose connection broke may have run (Redis stopping right
    # after it, a cut network): sending a script such as enqueue or claim again would run it twice.
    # Callers see the error: RPCs answer UNAVAILABLE, loops back off and retry what is safe to
    # retry. (redis-py 5's asyncio client retries nothing unless given a Retry.) from_pool: the
    # client owns the pool, so aclose() closes its connections.
    return aioredis.Redis.from_pool(pool)


def register_script(client: RedisClient, source: str) -> AsyncScript:
    """``client.register_script``; redis-py types it for the one-server client only, but its
    scripts run on a cluster client too (EVALSHA goes to the slot of the script's first key)."""
    return cast(aioredis.Redis, client).register_script(source)


def make_sync_redis(url: str) -> SyncRedisClient:
    """A synchronous client for ``url`` (a cluster for ``redis+cluster://``), with a 5 s read timeout."""
    if is_cluster_url(url):
        nodes, options = cluster_config(url)
        return cast(
            sync_cluster.RedisCluster,
            sync_cluster.RedisCluster(
                startup_nodes=[
                    sync_cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
                    for host, port in nodes
                ],
                cluster_error_retry_attempts=0,
                require_full_coverage=False,
                socket_timeout=5,
                socket_connect_timeout=2,
                **options,
            ),
        )
    return sync_redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


def is_cluster(client: RedisClient | SyncRedisClient) -> bool:
    """Whether ``client`` talks to a Redis Cluster."""
    return isinstance(client, RedisCluster | sync_cluster.RedisCluster)


def by_slot(client: RedisClient | SyncRedisClient, keys: Iterable[str]) -> list[list[str]]:
    """``keys`` grouped so that each group can go into one command: per hash slot on a cluster
    (a command whose keys span slots is refused with CROSSSLOT), all together on one server.
    Groups keep the keys' order, and are in the order of their first key."""
    keys = list(keys)
    if not is_cluster(client):
        return [keys] if keys else []
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(key_slot(key.encode()), []).append(key)
    return list(groups.values())


#: Replies after which a cluster client re-reads the slot map before its next command.
_STALE_MAP = (
    MovedError,
    AskError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
)


async def on_slot_of(client: RedisClient, key: str, *args: Any) -> Any:
    """Run one command whose keys all share ``key``'s hash slot, straight on the node serving it.

    On one server this is ``execute_command``. On a cluster it skips redis-py's routing, which
    asks a node (COMMAND GETKEYS) for the keys of every XREAD and XREADGROUP, a round trip per
    read, and cannot route a command whose name is bytes (sent so, a reply is returned unparsed:
    see the results projector). A MOVED, ASK, CLUSTERDOWN, READONLY or connection error reaches
    the caller, a transient fault it backs off from, and the next command re-reads the slot map.
    """
    if not isinstance(client, RedisCluster):
        return await client.execute_command(*args)
    await client.initialize()
    node = client.get_node_from_key(key)
    if node is None:  # pragma: no cover - get_node_from_key raises SlotNotCoveredError instead
        raise ClusterDownError(f"no node serves the slot of {key}")  # type: ignore[no-untyped-call]
    try:
        return await node.execute_command(*args)
    except _STALE_MAP:
        await client.aclose()  # marks the slot map stale: the next command reads it again
        raise


class _Gathered:
    """A non-transactional pipeline's interface on a Redis Cluster: each command runs on its own, all at once.

    redis-py's ClusterPipeline would group them per node, but it never runs anything when the
    client has ``cluster_error_retry_attempts=0`` (which make_redis sets, see there).
    """

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def record(*args: Any, **kwargs: Any) -> _Gathered:
            self._calls.append((method, args, kwargs))
            return self

        return record

    async def execute(self) -> list[Any]:
        calls, self._calls = self._calls, []
        return list(await asyncio.gather(*(method(*args, **kwargs) for method, args, kwargs in calls)))

    async def __aenter__(self) -> _Gathered:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._calls = []


def pipeline(client: RedisClient) -> Any:
    """A non-transactional pipeline: redis-py's on one server, commands run at once on a cluster.

    Use as ``async with pipeline(client) as pipe: pipe.cmd(...); replies = await pipe.execute()``.
    """
    if isinstance(client, RedisCluster):
        return _Gathered(client)
    return client.pipeline(transaction=False)


async def xread(
    client: RedisClient, streams: Mapping[str, str | bytes], *, count: int, block: int | None = None
) -> list[Any]:
    """XREAD of streams sharing one hash slot, answered as redis-py's ``xread`` answers it.

    With no stream to read, it waits ``block`` ms (if given) and answers nothing.
    """
    if not streams:
        if block:
            await asyncio.sleep(block / 1000)
        return []
    args: list[Any] = ["XREAD", "COUNT", count]
    if block is not None:
        args += ["BLOCK", block]
    args += ["STREAMS", *streams.keys(), *streams.values()]
    reply = await on_slot_of(client, next(iter(streams)), *args)
    return list(reply or [])


async def _info(client: RedisClient) -> list[dict[str, Any]]:
    """INFO of the server, or of every primary of a cluster."""
    if isinstance(client, RedisCluster):
        replies = await client.info(target_nodes=RedisCluster.PRIMARIES)
        # One node answers INFO as a plain dict; several as node name -> dict.
        if replies and all(isinstance(v, dict) for v in replies.values()):
            return list(replies.values())
        return [replies]
    return [await client.info()]


async def check_server(client: RedisClient) -> dict[str, Any]:
    """Refuse a Redis that may evict keys (it would silently drop jobs); return its INFO.

    On a cluster every primary is checked, and the first one's INFO is returned.
    """
    infos = await _info(client)
    for info in infos:
        _check_info(info)
    return infos[0]


def _check_info(info: dict[str, Any]) -> None:
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        raise RedisConfigError(
            f"Redis maxmemory-policy is {policy!r}; Conveyor needs 'noeviction' so that jobs are never evicted"
        )
    version = tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:2])
    if version < (7, 0):
        raise RedisConfigError(f"Redis {info.get('redis_version')} is too old; Conveyor needs 7.0 or newer")


async def connect_redis(
    url: str,
    *,
    blocking: bool = False,
    wait: bool = False,
    max_delay_s: float = CONNECT_MAX_DELAY_S,
    max_connections: int = 64,
) -> RedisClient:
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
        try:
            await migrate_registry(client)
        except BaseException:
            await client.aclose()
            raise
        return client


#: Moves the registry's touched stamps from their pre-ADR-0026 key, keeping the newer of two stamps.
_MIGRATE_TOUCHED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MAX')
redis.call('DEL', KEYS[1])
return 1
"""


async def migrate_registry(client: RedisClient) -> bool:
    """Move keys.LEGACY_QUEUES_TOUCHED to keys.QUEUES_TOUCHED (data written before ADR 0026).

    Idempotent, and cheap when there is nothing to move (one EXISTS). On one server it is one
    atomic script. On a cluster the two keys live in different slots, so the stamps are copied
    (ZADD GT keeps the newer) and the old key deleted; no release before ADR 0026 could register
    queues on a cluster, so there is nothing there in practice. Returns whether anything moved.
    """
    if isinstance(client, RedisCluster):
        raw = await client.execute_command("ZRANGE", LEGACY_QUEUES_TOUCHED, 0, -1, "WITHSCORES")
        if not raw:
            return False
        pairs = [(raw[i + 1], raw[i]) for i in range(0, len(raw), 2)] if raw and not isinstance(raw[0], tuple) else []
        if raw and isinstance(raw[0], tuple):
            pairs = [(score, member) for member, score in raw]
        await client.execute_command("ZADD", QUEUES_TOUCHED, "GT", *(x for pair in pairs for x in pair))
        await client.execute_command("DEL", LEGACY_QUEUES_TOUCHED)
    else:
        if not await client.eval(_MIGRATE_TOUCHED, 2, LEGACY_QUEUES_TOUCHED, QUEUES_TOUCHED):  # type: ignore[misc]
            return False
    log.info("registry_migrated", moved=LEGACY_QUEUES_TOUCHED, to=QUEUES_TOUCHED)
    return True


def redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    if is_cluster_url(url):
        scheme, _, rest = url.partition("://")
        netloc, sep, tail = rest.partition("/")
        if "@" not in netloc:
            return url
        userinfo, hosts = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        return f"{scheme}://{user}:***@{hosts}{sep}{tail}"
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


# redis-py types its asyncio commands as "Awaitable[T] | T" (shared with the sync
# client), which strict mypy cannot await. These typed wrappers are for the few
# plain commands the services call directly.
async def hget(client: RedisClient, key: str, field: str) -> bytes | None:
    """HGET key field."""
    return cast(
        "bytes | None",
        await client.execute_command("HGET", key, field),
    )


async def sadd(client: RedisClient, key: str, *members: str) -> int:
    """SADD key member..."""
    return int(await client.execute_command("SADD", key, *members))


async def smembers(client: RedisClient, key: str) -> set[bytes]:
    """SMEMBERS key."""
    return set(await client.execute_command("SMEMBERS", key))
