-- Resume a paused schedule from its next tick after now (see conveyor.common.schedules).
-- KEYS: 1 schedule hash, 2 due zset, 3 signal stream
-- ARGV: 1 id, 2 the version the next tick was computed for, 3 next tick (ms, 0: none left)
-- Returns {outcome, HGETALL}: 0 not found, 1 resumed, 2 not paused, 3 the spec changed meanwhile
-- (compute the next tick again).
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'deleting') == 1 then
  return {0, {}}
end
if redis.call('HEXISTS', key, 'paused') == 0 then
  return {2, redis.call('HGETALL', key)}
end
if redis.call('HGET', key, 'version') ~= ARGV[2] then
  return {3, {}}
end
redis.call('HDEL', key, 'paused')
redis.call('HSET', key, 'next', ARGV[3])
if tonumber(ARGV[3]) > 0 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 'id', ARGV[1])
return {1, redis.call('HGETALL', key)}
