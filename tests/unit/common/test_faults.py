"""The Redis error table: every class of reply maps to retry and the status the README promises.

The exceptions are made by redis-py's own reply parser from the reply text Redis sends, so a
change in how redis-py names them would fail here rather than in production.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from redis import exceptions as rx
from redis._parsers.base import BaseParser

from conveyor.common import faults
from conveyor.common.errors import Internal, InvalidArgument

REPLIES = [
    ("OOM command not allowed when used memory > 'maxmemory'.", "OOM", grpc.StatusCode.RESOURCE_EXHAUSTED),
    (
        "OOM command not allowed when used memory > 'maxmemory'. script: 6dee2053, on @user_script:1.",
        "OOM",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    ("READONLY You can't write against a read only replica.", "READONLY", grpc.StatusCode.UNAVAILABLE),
    ("LOADING Redis is loading the dataset in memory", "LOADING", grpc.StatusCode.UNAVAILABLE),
    (
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "BUSY",
        grpc.StatusCode.UNAVAILABLE,
    ),
    (
        "UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)",
        "UNBLOCKED",
        grpc.StatusCode.UNAVAILABLE,
    ),
    ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", "MASTERDOWN", None),
    ("NOSCRIPT No matching script. Please use EVAL.", "NOSCRIPT", grpc.StatusCode.UNAVAILABLE),
    ("MOVED 3999 127.0.0.1:6381", "MOVED", grpc.StatusCode.UNAVAILABLE),
    ("ASK 3999 127.0.0.1:6381", "ASK", grpc.StatusCode.UNAVAILABLE),
    ("TRYAGAIN Multiple keys request during rehashing of slot", "TRYAGAIN", grpc.StatusCode.UNAVAILABLE),
    ("CLUSTERDOWN The cluster is down", "CLUSTERDOWN", grpc.StatusCode.UNAVAILABLE),
    ("NOPERM this user has no permissions to run the 'xadd' command", "AUTH", grpc.StatusCode.UNAVAILABLE),
    ("NOAUTH Authentication required.", "AUTH", grpc.StatusCode.UNAVAILABLE),
]


@pytest.mark.parametrize(("reply", "name", "code"), REPLIES, ids=[r[1] + str(i) for i, r in enumerate(REPLIES)])
def test_each_reply_is_classified(reply: str, name: str, code: grpc.StatusCode | None) -> None:
    exc = BaseParser.parse_error(reply)
    fault = faults.redis_fault(exc)
    assert fault is not None, f"{reply!r} ({type(exc).__name__}) is not classified"
    assert fault.name == name
    assert faults.is_transient(exc)
    err = faults.client_error(exc)
    assert err is not None
    assert err.code == (code or grpc.StatusCode.UNAVAILABLE)
    assert err.message == fault.advice


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (rx.ConnectionError("Connection closed by server."), "CONNECTION"),
        (rx.TimeoutError("Timeout reading from socket"), "TIMEOUT"),
        (ConnectionRefusedError(111, "Connection refused"), "CONNECTION"),
        (rx.BusyLoadingError("Redis is loading the dataset in memory"), "LOADING"),
        (rx.ClusterDownError("The cluster is down"), "CLUSTERDOWN"),
    ],
)
def test_connection_level_errors(exc: BaseException, name: str) -> None:
    fault = faults.redis_fault(exc)
    assert fault is not None and fault.name == name


@pytest.mark.parametrize(
    "exc",
    [
        BaseParser.parse_error("WRONGTYPE Operation against a key holding the wrong kind of value"),
        BaseParser.parse_error("ERR Error running script (call to f_1234): @user_script:12: bad argument"),
        ValueError("a bug"),
        KeyError("x"),
    ],
)
def test_bugs_are_not_faults(exc: BaseException) -> None:
    """A bug or bad data is not retried forever: it is INTERNAL (the interceptor's default)."""
    assert faults.redis_fault(exc) is None
    assert not faults.is_transient(exc)
    assert faults.client_error(exc) is None


def test_the_table_names_every_class_once() -> None:
    names = [f.name for f in faults.TABLE]
    assert len(names) == len(set(names))
    assert {"CONNECTION", "OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOSCRIPT"} <= set(names)
    assert {"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"} <= set(names)
    for fault in faults.TABLE:
        assert not isinstance(fault.error(), (Internal, InvalidArgument))


def test_the_readme_table_has_a_row_per_class_with_its_status() -> None:
    """The README's "When Redis refuses work" table is this table in words: same classes, same codes."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("#### When Redis refuses work", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    for fault in faults.TABLE:
        row = next((r for r in rows if f"`{fault.name}`" in r), None)
        assert row is not None, f"README has no row for {fault.name}"
        if fault is faults.NOSCRIPT:
            continue  # reloaded and retried: a client sees UNAVAILABLE only if that fails three times
        assert f"`{fault.code.name}`" in row, f"README row for {fault.name} does not say {fault.code.name}"
