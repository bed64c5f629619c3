--[[ reclaim: take over jobs whose worker stopped heartbeating (invariant 4, DESIGN.md).
Entries idle longer than the visibility timeout are claimed with XAUTOCLAIM (looping on
its cursor, bounded), each becoming a new attempt owned by this consumer, exactly as in
claim.lua. An entry delivered more than the delivery limit is a poison job: it goes to the
dead-letter stream as DEAD_LETTERED instead of killing another worker. Ids XAUTOCLAIM
reports as deleted are acked so the pending list does not keep them.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset  KEYS[4..12] job streams, bands 1..9
KEYS[13] delayed zset  KEYS[14] parked hash  KEYS[15] signal stream  KEYS[16] dead stream
KEYS[17] cancel hash (a reclaimed job whose cancel was requested ends CANCELLED instead of running)
KEYS[18] paused flag (a paused queue starts nothing, reclaimed jobs included)
KEYS[26] dead-letter index (ulid -> dead entry id)
KEYS[19..25] flow control (see prelude): a reclaimed job keeps its concurrency slot (it runs
again); a dead-lettered or cancelled one gives it back. Reclaims are not counted as starts.
ARGV[1] consumer group  ARGV[2] consumer  ARGV[3] min idle ms  ARGV[4] most jobs to take
ARGV[5] delivery limit  ARGV[6] record retention ms
returns {claimed, dead}: claimed as in claim.lua (6 values per job); dead = ulids dead-lettered
]]
--#include prelude
local state_key, events_key, dead_key = KEYS[1], KEYS[2], KEYS[16]
local group, consumer, min_idle, want = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local limit, retention = tonumber(ARGV[5]), tonumber(ARGV[6])

local claimed, dead = {}, {}
local signalled = false
if redis.call('EXISTS', KEYS[18]) == 1 then want = 0 end
for _, band in ipairs({10, 9, 8, 7, 6, 5, 4, 3, 2, 1}) do
  local stream = stream_of(band)
  if want <= 0 then break end
  if redis.call('EXISTS', stream) == 1 then
    local cursor = '0-0'
    for _ = 1, 10 do
      local res = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, cursor, 'COUNT', want)
      cursor = res[1]
      for _, gone in ipairs(res[3] or {}) do
        redis.call('XACK', stream, group, gone)
      end
      for _, entry in ipairs(res[2]) do
        local entry_id, fields = entry[1], entry[2]
        local ulid, job, k = entry_fields(fields)
        local deliveries = redis.call('XPENDING', stream, group, entry_id, entry_id, 1)[1][4]
        local rec = ulid and redis.call('HGET', state_key, ulid)
        local st, attempt, prio, eid, first_ev, final_ev = read_record(rec)
        if not st or tonumber(st) >= 5 or eid ~= entry_id then
          redis.call('XACK', stream, group, entry_id)
          redis.call('XDEL', stream, entry_id)
        elseif redis.call('HEXISTS', KEYS[17], ulid) == 1 then
          local reason = redis.call('HGET', KEYS[17], ulid)
          if reason == '' then reason = 'cancelled' end
          redis.call('XACK', stream, group, entry_id)
          redis.call('XDEL', stream, entry_id)
          redis.call('HDEL', KEYS[17], ulid)
          if release(ulid, k, true) or redis.call('HEXISTS', KEYS[20], 'conc') == 1 then signalled = true end
          finish(ulid, 8, final_event(8, attempt, consumer, reason, 'Cancelled', job), attempt, prio, eid, first_ev, retention)
        elseif deliveries > limit then
          local message = 'delivered ' .. (deliveries - 1) .. ' times without an outcome (its workers died or stalled); delivery limit ' .. limit
          local event = final_event(7, attempt, consumer, message, 'DeliveryLimit', job)
          redis.call('XACK', stream, group, entry_id)
          redis.call('XDEL', stream, entry_id)
          if release(ulid, k, true) then signalled = true end
          finish(ulid, 7, event, attempt, prio, eid, first_ev, retention)
          local dead_id = redis.call('XADD', dead_key, '*', 'j', ulid, 'd', job, 'e', event, 'p', prio, 'a', attempt, 'k', k or '')
          redis.call('HSET', KEYS[26], ulid, dead_id)
          dead[#dead + 1] = ulid
        else
          activate(claimed, state_key, events_key, consumer, band, entry_id, ulid, job,
            attempt, prio, eid, first_ev, final_ev)
          want = want - 1
        end
        if want <= 0 then break end
      end
      if cursor == '0-0' or want <= 0 then break end
    end
  end
end
flush_records()
if signalled or (#dead > 0 and redis.call('HEXISTS', KEYS[20], 'conc') == 1) then
  redis.call('XADD', KEYS[15], 'MAXLEN', '~', 16, '*', 's', 'reclaim')
end
return {claimed, dead}
