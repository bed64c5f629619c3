-- Take over an in-flight tick whose lease ran out (its process died before recording the job).
-- KEYS: 1 schedule hash, 2 in-flight zset
-- ARGV: 1 id, 2 now (ms), 3 new lease deadline (ms)
-- Returns {tick, spec bytes}, or an empty list when there is nothing to take over.
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then
  return {}
end
local seen = redis.call('HMGET', KEYS[1], 'inflight', 'inflight_spec')
if not seen[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {}
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {seen[1], seen[2]}
