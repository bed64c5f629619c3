-- Pause a schedule: no tick comes due until it is resumed (see conveyor.common.schedules).
-- KEYS: 1 schedule hash, 2 due zset, 3 signal stream
-- ARGV: 1 id, 2 now (ms)
-- Returns {outcome, HGETALL}: 0 not found, 1 paused, 2 already paused.
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'deleting') == 1 then
  return {0, {}}
end
if redis.call('HEXISTS', key, 'paused') == 1 then
  return {2, redis.call('HGETALL', key)}
end
redis.call('HSET', key, 'paused', ARGV[2])
-- Out of the due index: no loop sees it due, none needs waking for it.
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 'id', ARGV[1])
return {1, redis.call('HGETALL', key)}
