--[[ claim: take up to COUNT waiting jobs, highest priority band first, and mark them ACTIVE.
Each claimed job gets attempt + 1, state ACTIVE and an ACTIVE event in the same step, so
a job is never running without the queue knowing it.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset  KEYS[4..12] job streams, bands 1..9
ARGV[1] consumer group  ARGV[2] consumer (worker id)  ARGV[3] count
returns {claimed, wait_from}:
  claimed: flat array, 6 values per job: band, entry id, ulid, attempt, Job bytes, ACTIVE event id
  wait_from: when nothing was claimed, the last generated id of each band (1..9, "0-0" when
  the stream does not exist) so the caller can block for newer entries without a gap
]]
local state_key, events_key = KEYS[1], KEYS[2]
local group, consumer, want = ARGV[1], ARGV[2], tonumber(ARGV[3])

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
local timestamp = string.char(0x08) .. varint(tonumber(now[1])) .. string.char(0x10) .. varint(tonumber(now[2]) * 1000)

local claimed = {}
for band = 9, 1, -1 do
  if want <= 0 then break end
  local stream = KEYS[3 + band]
  if redis.call('EXISTS', stream) == 1 then
    local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', stream, '>')
    if res then
      for _, entry in ipairs(res[1][2]) do
        local entry_id, fields = entry[1], entry[2]
        local ulid, job
        for f = 1, #fields, 2 do
          if fields[f] == 'j' then ulid = fields[f + 1] elseif fields[f] == 'd' then job = fields[f + 1] end
        end
        local rec = ulid and redis.call('HGET', state_key, ulid)
        local st, attempt, prio, eid, first_ev, final_ev
        if rec then
          st, attempt, prio, eid, first_ev, final_ev = string.match(rec, '^(%d+)|(%d+)|(%d+)|([^|]*)|([^|]*)|([^|]*)')
        end
        if not st or tonumber(st) >= 5 then
          -- Cancelled or expired while waiting: never run it.
          redis.call('XACK', stream, group, entry_id)
          redis.call('XDEL', stream, entry_id)
        else
          attempt = tonumber(attempt) + 1
          -- JobEvent{type: ACTIVE, attempt, time, worker}; the job id is the entry's j field.
          local event = string.char(0x18) .. varint(2)
            .. string.char(0x20) .. varint(attempt) .. bytes_field(0x2a, timestamp) .. bytes_field(0x32, consumer)
          local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', event)
          -- The attempt number and the consumer are the claim's fencing token (complete.lua).
          redis.call('HSET', state_key, ulid, '3|' .. attempt .. '|' .. prio .. '|' .. eid .. '|' .. first_ev .. '|' .. final_ev .. '|' .. consumer)
          claimed[#claimed + 1] = band
          claimed[#claimed + 1] = entry_id
          claimed[#claimed + 1] = ulid
          claimed[#claimed + 1] = attempt
          claimed[#claimed + 1] = job
          claimed[#claimed + 1] = event_id
          want = want - 1
        end
      end
    end
  end
end

local wait_from = {}
if #claimed == 0 then
  for band = 1, 9 do
    local stream = KEYS[3 + band]
    local last = '0-0'
    if redis.call('EXISTS', stream) == 1 then
      local info = redis.call('XINFO', 'STREAM', stream)
      for f = 1, #info, 2 do
        if info[f] == 'last-generated-id' then last = info[f + 1] end
      end
    end
    wait_from[band] = last
  end
end
return {claimed, wait_from}
