--[[ retry_dead: put dead letters back on their queue as new attempts of the same job ids.
Each one gets a new stream entry in its band, a QUEUED event and a QUEUED live record (its
attempt count carries on), and leaves the dead-letter stream and its index, all in one step.
Bounded work: one job is found through the index (no scan); "all" takes at most ARGV[2] of
the oldest per call and says whether more are left.
KEYS as in claim.lua: [1] state [2] events [3] done [4..12] bands [16] dead [26] dead index
ARGV[1] ulid, or "" for the oldest dead letters  ARGV[2] most to retry in this call
returns {ulids queued again, more (1 when dead letters are left after an "all" call, else 0)}
]]
--#include prelude
local state_key, events_key, done_key, dead_key, index_key = KEYS[1], KEYS[2], KEYS[3], KEYS[16], KEYS[26]
local only, most = ARGV[1], tonumber(ARGV[2])

local queued = string.char(0x18) .. varint(1) .. string.char(0x2a) .. varint(#timestamp()) .. timestamp()

local retried = {}
local function requeue(entry)
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  local ulid = f['j']
  local prio = tonumber(f['p'] or '5')
  local stream = KEYS[3 + prio]
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, 'workers', '0', 'MKSTREAM')
  end
  local entry_id
  if f['k'] and f['k'] ~= '' then
    entry_id = redis.call('XADD', stream, '*', 'j', ulid, 'd', f['d'], 'k', f['k'])
  else
    entry_id = redis.call('XADD', stream, '*', 'j', ulid, 'd', f['d'])
  end
  local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', queued)
  local first_ev = event_id
  local rec = redis.call('HGET', state_key, ulid)
  if rec then
    local _, _, _, old_eid, old_first = read_record(rec)
    first_ev = old_first and first_event_id(old_eid, old_first) or event_id
  end
  redis.call('HSET', state_key, ulid, record_of('1', f['a'] or '0', prio, entry_id, first_ev, ''))
  redis.call('ZREM', done_key, ulid)
  redis.call('XDEL', dead_key, entry[1])
  redis.call('HDEL', index_key, ulid)
  retried[#retried + 1] = ulid
end

if only ~= '' then
  local dead_id = redis.call('HGET', index_key, only)
  if not dead_id then return {retried, 0} end
  local entry = redis.call('XRANGE', dead_key, dead_id, dead_id)[1]
  if entry then
    requeue(entry)
  else
    redis.call('HDEL', index_key, only)  -- stale: its entry is gone
  end
  return {retried, 0}
end

for _, entry in ipairs(redis.call('XRANGE', dead_key, '-', '+', 'COUNT', most)) do
  requeue(entry)
end
local left = redis.call('XLEN', dead_key)
if left == 0 then redis.call('DEL', index_key) end
return {retried, left > 0 and 1 or 0}
