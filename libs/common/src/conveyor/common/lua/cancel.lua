--[[ cancel: cancel one job (CancelJob).
A queued, delayed or retry-scheduled job is removed from where it waits and ends CANCELLED
now, so it never runs. A running job is marked in the cancel hash; its worker's heartbeat
sees the mark, stops the attempt and records CANCELLED (complete.lua). Finished jobs are
left alone. Idempotent: a second cancel changes nothing.
KEYS as in claim.lua: [1] state [2] events [3] done [4..12] bands [13] delayed [14] parked
[15] signal [16] dead [17] cancel [19..25] flow control (a job held back by its rate key's
limits leaves the key's held set) [27] retrying zset
ARGV[1] ulid  ARGV[2] CANCELLED JobEvent bytes (without the job)  ARGV[3] retention ms  ARGV[4] reason
returns {outcome, state}: outcome 1 = cancelled now, 2 = running attempt signalled,
  0 = already final (state says which), -1 = no live record
]]
--#include prelude
local state_key = KEYS[1]
local delayed_key, parked_key, cancel_key = KEYS[13], KEYS[14], KEYS[17]
local ulid, event, retention, reason = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local rec = redis.call('HGET', state_key, ulid)
if not rec then return {-1, 0} end
local st, att, prio, eid, first_ev = read_record(rec)
local state = tonumber(st)
if state >= 5 then return {0, state} end
if state == 3 then
  redis.call('HSET', cancel_key, ulid, reason)
  return {2, 3}
end

local job = nil
if state == 1 and eid == 'h' then
  job = redis.call('HGET', parked_key, ulid)
  redis.call('HDEL', parked_key, ulid)
  local k = redis.call('HGET', KEYS[23], ulid)
  if k then redis.call('ZREM', key_key('held', k), ulid) end
  redis.call('HDEL', KEYS[23], ulid)
elseif state == 1 then
  local stream = KEYS[3 + tonumber(prio)]
  local entry = redis.call('XRANGE', stream, eid, eid)[1]
  job = select(2, entry_fields(entry and entry[2]))
  redis.call('XDEL', stream, eid)
else
  job = redis.call('HGET', parked_key, ulid)
  redis.call('ZREM', delayed_key, ulid)
  redis.call('ZREM', KEYS[27], ulid)
  redis.call('HDEL', parked_key, ulid)
  redis.call('HDEL', KEYS[23], ulid)
end
if job then
  event = event .. string.char(0x62) .. varint(#job) .. job  -- JobEvent.job: the final event carries the job
end
finish(ulid, 8, event, att, prio, eid, first_ev, retention)
flush_records()
return {1, 8}
