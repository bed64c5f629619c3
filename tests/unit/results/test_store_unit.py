"""Migrations packaging and the set-aside rows (no database)."""

from __future__ import annotations

from conveyor.results.store import SetAside, entries_of, load_migrations, pack_event, set_aside_columns


def test_migrations_are_packaged_numbered_and_ordered() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    assert migrations[0].version == 1 and migrations[0].name == "init"
    assert "CREATE TABLE jobs" in migrations[0].sql and "CREATE TABLE job_events" in migrations[0].sql


def test_set_aside_entries_keep_each_stream_entry_as_it_was() -> None:
    job_id = "q/01JDQ4ZG0000000000000000AA"
    history = [(job_id, 5, 0, 6, 1, pack_event(5, 0, b"first") + pack_event(6, 1, b"\x00second"))]
    items = entries_of("q", job_id, history, "22P02", "invalid input syntax for type json")
    assert [(i.entry_id, i.event) for i in items] == [("5-0", b"first"), ("6-1", b"\x00second")]
    assert {(i.queue, i.job_id, i.sqlstate) for i in items} == {("q", job_id, "22P02")}


def test_set_aside_text_columns_never_hold_a_nul() -> None:
    item = SetAside("q", "q/a\x00b", "1-0", b"\x00raw", "", "malformed event: \x00")
    columns = set_aside_columns([item])
    assert len(columns) == 6
    assert b"\x00raw" in bytes(columns[3])
    assert b"a\x00b" not in bytes(columns[1]) and "a\ufffdb".encode() in bytes(columns[1])
