--[[ retry_dead: put dead letters back on their queue as new attempts of the same job ids.
Each one gets a new stream entry in its band, a QUEUED event and a QUEUED live record (its
attempt count carries on), and leaves the dead-letter stream, all in one step.
KEYS as in claim.lua: [1] state [2] events [3] done [4..12] bands [16] dead
ARGV[1] ulid, or "" for every dead letter  ARGV[2] most to retry in this call
returns the ulids queued again
]]
--#include prelude
local state_key, events_key, done_key, dead_key = KEYS[1], KEYS[2], KEYS[3], KEYS[16]
local only, most = ARGV[1], tonumber(ARGV[2])

local queued = string.char(0x18) .. varint(1) .. string.char(0x2a) .. varint(#timestamp) .. timestamp

local retried = {}
local cursor = '-'
while #retried < most do
  local entries = redis.call('XRANGE', dead_key, cursor, '+', 'COUNT', 1000)
  if #entries == 0 then break end
  for _, entry in ipairs(entries) do
    local f = {}
    for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
    local ulid = f['j']
    if only == '' or ulid == only then
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
      if rec then first_ev = select(5, read_record(rec)) or event_id end
      redis.call('HSET', state_key, ulid, record_of('1', f['a'] or '0', prio, entry_id, first_ev, ''))
      redis.call('ZREM', done_key, ulid)
      redis.call('XDEL', dead_key, entry[1])
      retried[#retried + 1] = ulid
      if only ~= '' or #retried >= most then return retried end
    end
  end
  cursor = '(' .. entries[#entries][1]
end
return retried
