-- Claim a schedule's due tick: compare-and-set of its next tick (see conveyor.common.schedules).
-- KEYS: 1 schedule hash, 2 due zset, 3 in-flight zset
-- ARGV: 1 id, 2 expected version, 3 expected next, 4 new next (0: none left),
--       5 tick to fire (0: none, a skipped tick), 6 lease deadline (ms)
-- Returns 1 when claimed, 0 when the schedule is gone, changed, moved on, paused, or has a tick in flight.
local key = KEYS[1]
local seen = redis.call('HMGET', key, 'version', 'next', 'inflight', 'paused')
if not seen[1] or seen[1] ~= ARGV[2] or seen[2] ~= ARGV[3] or seen[3] or seen[4] then
  return 0
end
redis.call('HSET', key, 'next', ARGV[4])
if tonumber(ARGV[4]) > 0 then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if tonumber(ARGV[5]) > 0 then
  redis.call('HSET', key, 'inflight', ARGV[5], 'inflight_spec', redis.call('HGET', key, 'spec'))
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
end
return 1
