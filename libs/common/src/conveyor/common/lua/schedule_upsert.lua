-- Create or update a schedule (see conveyor.common.schedules).
-- KEYS: 1 schedule hash, 2 ids zset, 3 due zset, 4 signal stream, 5 in-flight zset
-- ARGV: 1 id, 2 "create"|"update", 3 spec bytes, 4 timing bytes, 5 first tick if the timing is new,
--       6 anchor if the timing is new, 7 now (ms)
-- Returns {outcome, HGETALL}: 0 not found (update of a missing id), 1 created, 2 updated, 3 unchanged.
local key = KEYS[1]
local outcome
if redis.call('HEXISTS', key, 'deleting') == 1 then
  -- Deleted while its last tick was in flight: gone for Update; Create starts afresh (the old
  -- tick's job is made by its claimer, under the old tick's key, if that claimer is alive).
  if ARGV[2] ~= 'create' then
    return {0, {}}
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[5], ARGV[1])
end
if redis.call('EXISTS', key) == 0 then
  if ARGV[2] ~= 'create' then
    return {0, {}}
  end
  redis.call('HSET', key, 'spec', ARGV[3], 'timing', ARGV[4], 'next', ARGV[5], 'anchor', ARGV[6],
    'version', 1, 'created', ARGV[7], 'updated', ARGV[7])
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
  outcome = 1
elseif redis.call('HGET', key, 'spec') == ARGV[3] then
  return {3, redis.call('HGETALL', key)}
else
  if redis.call('HGET', key, 'timing') == ARGV[4] then
    -- Only the template or the policy changed: the ticks stay where they are.
    redis.call('HSET', key, 'spec', ARGV[3], 'updated', ARGV[7])
  else
    redis.call('HSET', key, 'spec', ARGV[3], 'timing', ARGV[4], 'next', ARGV[5], 'anchor', ARGV[6],
      'updated', ARGV[7])
  end
  redis.call('HINCRBY', key, 'version', 1)
  outcome = 2
end
local next_tick = tonumber(redis.call('HGET', key, 'next'))
-- A paused schedule stays out of the due index (ResumeSchedule computes its next tick afresh).
if next_tick > 0 and redis.call('HEXISTS', key, 'paused') == 0 then
  redis.call('ZADD', KEYS[3], next_tick, ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 100, '*', 'id', ARGV[1])
return {outcome, redis.call('HGETALL', key)}
