-- The in-flight tick's job exists: record it as the last tick and clear the mark.
-- KEYS: 1 schedule hash, 2 in-flight zset, 3 signal stream
-- ARGV: 1 id, 2 tick (ms), 3 job id, 4 now (ms)
-- Returns 1, or 0 when the tick is no longer in flight (recorded by another process, or deleted).
local key = KEYS[1]
if redis.call('HGET', key, 'inflight') ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HEXISTS', key, 'deleting') == 1 then
  -- Its last tick is done: a schedule being deleted goes now.
  redis.call('DEL', key)
  return 1
end
redis.call('HSET', key, 'last_tick', ARGV[2], 'last_job', ARGV[3])
redis.call('HDEL', key, 'inflight', 'inflight_spec')
-- A tick that came due while this one was in flight was held back: wake the loops for it.
local next_tick = tonumber(redis.call('HGET', key, 'next'))
if next_tick > 0 and next_tick <= tonumber(ARGV[4]) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 'id', ARGV[1])
end
return 1
