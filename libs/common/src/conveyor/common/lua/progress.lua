--[[ progress: append a PROGRESS event while this consumer still owns the job's entry.
KEYS[1] events stream  KEYS[2] the job's stream (its band)
ARGV[1] consumer group  ARGV[2] consumer  ARGV[3] entry id  ARGV[4] ulid  ARGV[5] JobEvent bytes
returns the event id, or 0 when this consumer no longer owns the entry
]]
local pending = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[3], ARGV[3], 1)
local owner = pending[1]
if not owner or owner[2] ~= ARGV[2] then
  return 0
end
return redis.call('XADD', KEYS[1], '*', 'j', ARGV[4], 'e', ARGV[5])
