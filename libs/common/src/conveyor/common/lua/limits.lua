--[[ limits: read or change a queue's flow-control settings (AdminService, a handler's back-off).
Settings live in the limits hash (fields rate, conc, key_rate, key_conc, rate:<key>, conc:<key>;
a rate as "n:period ms", a cap as "n"). Any change makes every held-back key be looked at
again by the next claim and wakes the workers, so a raised or removed limit takes effect at once.
KEYS as in claim.lua ([1] state [4..12] bands [15] signal [19..25] flow control)
ARGV[1] operation:
  set <field> <value>       returns 1
  clear <field>             returns 1 if it existed, else 0
  backoff <member> <ms>     member "" = the whole queue, else a rate key; a later end already
                            in force is kept; returns the end (ms)
  clearbackoff <member>     ends that back-off now and wakes the workers (held keys are looked
                            at again); returns 1 if one was in force, else 0
  get                       returns {limits hash as a flat array, back-offs (member, end ms)...,
                            blocked keys (key, until ms, held jobs)... (at most 100), running}
]]
--#include prelude
local op = ARGV[1]

local function wake_all()
  local blocked = redis.call('ZRANGE', KEYS[21], 0, -1)
  for _, k in ipairs(blocked) do redis.call('ZADD', KEYS[21], now_ms, k) end
  redis.call('XADD', KEYS[15], 'MAXLEN', '~', 16, '*', 's', 'limits')
end

-- Claims keep a key's running set only while a cap applies to the key, so a new cap first
-- counts the key's jobs running now (`only` = that key, or nil for every key): each pending
-- entry of the consumer group whose job is ACTIVE. Atomic with the change, so no claim can
-- start a job the cap would have refused.
local function fill_running(only)
  for band = 1, 10 do
    local stream = stream_of(band)
    local from = '-'
    while true do
      local pel = redis.pcall('XPENDING', stream, 'workers', from, '+', 1000)
      if type(pel) ~= 'table' or #pel == 0 then break end
      for _, p in ipairs(pel) do
        local entry = redis.call('XRANGE', stream, p[1], p[1])[1]
        local ulid, _, k = entry_fields(entry and entry[2])
        if ulid and k and k ~= '' and (not only or k == only) and is_active(ulid) then
          redis.call('SADD', key_key('run', k), ulid)
        end
      end
      from = '(' .. pel[#pel][1]
    end
  end
end

if op == 'set' then
  local field = ARGV[2]
  if field == 'key_conc' then
    fill_running(nil)
  elseif string.sub(field, 1, 5) == 'conc:' then
    fill_running(string.sub(field, 6))
  end
  redis.call('HSET', KEYS[20], field, ARGV[3])
  wake_all()
  return 1
elseif op == 'clear' then
  local n = redis.call('HDEL', KEYS[20], ARGV[2])
  if ARGV[2] == 'rate' then redis.call('DEL', KEYS[24]) end
  wake_all()
  return n
elseif op == 'backoff' then
  local member, until_ms = ARGV[2], now_ms + tonumber(ARGV[3])
  redis.call('ZADD', KEYS[25], 'GT', until_ms, member)
  redis.call('XADD', KEYS[15], 'MAXLEN', '~', 16, '*', 's', 'backoff')
  return tonumber(redis.call('ZSCORE', KEYS[25], member))
elseif op == 'clearbackoff' then
  local until_ms = redis.call('ZSCORE', KEYS[25], ARGV[2])
  redis.call('ZREM', KEYS[25], ARGV[2])
  wake_all()
  if until_ms and tonumber(until_ms) > now_ms then return 1 end
  return 0
elseif op == 'get' then
  redis.call('ZREMRANGEBYSCORE', KEYS[25], '-inf', now_ms)
  local backoffs = {}
  local b = redis.call('ZRANGE', KEYS[25], 0, 99, 'WITHSCORES')
  for i = 1, #b, 2 do
    backoffs[#backoffs + 1] = b[i]
    backoffs[#backoffs + 1] = string.format('%d', tonumber(b[i + 1]))
  end
  local blocked = {}
  local raw = redis.call('ZRANGE', KEYS[21], 0, 99, 'WITHSCORES')
  for i = 1, #raw, 2 do
    blocked[#blocked + 1] = raw[i]
    blocked[#blocked + 1] = string.format('%d', math.max(tonumber(raw[i + 1]), now_ms))
    blocked[#blocked + 1] = redis.call('ZCARD', key_key('held', raw[i]))
  end
  return {redis.call('HGETALL', KEYS[20]), backoffs, blocked, running_count()}
end
return redis.error_reply('unknown operation ' .. tostring(op))
