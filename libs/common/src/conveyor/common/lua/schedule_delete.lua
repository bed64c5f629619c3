-- Delete a schedule: after this no claim on it can succeed.
-- KEYS: 1 schedule hash, 2 ids zset, 3 due zset, 4 in-flight zset, 5 signal stream
-- ARGV: 1 id
-- Returns the deleted hash (HGETALL; empty when there was none), in-flight tick included.
local key = KEYS[1]
local all = redis.call('HGETALL', key)
if #all == 0 then
  return all
end
redis.call('DEL', key)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100, '*', 'id', ARGV[1])
return all
