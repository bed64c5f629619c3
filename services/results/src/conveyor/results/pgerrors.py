"""What an error from PostgreSQL means, in one table: set the row aside, or retry (DESIGN.md invariant 8).

PostgreSQL names every error by SQLSTATE: five characters whose first two are its class.
Only two classes are errors *of the row itself*, which no retry can fix: 22 (data exception:
invalid JSON, a NUL byte, a value out of range) and 23 (integrity constraint violation). The
projector sets such a row aside where an operator can see and replay it (projection_set_aside).
Every other error (the connection lost, a read-only database after a failover, privileges
revoked, a missing table, a lock not granted in time, an operator's shutdown, the disk full...)
says nothing about the row: the batch is retried with capped backoff and nothing is acked
before its commit. An RPC that meets one answers UNAVAILABLE (resources: RESOURCE_EXHAUSTED)
with the advice below, never INTERNAL. The README's error table is this table in words.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import psycopg
import psycopg_pool

from conveyor.common import supervise
from conveyor.common.errors import ConveyorError, ResourceExhausted, Unavailable


@dataclass(frozen=True, slots=True)
class PgFault:
    """One class of PostgreSQL error."""

    #: Short name for logs ("READ_ONLY", "PRIVILEGE", "DATA"...).
    name: str
    #: The SQLSTATE this row matches: a whole code ("42501"), a class ("08"), or "" (no SQLSTATE).
    sqlstate: str
    #: An error of the row itself: set it aside (never retried as it is).
    row: bool
    #: Status an RPC that met it ends with.
    code: grpc.StatusCode
    #: What a person should know, for logs and the client's message.
    advice: str

    def error(self) -> ConveyorError:
        """The client-facing error for this fault."""
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(self.advice)
        return Unavailable(self.advice)


_U = grpc.StatusCode.UNAVAILABLE
_RETRY = "; retried with backoff, nothing acked before its commit"

CONNECTION = PgFault("CONNECTION", "", False, _U, "PostgreSQL cannot be reached" + _RETRY)
PRIVILEGE = PgFault(
    "PRIVILEGE", "42501", False, _U, "PostgreSQL refused a privilege (GRANT it to Conveyor's role)" + _RETRY
)
UNDEFINED_TABLE = PgFault(
    "UNDEFINED_TABLE", "42P01", False, _U, "a table of the results schema is missing (migrations?)" + _RETRY
)
LOCK_TIMEOUT = PgFault(
    "LOCK_TIMEOUT",
    "55P03",
    False,
    _U,
    "a lock was not granted within CONVEYOR_DB_LOCK_TIMEOUT_SECONDS (a table locked by someone else)" + _RETRY,
)
STATEMENT_CANCELLED = PgFault("CANCELLED", "57014", False, _U, "a statement was cancelled" + _RETRY)
DATA = PgFault("DATA", "22", True, grpc.StatusCode.INVALID_ARGUMENT, "PostgreSQL refused a value of the row (class 22)")
INTEGRITY = PgFault(
    "INTEGRITY", "23", True, grpc.StatusCode.INVALID_ARGUMENT, "the row violates a constraint (class 23)"
)
CONNECTION_EXCEPTION = PgFault("CONNECTION", "08", False, _U, "the connection to PostgreSQL failed" + _RETRY)
READ_ONLY = PgFault(
    "READ_ONLY", "25", False, _U, "PostgreSQL is read-only (a failover or default_transaction_read_only?)" + _RETRY
)
ROLLBACK = PgFault("ROLLBACK", "40", False, _U, "the transaction was rolled back (serialization, deadlock)" + _RETRY)
SCHEMA = PgFault("SCHEMA", "42", False, _U, "PostgreSQL refused the statement (schema or privileges)" + _RETRY)
RESOURCES = PgFault(
    "RESOURCES",
    "53",
    False,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    "PostgreSQL is out of resources (disk full, memory, too many connections)" + _RETRY,
)
OBJECT_STATE = PgFault("OBJECT_STATE", "55", False, _U, "an object is not in the required state" + _RETRY)
OPERATOR = PgFault(
    "OPERATOR", "57", False, _U, "PostgreSQL is shutting down or was told to stop (operator intervention)" + _RETRY
)
SYSTEM = PgFault("SYSTEM", "58", False, _U, "PostgreSQL met a system error (I/O)" + _RETRY)
OTHER = PgFault("OTHER", "*", False, _U, "PostgreSQL refused the write" + _RETRY)

#: Every row, most specific first (whole codes, then classes, then the rest); the README's order.
TABLE: tuple[PgFault, ...] = (
    CONNECTION,
    PRIVILEGE,
    UNDEFINED_TABLE,
    LOCK_TIMEOUT,
    STATEMENT_CANCELLED,
    DATA,
    INTEGRITY,
    CONNECTION_EXCEPTION,
    READ_ONLY,
    ROLLBACK,
    SCHEMA,
    RESOURCES,
    OBJECT_STATE,
    OPERATOR,
    SYSTEM,
    OTHER,
)

_BY_CODE = {f.sqlstate: f for f in TABLE if len(f.sqlstate) == 5}
_BY_CLASS = {f.sqlstate: f for f in TABLE if len(f.sqlstate) == 2}


def pg_fault(exc: BaseException) -> PgFault | None:
    """The fault ``exc`` is, or None when it is not a PostgreSQL error (a bug: not retried here)."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return CONNECTION
    if not isinstance(exc, psycopg.Error):
        return None
    sqlstate = exc.sqlstate or ""
    if not sqlstate:
        # No SQLSTATE: the client side failed (connection lost, server closed it, cannot connect).
        return CONNECTION
    return _BY_CODE.get(sqlstate) or _BY_CLASS.get(sqlstate[:2]) or OTHER


def is_row_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error of the row itself (SQLSTATE class 22 or 23): set it aside."""
    fault = pg_fault(exc)
    return fault is not None and fault.row


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a PostgreSQL fault that passes: retry with backoff."""
    fault = pg_fault(exc)
    return fault is not None and not fault.row


def client_error(exc: BaseException) -> ConveyorError | None:
    """What an RPC that met ``exc`` tells its caller, or None when it is not a retryable PostgreSQL fault."""
    fault = pg_fault(exc)
    if fault is None or fault.row:
        return None
    return fault.error()


def describe(exc: BaseException) -> tuple[str, str]:
    """(SQLSTATE or "", message) of ``exc`` for logs and the set-aside table."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate, (str(exc).strip() or type(exc).__name__)


_registered = False


def register() -> None:
    """Make the Supervisor treat PostgreSQL's passing faults as faults, not crashes (once per process)."""
    global _registered
    if not _registered:
        supervise.register_transient(is_transient)
        _registered = True
