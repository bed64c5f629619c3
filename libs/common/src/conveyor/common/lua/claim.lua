--[[ claim: promote due delayed jobs, then take up to COUNT waiting jobs, highest priority
band first, and mark them ACTIVE.
Promotion is atomic here, so whichever worker gets there first promotes a due job, once
(no scheduler process to lose). Each claimed job gets attempt + 1, state ACTIVE, this
consumer as owner and an ACTIVE event in the same step.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset  KEYS[4..12] job streams, bands 1..9
KEYS[13] delayed zset  KEYS[14] parked hash  KEYS[15] signal stream  KEYS[18] paused flag
(while the queue is paused nothing is claimed; ResumeQueue signals, which wakes the caller)
ARGV[1] consumer group  ARGV[2] consumer (worker id)  ARGV[3] count
returns {claimed, wait_from, next_due}:
  claimed: flat array, 6 values per job: band, entry id, ulid, attempt, Job bytes, ACTIVE event id
  wait_from: when nothing was claimed, the last generated id of each band 1..9 and of the
    signal stream ("0-0" when a stream does not exist), so the caller can block for newer
    entries without a gap
  next_due: ms when the earliest delayed job is due ("" when none)
]]
--#include prelude
local state_key, events_key, delayed_key, parked_key, signal_key = KEYS[1], KEYS[2], KEYS[13], KEYS[14], KEYS[15]
local group, consumer, want = ARGV[1], ARGV[2], tonumber(ARGV[3])

-- Promote due jobs: JobEvent{type: QUEUED, time} for each.
local due = redis.call('ZRANGEBYSCORE', delayed_key, '-inf', now_ms, 'LIMIT', 0, 1000)
for _, ulid in ipairs(due) do
  local job = redis.call('HGET', parked_key, ulid)
  local rec = redis.call('HGET', state_key, ulid)
  local st, attempt, prio, eid, first_ev, final_ev
  if rec then st, attempt, prio, eid, first_ev, final_ev = string.match(rec, RECORD) end
  if job and (st == '2' or st == '4') then
    local stream = KEYS[3 + tonumber(prio)]
    if redis.call('EXISTS', stream) == 0 then
      redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    end
    local entry_id = redis.call('XADD', stream, '*', 'j', ulid, 'd', job)
    redis.call('XADD', events_key, '*', 'j', ulid, 'e', string.char(0x18) .. varint(1) .. bytes_field(0x2a, timestamp))
    redis.call('HSET', state_key, ulid, '1|' .. attempt .. '|' .. prio .. '|' .. entry_id .. '|' .. first_ev .. '|' .. final_ev)
  end
  redis.call('HDEL', parked_key, ulid)
  redis.call('ZREM', delayed_key, ulid)
end

local claimed = {}
if redis.call('EXISTS', KEYS[18]) == 1 then want = 0 end
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
        if rec then st, attempt, prio, eid, first_ev, final_ev = string.match(rec, RECORD) end
        if not st or tonumber(st) >= 5 or eid ~= entry_id then
          -- Cancelled, expired or superseded while waiting: never run it.
          redis.call('XACK', stream, group, entry_id)
          redis.call('XDEL', stream, entry_id)
        else
          activate(claimed, state_key, events_key, consumer, band, entry_id, ulid, job,
            {st, attempt, prio, eid, first_ev, final_ev})
          want = want - 1
        end
      end
    end
  end
end

local wait_from = {}
local next_due = ''
if #claimed == 0 then
  local function last_id(stream)
    if redis.call('EXISTS', stream) == 0 then return '0-0' end
    local info = redis.call('XINFO', 'STREAM', stream)
    for f = 1, #info, 2 do
      if info[f] == 'last-generated-id' then return info[f + 1] end
    end
    return '0-0'
  end
  for band = 1, 9 do wait_from[band] = last_id(KEYS[3 + band]) end
  wait_from[10] = last_id(signal_key)
  local first = redis.call('ZRANGE', delayed_key, 0, 0, 'WITHSCORES')
  if first[2] then next_due = first[2] end
end
return {claimed, wait_from, next_due}
