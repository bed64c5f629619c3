"""What an error from Redis means, in one table: retry or not, and what a client is told.

Every loop and every RPC asks this table (DESIGN.md invariant 8), so a reply such as OOM,
READONLY or BUSY is a fault like a dropped connection: retried inside the services with
backoff, reported to clients as UNAVAILABLE (Redis full: RESOURCE_EXHAUSTED) and never an
INTERNAL error, a dead loop or a stranded claim. PostgreSQL's table is in the results service,
the only code that talks to it. The README's error table is this table in words.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from redis import exceptions as rx

from conveyor.common.errors import ConveyorError, ResourceExhausted, Unavailable


@dataclass(frozen=True, slots=True)
class Fault:
    """One class of Redis error."""

    #: Short name for logs and metrics ("OOM", "READONLY", "CONNECTION", ...).
    name: str
    #: Status an RPC that met it ends with.
    code: grpc.StatusCode
    #: What a person should know, for the client's message.
    advice: str

    def error(self) -> ConveyorError:
        """The client-facing error for this fault."""
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(self.advice)
        return Unavailable(self.advice)


_U = grpc.StatusCode.UNAVAILABLE

CONNECTION = Fault("CONNECTION", _U, "Redis cannot be reached; retry shortly")
TIMEOUT = Fault("TIMEOUT", _U, "Redis did not answer in time; retry shortly")
LOADING = Fault("LOADING", _U, "Redis is loading its data after a restart; retry shortly")
OOM = Fault(
    "OOM",
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Redis is full (maxmemory reached; nothing was written): retry later; operators: "
    "let workers and the results service drain it, or raise maxmemory",
)
READONLY = Fault("READONLY", _U, "Redis is a read-only replica (a failover is in progress?); retry shortly")
UNBLOCKED = Fault("UNBLOCKED", _U, "Redis changed role (primary to replica?) during a blocking read; retry shortly")
BUSY = Fault("BUSY", _U, "Redis is busy running a long script; retry shortly")
MASTERDOWN = Fault("MASTERDOWN", _U, "the Redis replica lost its primary; retry shortly")
NOSCRIPT = Fault("NOSCRIPT", _U, "Redis lost its scripts (restart or SCRIPT FLUSH); retry")
MOVED = Fault("MOVED", _U, "the queue's Redis Cluster slot moved; retry")
ASK = Fault("ASK", _U, "the queue's Redis Cluster slot is migrating; retry")
TRYAGAIN = Fault("TRYAGAIN", _U, "the queue's Redis Cluster slot is migrating; retry shortly")
CLUSTERDOWN = Fault("CLUSTERDOWN", _U, "the Redis Cluster is down; retry shortly")
AUTH = Fault(
    "AUTH",
    _U,
    "Redis refused Conveyor's credentials or permissions (NOAUTH, WRONGPASS, NOPERM); "
    "operators: check the Redis URL and ACL",
)

#: Every class, in the README's order (tests walk it).
TABLE: tuple[Fault, ...] = (
    CONNECTION,
    TIMEOUT,
    LOADING,
    OOM,
    READONLY,
    UNBLOCKED,
    BUSY,
    MASTERDOWN,
    NOSCRIPT,
    MOVED,
    ASK,
    TRYAGAIN,
    CLUSTERDOWN,
    AUTH,
)

# Replies redis-py's parser leaves as a plain ResponseError, by their first word. (A reply from
# inside a script keeps its code: "BUSY ...", "OOM ... script: <sha>".)
_BY_PREFIX = {
    "BUSY": BUSY,
    "UNBLOCKED": UNBLOCKED,
    "MASTERDOWN": MASTERDOWN,
    "MOVED": MOVED,
    "ASK": ASK,
    "TRYAGAIN": TRYAGAIN,
    "CLUSTERDOWN": CLUSTERDOWN,
    "NOSCRIPT": NOSCRIPT,
    "OOM": OOM,
    "READONLY": READONLY,
    "LOADING": LOADING,
    "NOAUTH": AUTH,
    "WRONGPASS": AUTH,
    "NOPERM": AUTH,
}

# Most specific first: several of redis-py's classes derive from others.
_BY_TYPE: tuple[tuple[type[BaseException], Fault], ...] = (
    (rx.BusyLoadingError, LOADING),
    (rx.AuthenticationError, AUTH),
    (rx.AuthorizationError, AUTH),
    (rx.NoPermissionError, AUTH),
    (rx.MasterDownError, MASTERDOWN),
    (rx.ClusterDownError, CLUSTERDOWN),
    (rx.SlotNotCoveredError, CLUSTERDOWN),  # the client's slot map has no node for the slot (a failover)
    (rx.TryAgainError, TRYAGAIN),
    (rx.MovedError, MOVED),
    (rx.AskError, ASK),
    (rx.OutOfMemoryError, OOM),
    (rx.ReadOnlyError, READONLY),
    (rx.NoScriptError, NOSCRIPT),
    (rx.TimeoutError, TIMEOUT),
    (rx.ConnectionError, CONNECTION),
    (ConnectionError, CONNECTION),  # the builtin: refused, reset
    (OSError, CONNECTION),
)


def redis_fault(exc: BaseException) -> Fault | None:
    """The fault ``exc`` is, or None when it is not a Redis fault (a bug, bad data: not retried)."""
    for kind, fault in _BY_TYPE:
        if isinstance(kind, type) and isinstance(exc, kind):
            return fault
    if isinstance(exc, rx.ResponseError):
        return _BY_PREFIX.get(str(exc).split(" ", 1)[0])
    if isinstance(exc, rx.RedisClusterException) and "cannot be connected" in str(exc):
        return CONNECTION  # no seed node of a Redis Cluster answered
    if isinstance(exc, RuntimeError | AttributeError) and _raised_in_redis_connection(exc):
        # redis-py's cluster client closes every connection when one node fails; a command in
        # flight on another connection at that instant fails inside the connection code with
        # "handler is closed" or "'NoneType' object has no attribute ..." (ADR 0026).
        return CONNECTION
    return None


def _raised_in_redis_connection(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if filename.endswith(("/redis/asyncio/connection.py", "/redis/connection.py")):
            return True
        tb = tb.tb_next
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a Redis fault that passes: retry with backoff rather than fail."""
    return redis_fault(exc) is not None


def client_error(exc: BaseException) -> ConveyorError | None:
    """What an RPC that met ``exc`` tells its caller, or None when it is not a Redis fault."""
    fault = redis_fault(exc)
    return None if fault is None else fault.error()
