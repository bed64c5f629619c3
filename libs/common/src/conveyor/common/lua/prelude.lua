-- prelude: shared by the scripts whose source says "--#include prelude" (scripts.py splices it in).
-- Protobuf encoding for the few JobEvent fields the scripts write themselves, and the time of
-- this call (Redis's clock, so every script agrees however the clients' clocks drift).
local function varint(v)
  local parts = {}
  while v >= 128 do
    parts[#parts + 1] = string.char(v % 128 + 128)
    v = math.floor(v / 128)
  end
  parts[#parts + 1] = string.char(v)
  return table.concat(parts)
end
local function bytes_field(tag, s) return string.char(tag) .. varint(#s) .. s end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
-- google.protobuf.Timestamp{seconds, nanos} of now, ready to wrap as JobEvent.time (tag 0x2a).
local timestamp = string.char(0x08) .. varint(tonumber(now[1])) .. string.char(0x10) .. varint(tonumber(now[2]) * 1000)
-- A live record: state|attempt|priority|entry id|first event id|final event id[|consumer]
local RECORD = '^(%d+)|(%d+)|(%d+)|([^|]*)|([^|]*)|([^|]*)'

-- Start an attempt of a claimed entry: attempt + 1, record ACTIVE owned by `consumer`, an ACTIVE
-- event; appends the 6 values claim/reclaim return per job to `out`. The attempt number and the
-- consumer are the claim's fencing token (complete.lua). `rec` is the string.match of RECORD.
local function activate(out, state_key, events_key, consumer, band, entry_id, ulid, job, rec)
  local attempt = tonumber(rec[2]) + 1
  -- JobEvent{type: ACTIVE, attempt, time, worker}; the job id is the entry's j field.
  local event = string.char(0x18) .. varint(2) .. string.char(0x20) .. varint(attempt)
    .. bytes_field(0x2a, timestamp) .. bytes_field(0x32, consumer)
  local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', event)
  redis.call('HSET', state_key, ulid, '3|' .. attempt .. '|' .. rec[3] .. '|' .. rec[4] .. '|' .. rec[5] .. '|' .. rec[6] .. '|' .. consumer)
  for _, v in ipairs({band, entry_id, ulid, attempt, job, event_id}) do out[#out + 1] = v end
end
