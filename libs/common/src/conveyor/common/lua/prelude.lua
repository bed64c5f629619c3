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
