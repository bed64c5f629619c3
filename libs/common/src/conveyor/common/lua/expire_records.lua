--[[ expire_records: drop live records whose expiry passed (set by projected.lua: the retention after
the results service committed the outcome; a job not projected yet has +inf and stays).
Invariant 7 (DESIGN.md): nothing in Redis grows with the number of jobs ever run.
complete.lua does the same after each batch; this runs on a timer so idle queues shrink too.
KEYS[1] state hash  KEYS[2] done zset
ARGV[1] most records to drop in this call
returns the number dropped
]]
--#include prelude
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
if #expired > 0 then
  redis.call('HDEL', KEYS[1], unpack(expired))
  redis.call('ZREM', KEYS[2], unpack(expired))
end
return #expired
