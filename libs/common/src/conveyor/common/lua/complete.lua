--[[ complete: record final outcomes, each acked in the same step as its event.
Invariant 3 (DESIGN.md): no ack without its outcome, no outcome without its ack.
Fencing: an outcome is accepted only while this consumer still owns the entry with the
same delivery count; a stale owner (its job was reclaimed) changes nothing.
Also expires the live records of jobs that finished more than the retention ago.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset  KEYS[4..12] job streams, bands 1..9
ARGV[1] consumer group  ARGV[2] consumer  ARGV[3] record retention ms  ARGV[4] number of outcomes
then 6 values per outcome: band, entry id, ulid, deliveries, final JobState, JobEvent bytes
returns an array with, per outcome, the event id, or 0 when fenced off
]]
local state_key, events_key, done_key = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, retention, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local out = {}
for i = 0, n - 1 do
  local base = 5 + i * 6
  local band, entry_id, ulid = tonumber(ARGV[base]), ARGV[base + 1], ARGV[base + 2]
  local deliveries, final_state, event = tonumber(ARGV[base + 3]), ARGV[base + 4], ARGV[base + 5]
  local stream = KEYS[3 + band]
  local pending = redis.call('XPENDING', stream, group, entry_id, entry_id, 1)
  local owner = pending[1]
  if owner and owner[2] == consumer and tonumber(owner[4]) == deliveries then
    redis.call('XACK', stream, group, entry_id)
    redis.call('XDEL', stream, entry_id)
    local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', event)
    local rec = redis.call('HGET', state_key, ulid)
    if rec then
      local _, attempt, prio, eid, first_ev = string.match(rec, '^(%d+)|(%d+)|(%d+)|([^|]*)|([^|]*)|')
      redis.call('HSET', state_key, ulid, final_state .. '|' .. attempt .. '|' .. prio .. '|' .. eid .. '|' .. first_ev .. '|' .. event_id)
      redis.call('ZADD', done_key, now_ms + retention, ulid)
    end
    out[#out + 1] = event_id
  else
    out[#out + 1] = 0
  end
end

-- Invariant 7: live records of finished jobs leave Redis after the retention.
local expired = redis.call('ZRANGEBYSCORE', done_key, '-inf', now_ms, 'LIMIT', 0, 256)
if #expired > 0 then
  redis.call('HDEL', state_key, unpack(expired))
  redis.call('ZREM', done_key, unpack(expired))
end
return out
