"""Each row of the PostgreSQL error table (pgerrors.TABLE): set aside or retried, and what a client is told."""

from __future__ import annotations

from pathlib import Path

import grpc
import psycopg
import psycopg.errors
import psycopg_pool
import pytest

from conveyor.common import supervise
from conveyor.results import pgerrors


def _error(sqlstate: str) -> psycopg.Error:
    return psycopg.errors.lookup(sqlstate)(f"an error {sqlstate}")


@pytest.mark.parametrize(
    ("sqlstate", "fault"),
    [
        ("22P02", pgerrors.DATA),  # invalid_text_representation (bad JSON)
        ("22021", pgerrors.DATA),  # character_not_in_repertoire (a NUL byte)
        ("22003", pgerrors.DATA),  # numeric_value_out_of_range
        ("23505", pgerrors.INTEGRITY),  # unique_violation
        ("23514", pgerrors.INTEGRITY),  # check_violation
        ("23502", pgerrors.INTEGRITY),  # not_null_violation
        ("08006", pgerrors.CONNECTION_EXCEPTION),
        ("08001", pgerrors.CONNECTION_EXCEPTION),
        ("25006", pgerrors.READ_ONLY),  # read_only_sql_transaction
        ("42501", pgerrors.PRIVILEGE),
        ("42P01", pgerrors.UNDEFINED_TABLE),
        ("42703", pgerrors.SCHEMA),  # undefined_column
        ("55P03", pgerrors.LOCK_TIMEOUT),
        ("55006", pgerrors.OBJECT_STATE),
        ("57014", pgerrors.STATEMENT_CANCELLED),
        ("57P01", pgerrors.OPERATOR),  # admin_shutdown
        ("57P03", pgerrors.OPERATOR),  # cannot_connect_now
        ("53100", pgerrors.RESOURCES),  # disk_full
        ("53300", pgerrors.RESOURCES),  # too_many_connections
        ("40001", pgerrors.ROLLBACK),  # serialization_failure
        ("40P01", pgerrors.ROLLBACK),  # deadlock_detected
        ("58030", pgerrors.SYSTEM),  # io_error
        ("XX000", pgerrors.OTHER),  # internal_error
        ("0A000", pgerrors.OTHER),  # feature_not_supported
    ],
)
def test_each_sqlstate_finds_its_row(sqlstate: str, fault: pgerrors.PgFault) -> None:
    exc = _error(sqlstate)
    assert pgerrors.pg_fault(exc) is fault
    row = sqlstate[:2] in ("22", "23")
    assert pgerrors.is_row_error(exc) is row
    assert pgerrors.is_transient(exc) is not row
    assert pgerrors.describe(exc) == (sqlstate, f"an error {sqlstate}")


def test_only_classes_22_and_23_are_errors_of_the_row() -> None:
    assert {f.sqlstate for f in pgerrors.TABLE if f.row} == {"22", "23"}


@pytest.mark.parametrize(
    "exc",
    [psycopg.OperationalError("connection lost"), psycopg.InterfaceError("closed"), psycopg_pool.PoolTimeout("t")],
    ids=["operational", "interface", "pool-timeout"],
)
def test_errors_without_sqlstate_are_connection_faults(exc: BaseException) -> None:
    assert pgerrors.pg_fault(exc) is pgerrors.CONNECTION
    assert pgerrors.is_transient(exc)
    err = pgerrors.client_error(exc)
    assert err is not None and err.code == grpc.StatusCode.UNAVAILABLE
    assert "PostgreSQL cannot be reached" in err.message


def test_a_bug_is_not_a_postgres_fault() -> None:
    for exc in (ValueError("x"), KeyError("k"), RuntimeError("r")):
        assert pgerrors.pg_fault(exc) is None
        assert not pgerrors.is_transient(exc)
        assert not pgerrors.is_row_error(exc)
        assert pgerrors.client_error(exc) is None


@pytest.mark.parametrize("fault", [f for f in pgerrors.TABLE if not f.row], ids=lambda f: f.name + f.sqlstate)
def test_retryable_rows_reach_clients_as_unavailable_or_resource_exhausted(fault: pgerrors.PgFault) -> None:
    err = fault.error()
    expected = grpc.StatusCode.RESOURCE_EXHAUSTED if fault.sqlstate == "53" else grpc.StatusCode.UNAVAILABLE
    assert err.code == expected
    assert err.code != grpc.StatusCode.INTERNAL
    assert "retried" in err.message


def test_row_errors_are_not_client_errors_of_their_own() -> None:
    # A 22/23 met by a read is a bug of the query, not something a client can retry: INTERNAL it stays.
    assert pgerrors.client_error(_error("22P02")) is None
    assert pgerrors.client_error(_error("23505")) is None


def test_registered_with_the_supervisor() -> None:
    pgerrors.register()
    pgerrors.register()  # idempotent
    assert supervise._transient(_error("25006"))
    assert supervise._transient(psycopg.OperationalError("gone"))
    assert not supervise._transient(_error("22P02"))
    assert supervise._EXTRA_TRANSIENT.count(pgerrors.is_transient) == 1


def test_the_readme_has_a_row_per_postgres_class_with_its_status() -> None:
    """The README's "When PostgreSQL refuses work" table is pgerrors.TABLE in words."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("#### When PostgreSQL refuses work", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    for fault in pgerrors.TABLE:
        mark = {"": "no SQLSTATE", "*": "any other"}.get(fault.sqlstate, f"`{fault.sqlstate}`")
        row = next((r for r in rows if mark in r), None)
        assert row is not None, f"README has no row for SQLSTATE {fault.sqlstate or '(none)'}"
        assert f"`{fault.code.name}`" in row, f"README row for {fault.sqlstate} does not say {fault.code.name}"
