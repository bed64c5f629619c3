--[[ complete: record outcomes, each acked in the same step as its event.
Invariant 3 (DESIGN.md): no ack without its outcome, no outcome without its ack.
Fencing: an outcome is accepted only while the job's live record still names this
consumer, this attempt and this entry as its claim (a reclaim bumps the attempt), so a
stale owner whose job was taken over changes nothing.
A RETRY_SCHEDULED outcome parks the job (delayed zset + parked hash) until it is due; a
final FAILED also goes to the dead-letter stream with its last error; final outcomes keep
the record until the results service has projected them (done score +inf, see projected.lua),
then for the retention. Also expires records past it.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset  KEYS[4..12] job streams, bands 1..9
KEYS[13] delayed zset  KEYS[14] parked hash  KEYS[15] signal stream  KEYS[16] dead stream
KEYS[17] cancel hash  KEYS[19..25] flow control (see prelude): every outcome gives the job's
concurrency slot back; the workers are signalled when that may let a held job start
KEYS[26] dead-letter index (ulid -> dead entry id)  KEYS[27] retrying zset (retry-scheduled part of delayed)
ARGV[1] consumer group  ARGV[2] consumer  ARGV[3] record retention ms (unused: applied on projection)  ARGV[4] number of outcomes
ARGV[5] the outcomes packed back to back, each as struct '>B I2 c0 c26 I4 B d I4 c0 B c0':
  band, entry id, ulid, attempt, JobState (4 = retry, else final), due ms (retries), JobEvent
  bytes, rate key ("" = none)
returns an array with, per outcome, the event id, or 0 when fenced off
]]
--#include prelude
local state_key, events_key, done_key = KEYS[1], KEYS[2], KEYS[3]
local delayed_key, parked_key, signal_key, dead_key = KEYS[13], KEYS[14], KEYS[15], KEYS[16]
local group, consumer, retention, n, packed = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local pos = 1

-- Per job only the outcome's event is its own command: records are read in one HMGET and
-- written in one HSET, entries acked and deleted per stream, finished jobs' expiries added
-- in one ZADD (each Redis command costs more than the Lua around it).
local items = {}
local ulids = {}
for i = 1, n do
  local band, entry_id, ulid, attempt, new_state, due, event, k
  band, entry_id, ulid, attempt, new_state, due, event, k, pos = struct.unpack('>B I2 c0 c26 I4 B d I4 c0 B c0', packed, pos)
  items[i] = {band, entry_id, ulid, attempt, new_state, due, event, k}
  ulids[i] = ulid
end
local recs = n > 0 and redis.call('HMGET', state_key, unpack(ulids)) or {}
-- A ulid seen twice reads its own update (written, see prelude).
local acks, done = {}, {}

local out = {}
local signalled = false
local queue_capped = redis.call('HEXISTS', KEYS[20], 'conc') == 1
local check_held = any_held()
local cancels = redis.call('EXISTS', KEYS[17]) == 1
for i = 1, n do
  local band, entry_id, ulid, attempt, new_state, due, event, k = unpack(items[i])
  local stream = stream_of(band)
  local rec = written[ulid] or recs[i]
  local st, att, prio, eid, first_ev, _, owner = read_record(rec)
  if st == '3' and tonumber(att) == attempt and owner == consumer and eid == entry_id then
    local job = nil
    if new_state == 4 or new_state == 6 then
      local entry = redis.call('XRANGE', stream, entry_id, entry_id)[1]
      job = select(2, entry_fields(entry and entry[2]))
    end
    local ids = acks[stream]
    if not ids then ids = {}; acks[stream] = ids end
    ids[#ids + 1] = entry_id
    if cancels then redis.call('HDEL', KEYS[17], ulid) end
    local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', event)
    if release(ulid, k, check_held) or queue_capped then signalled = true end
    if new_state == 6 and job then
      redis.call('HSET', KEYS[26], ulid, redis.call('XADD', dead_key, '*', 'j', ulid, 'd', job, 'e', event, 'p', prio, 'a', att, 'k', k))
    end
    local record
    if new_state == 4 and job then
      if k ~= '' then redis.call('HSET', KEYS[23], ulid, k) end
      redis.call('HSET', parked_key, ulid, job)
      redis.call('ZADD', delayed_key, due, ulid)
      redis.call('ZADD', KEYS[27], due, ulid)
      record = record_of('4', att, prio, '', first_event_id(eid, first_ev), '')
      signalled = true
    else
      record = record_of(new_state, att, prio, eid, first_ev, event_id)
      done[#done + 1] = ulid
    end
    put_record(ulid, record)
    out[#out + 1] = event_id
  else
    out[#out + 1] = 0
  end
end
for stream, ids in pairs(acks) do
  redis.call('XACK', stream, group, unpack(ids))
  redis.call('XDEL', stream, unpack(ids))
end
flush_records()
if #done > 0 then
  local scored = {}
  -- Kept until the results service has committed the outcome (projected.lua sets the expiry).
  local expires = '+inf'
  for i, ulid in ipairs(done) do
    scored[2 * i - 1] = expires
    scored[2 * i] = ulid
  end
  redis.call('ZADD', done_key, unpack(scored))
end
if signalled then
  redis.call('XADD', signal_key, 'MAXLEN', '~', 16, '*', 's', 'complete')
end

-- Invariant 7: live records of finished jobs leave Redis after the retention.
local expired = redis.call('ZRANGEBYSCORE', done_key, '-inf', now_ms, 'LIMIT', 0, 256)
if #expired > 0 then
  redis.call('HDEL', state_key, unpack(expired))
  redis.call('ZREM', done_key, unpack(expired))
end
return out
