"""The live-record format has one reader and one writer in Lua (records.lua's read_record and
record_of), and they agree with Python's Record.parse, field by field."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import redis.asyncio

from conveyor.common.ids import new_ulid
from conveyor.common.keys import queue_keys
from conveyor.common.scripts import HELD, Claimed, NewJob, Outcome, Record, Scripts, _source
from conveyor.v1 import event_pb2, job_pb2
from tests.support.wait import wait_for

#: (stored, its first event id in full). The first event id is stored as its sequence number
#: alone when it has the entry id's millisecond (ADR 0031).
RECORDS = [
    ("1|0|5|1733400000000-0|1|", "1733400000000-1"),  # queued
    ("2|0|9||1733400000000-1|", "1733400000000-1"),  # delayed: no entry yet
    ("1|2|5|h|1733400000000-1|", "1733400000000-1"),  # held back by its rate key
    ("3|1|1|1733400000000-0|1||worker-a:7", "1733400000000-1"),  # active, with its consumer
    ("3|12|5|1733400000000-0|1||host-1-4242", "1733400000000-1"),
    ("5|1|5|1733400000000-0|1|1733400000009-0", "1733400000000-1"),  # succeeded
    ("4|3|5||1733400000000-1|", "1733400000000-1"),  # retry scheduled
    # The first event a millisecond after its entry (the two streams' clocks): kept whole.
    ("1|0|5|1733400000000-99|1733400000001-0|", "1733400000001-0"),
    # Re-queued from a dead letter: the new entry is later than the first event.
    ("1|1|5|1733400000500-3|1733400000000-1|", "1733400000000-1"),
]
#: Records the previous version wrote (the first event id always whole): an upgrade finds these
#: in flight and must read them as that version did.
PREVIOUS = [
    ("1|0|5|1733400000000-0|1733400000000-1|", "1733400000000-1"),
    ("1|0|5|1733400000000-57|1733400000000-123|", "1733400000000-123"),
    ("3|1|1|1733400000000-0|1733400000000-1||worker-a:7", "1733400000000-1"),
    ("6|2|5|1733400000000-0|1733400000000-1|1733400000009-0", "1733400000000-1"),
    ("2|0|9||1733400000000-1|", "1733400000000-1"),
    # A short form whose entry id an older version replaced: "0-<seq>" sorts before every event,
    # so a replay from it starts at the stream's start and misses nothing.
    ("4|1|5||1|", "0-1"),
]

_PROBE = """
local out = {}
for i, rec in ipairs(ARGV) do
  local st, att, prio, eid, first_ev, final_ev, consumer = read_record(rec)
  if consumer == '' then consumer = nil end
  local again = record_of(st, att, prio, eid, first_ev, final_ev, consumer)
  out[i] = {st, att, prio, eid, first_event_id(eid, first_ev), final_ev, consumer or '', again}
end
return out
"""


async def _lua_and_python_agree(redis_client: redis.asyncio.Redis, records: list[tuple[str, str]]) -> None:
    raw = await redis_client.eval(_source("records") + _PROBE, 0, *(text for text, _ in records))
    for (text, first_id), fields in zip(records, raw, strict=True):
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
        assert first == first_id, text
        # The claim and the outcome copy the fields as stored: a record reads back unchanged.
        assert written == text


async def test_lua_reads_and_writes_records_as_python_parses_them(redis_client: redis.asyncio.Redis) -> None:
    await _lua_and_python_agree(redis_client, RECORDS)


async def test_records_of_the_previous_version_read_as_before(redis_client: redis.asyncio.Redis) -> None:
    await _lua_and_python_agree(redis_client, PREVIOUS)


async def test_the_first_event_id_is_stored_short_only_beside_an_entry_of_its_millisecond(
    redis_client: redis.asyncio.Redis,
) -> None:
    cases = [
        ("1733400000000-0", "1733400000000-1", "1"),
        ("1733400000000-57", "1733400000000-123", "123"),
        ("1733400000000-99", "1733400000001-0", "1733400000001-0"),
        ("17334000000000-0", "1733400000000-1", "1733400000000-1"),  # a longer ms that starts alike
        ("h", "1733400000000-1", "1733400000000-1"),
        ("", "1733400000000-1", "1733400000000-1"),
    ]
    probe = "local out = {} for i = 1, #ARGV, 2 do out[#out + 1] = short_first(ARGV[i], ARGV[i + 1]) end return out"
    args = [v for eid, first, _ in cases for v in (eid, first)]
    stored = [v.decode() for v in await redis_client.eval(_source("records") + probe, 0, *args)]
    assert stored == [want for _, _, want in cases]
    for (eid, first, _), short in zip(cases, stored, strict=True):
        assert Record.parse(f"1|0|5|{eid}|{short}|").first_event_id == first


def test_no_script_parses_or_builds_a_record_by_hand() -> None:
    lua = resources.files("conveyor.common") / "lua"
    for path in lua.iterdir():
        if not path.name.endswith(".lua") or path.name in ("prelude.lua", "records.lua"):
            continue
        text = path.read_text()
        assert not re.search(r"string\.match\(rec\b", text), f"{path.name} parses a record itself"
        assert not re.search(r"'[1-9]\|' \.\.", text), f"{path.name} builds a record itself"


def _new_jobs(n: int) -> list[NewJob]:
    job = job_pb2.Job(type="test.count", priority=5).SerializeToString()
    queued = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_QUEUED)
    queued.job.type = "test.count"
    return [NewJob(ulid=new_ulid(), priority=5, job=job, queued_event=queued.SerializeToString()) for _ in range(n)]


async def test_a_waiting_jobs_record_fits_a_32_byte_allocation(redis_client: redis.asyncio.Redis) -> None:
    keys = queue_keys("default")
    scripts = Scripts(redis_client)
    jobs = _new_jobs(100)
    await scripts.enqueue(keys, jobs)
    short = 0
    for j in jobs:
        raw = (await redis_client.hget(keys.state, j.ulid)).decode()
        rec = Record.parse(raw)
        # The first event id read back is the QUEUED event's, whatever form it was stored in.
        [(_, fields)] = await redis_client.xrange(keys.events, rec.first_event_id, rec.first_event_id)
        assert fields[b"j"].decode() == j.ulid
        if rec.first_event_id.split("-")[0] == rec.entry_id.split("-")[0]:
            # 28 characters + sds header and NUL = 32 bytes (a 100-job call's sequence numbers < 100).
            assert len(raw) <= 28, raw
            short += 1
    assert short > 0


@pytest.mark.parametrize("previous", [True, False], ids=["written-by-the-previous-version", "written-by-this-one"])
async def test_jobs_in_flight_across_the_upgrade_run_to_their_end(
    redis_client: redis.asyncio.Redis, previous: bool
) -> None:
    """Records the previous version wrote (first event id whole) and this one's (short) are
    claimed, completed and retried (a new entry id), and still name their first event."""
    keys = queue_keys("default")
    scripts = Scripts(redis_client)
    jobs = _new_jobs(3)
    await scripts.enqueue(keys, jobs)
    firsts = {}
    for j in jobs:
        rec = Record.parse(await redis_client.hget(keys.state, j.ulid))
        firsts[j.ulid] = rec.first_event_id
        if previous:
            old = f"{rec.state}|{rec.attempt}|{rec.priority}|{rec.entry_id}|{rec.first_event_id}|"
            await redis_client.hset(keys.state, j.ulid, old)
    claimed = (await scripts.claim(keys, "w-a", 10)).claimed
    assert sorted(c.ulid for c in claimed) == sorted(firsts)
    ok, retried, active = claimed
    succeeded = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_SUCCEEDED).SerializeToString()
    retry = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_RETRY_SCHEDULED).SerializeToString()
    done = Outcome(ok.band, ok.entry_id, ok.ulid, ok.attempt, job_pb2.JOB_STATE_SUCCEEDED, succeeded)
    again_at_once = Outcome(
        retried.band,
        retried.entry_id,
        retried.ulid,
        retried.attempt,
        job_pb2.JOB_STATE_RETRY_SCHEDULED,
        retry,
        due_ms=1,
    )
    ids = await scripts.complete(keys, "w-a", 60_000, [done, again_at_once])
    assert all(ids)
    states = {ok.ulid: job_pb2.JOB_STATE_SUCCEEDED, retried.ulid: job_pb2.JOB_STATE_RETRY_SCHEDULED,
              active.ulid: job_pb2.JOB_STATE_ACTIVE}  # fmt: skip
    for ulid, state in states.items():
        rec = Record.parse(await redis_client.hget(keys.state, ulid))
        assert rec.state == state
        assert rec.first_event_id == firsts[ulid]
        # Watch's replay starts from the first event id and finds the job's QUEUED event there.
        matches, _ = await scripts.job_events(keys, ulid, rec.first_event_id)
        assert event_pb2.JobEvent.FromString(matches[0][1]).type == event_pb2.EVENT_TYPE_QUEUED
    # The retried job comes due again (due_ms 1) and runs as attempt 2 with its history intact.
    again = (await scripts.claim(keys, "w-a", 10)).claimed
    assert [(c.ulid, c.attempt) for c in again] == [(retried.ulid, 2)]
    assert Record.parse(await redis_client.hget(keys.state, retried.ulid)).first_event_id == firsts[retried.ulid]


async def test_a_job_held_by_its_rate_key_keeps_its_first_event_id(redis_client: redis.asyncio.Redis) -> None:
    """Holding a job gives its record the entry id "h", and starting it a new entry: the short
    first event id, counted from the old entry id, is written in full before either."""
    keys = queue_keys("default")
    scripts = Scripts(redis_client)
    await scripts.set_limit(keys, "key_rate", "1:500")
    job = job_pb2.Job(type="test.count", priority=5, rate_key="k").SerializeToString()
    queued = event_pb2.JobEvent(type=event_pb2.EVENT_TYPE_QUEUED).SerializeToString()
    first, second = (NewJob(ulid=new_ulid(), priority=5, job=job, queued_event=queued, rate_key="k") for _ in range(2))
    await scripts.enqueue(keys, [first, second])
    before = Record.parse(await redis_client.hget(keys.state, second.ulid))
    assert [c.ulid for c in (await scripts.claim(keys, "w-a", 10)).claimed] == [first.ulid]
    held = Record.parse(await redis_client.hget(keys.state, second.ulid))
    assert held.entry_id == HELD and held.first_event_id == before.first_event_id

    async def started() -> list[Claimed]:
        return (await scripts.claim(keys, "w-a", 10)).claimed

    [claimed] = await wait_for(started, "the held job to start once its key's window frees up", within=10)
    assert claimed.ulid == second.ulid
    running = Record.parse(await redis_client.hget(keys.state, second.ulid))
    assert running.entry_id == claimed.entry_id != before.entry_id
    assert running.first_event_id == before.first_event_id
