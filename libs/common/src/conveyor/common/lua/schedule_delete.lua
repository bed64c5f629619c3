-- Delete a schedule: after this no claim on it can succeed.
-- KEYS: 1 schedule hash, 2 ids zset, 3 due zset, 4 in-flight zset, 5 signal stream
-- ARGV: 1 id
-- Returns the schedule's hash (HGETALL; empty when there was none). Without a tick in flight
-- the schedule is gone at once. With one, it is marked "deleting" (hidden from Get and List,
-- no further tick can be claimed) and disappears when that tick's job is recorded
-- (schedule_fired.lua): by the deleting call itself, or, should that call fail, by the loop
-- that takes the tick over when its lease runs out. So the tick is never lost.
local key = KEYS[1]
local all = redis.call('HGETALL', key)
if #all == 0 then
  return all
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('HEXISTS', key, 'inflight') == 1 then
  redis.call('HSET', key, 'deleting', 1)
else
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[4], ARGV[1])
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100, '*', 'id', ARGV[1])
return all
