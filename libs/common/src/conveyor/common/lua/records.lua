-- records: what every script that reads or writes live records shares ("--#include records";
-- prelude.lua includes it, scripts.py splices both in). Protobuf encoding for the few JobEvent
-- fields the scripts write themselves, the time of this call (Redis's clock, so every script
-- agrees however the clients' clocks drift), the live record's one reader and one writer.
-- Everything here is defined on every call of a script that includes it: a script that needs
-- only this (progress.lua runs once per PROGRESS event) does not pay for the rest of the prelude.
local function varint(v)
  if v < 128 then return string.char(v) end  -- attempts, types, short lengths: no table
  local parts = {}
  while v >= 128 do
    parts[#parts + 1] = string.char(v % 128 + 128)
    v = math.floor(v / 128)
  end
  parts[#parts + 1] = string.char(v)
  return table.concat(parts)
end
local function bytes_field(tag, s) return string.char(tag) .. varint(#s) .. s end

-- Redis's TIME, read on first use: a script that writes no event of its own and reads no clock
-- (enqueue, progress, heartbeat) runs no command for it.
local clock = nil
local function time_now()
  if not clock then clock = redis.call('TIME') end
  return clock
end
-- google.protobuf.Timestamp{seconds, nanos} of now, ready to wrap as JobEvent.time (tag 0x2a).
-- Built on first use: most calls of most scripts write no event of their own, and building it
-- cost more than the rest of a one-job call (progress.lua).
local timestamp_bytes = nil
local function timestamp()
  if not timestamp_bytes then
    timestamp_bytes = string.char(0x08) .. varint(tonumber(time_now()[1])) .. string.char(0x10) .. varint(tonumber(time_now()[2]) * 1000)
  end
  return timestamp_bytes
end
-- A live record: state|attempt|priority|entry id|first event id|final event id[|consumer]
-- (the consumer only while ACTIVE). read_record and record_of are its one reader and one writer,
-- as scripts.py's Record is on the Python side. Fields stay the strings stored ('3', '12').
-- The first event id may be stored as its sequence number alone, meaning the entry id's
-- millisecond: enqueue writes both in one call, and so a waiting job's record fits in 28
-- characters, a 32-byte allocation rather than 48 (ADR 0031). A bare number is never an id
-- Redis generates ("<ms>-<seq>"), so both forms read back unambiguously, and records written
-- before this change (the full id) read as they did. The fields are passed through as stored
-- (the claim and the outcome only copy them): a writer that gives the record another entry id
-- passes first_event_id(entry id, first) instead, which is the full id in either form.
-- read_record(rec): state, attempt, priority, entry id, first event id (as stored), final event
-- id and consumer ('' when none), or nothing for no record.
local function read_record(rec)
  if not rec then return nil end
  return string.match(rec, '^(%d+)|(%d+)|(%d+)|([^|]*)|([^|]*)|([^|]*)|?(.*)$')
end
local function record_of(st, attempt, prio, eid, first_ev, final_ev, consumer)
  local value = st .. '|' .. attempt .. '|' .. prio .. '|' .. eid .. '|' .. first_ev .. '|' .. final_ev
  if consumer then return value .. '|' .. consumer end
  return value
end
-- The full id of a record's first event, as read_record returned it with its entry id.
local function first_event_id(eid, first)
  if first == '' or string.find(first, '-', 1, true) then return first end
  -- No entry id to count from (an older version rewrote the record): "0-<seq>" still sorts
  -- before every real event, so a replay from it scans from the stream's start, missing nothing.
  return (string.match(eid, '^%d+%-') or '0-') .. first
end
-- The first event id as enqueue stores it beside the entry id it wrote in the same call.
local function short_first(eid, first_id)
  local dash = string.find(eid, '-', 1, true)
  if dash and string.sub(first_id, 1, dash) == string.sub(eid, 1, dash) then
    return string.sub(first_id, dash + 1)
  end
  return first_id
end

-- The fields of a job stream entry: ulid (j), Job bytes (d) and rate key (k, or nil).
local function entry_fields(fields)
  local ulid, job, k
  for f = 1, #(fields or {}), 2 do
    local name = fields[f]
    if name == 'j' then ulid = fields[f + 1] elseif name == 'd' then job = fields[f + 1] elseif name == 'k' then k = fields[f + 1] end
  end
  return ulid, job, k
end

-- Live records this call writes, set together by flush_records() before it returns (one HSET
-- for the batch instead of one per job). written[ulid] is the newest value, which Redis does
-- not have yet: a script that may read a record it wrote itself reads it here first.
local written, record_args = {}, {}
local function put_record(ulid, value)
  written[ulid] = value
  record_args[#record_args + 1] = ulid
  record_args[#record_args + 1] = value
end
local function flush_records()
  if #record_args > 0 then redis.call('HSET', KEYS[1], unpack(record_args)) end
end
-- Whether a job is ACTIVE now, this call's own writes included.
local function is_active(ulid)
  return read_record(written[ulid] or redis.call('HGET', KEYS[1], ulid)) == '3'
end

