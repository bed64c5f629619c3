"""The live-record format has one reader and one writer in Lua (the prelude's read_record and
record_of), and they agree with Python's Record.parse, field by field."""

from __future__ import annotations

import re
from importlib import resources

import redis.asyncio

from conveyor.common.scripts import Record

RECORDS = [
    "1|0|5|1733400000000-0|1733400000000-1|",  # queued
    "2|0|9||1733400000000-1|",  # delayed: no entry yet
    "1|2|5|h|1733400000000-1|",  # held back by its rate key
    "3|1|1|1733400000000-0|1733400000000-1||worker-a:7",  # active, with its consumer
    "3|12|5|1733400000000-0|1733400000000-1||host-1-4242",
    "5|1|5|1733400000000-0|1733400000000-1|1733400000009-0",  # succeeded
    "4|3|5||1733400000000-1|",  # retry scheduled
]

_PROBE = """
local out = {}
for i, rec in ipairs(ARGV) do
  local st, att, prio, eid, first_ev, final_ev, consumer = read_record(rec)
  if consumer == '' then consumer = nil end
  local again = record_of(st, att, prio, eid, first_ev, final_ev, consumer)
  out[i] = {st, att, prio, eid, first_ev, final_ev, consumer or '', again}
end
return out
"""


async def test_lua_reads_and_writes_records_as_python_parses_them(redis_client: redis.asyncio.Redis) -> None:
    prelude = (resources.files("conveyor.common") / "lua" / "prelude.lua").read_text()
    raw = await redis_client.eval(prelude + _PROBE, 0, *RECORDS)
    for text, fields in zip(RECORDS, raw, strict=True):
        st, att, prio, eid, first, final, consumer, written = (f.decode() for f in fields)
        parsed = Record.parse(text)
        assert (int(st), int(att), int(prio), eid, first, final, consumer) == (
            parsed.state,
            parsed.attempt,
            parsed.priority,
            parsed.entry_id,
            parsed.first_event_id,
            parsed.final_event_id,
            parsed.consumer,
        )
        assert written == text


def test_no_script_parses_or_builds_a_record_by_hand() -> None:
    lua = resources.files("conveyor.common") / "lua"
    for path in lua.iterdir():
        if not path.name.endswith(".lua") or path.name == "prelude.lua":
            continue
        text = path.read_text()
        assert not re.search(r"string\.match\(rec\b", text), f"{path.name} parses a record itself"
        assert not re.search(r"'[1-9]\|' \.\.", text), f"{path.name} builds a record itself"
