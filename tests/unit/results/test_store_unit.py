"""Migrations packaging and the salvage path's cleaning of rows (no database)."""

from __future__ import annotations

import json

from conveyor.results.store import JobRow, load_migrations, sanitize


def test_migrations_are_packaged_numbered_and_ordered() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    assert migrations[0].version == 1 and migrations[0].name == "init"
    assert "CREATE TABLE jobs" in migrations[0].sql and "CREATE TABLE job_events" in migrations[0].sql


def test_sanitize_keeps_what_postgres_accepts_and_drops_the_rest() -> None:
    row = JobRow("q/01JDQ4ZG0000000000000000AA", "q")
    row.worker = "a\x00b"
    row.payload = '{"s": "x\\u0000y"}'
    row.result = "{broken"
    row.error = json.dumps({"message": "fine"})
    row.priority = 70_000
    sanitize(row)
    assert row.worker == "ab"
    assert row.payload is not None and json.loads(row.payload) == {"s": "xy"}
    assert row.result is None
    assert row.error is not None and json.loads(row.error) == {"message": "fine"}
    assert row.priority == 2**15 - 1
