--[[ forget_queue: take a queue out of the registry unless it was registered within the idle time.
The caller first checked, with queue_idle.lua on the queue's own keys, that the queue is idle.
A process that enqueues afterwards either registers the queue (stamping it now: refused here) or
trusts a cached registration, which is younger than the registration TTL and so than the idle
time (refused here too). Nothing of the queue is deleted: its next enqueue registers it again.
Both keys share the hash tag of keys.QUEUES (one Redis Cluster slot; ADR 0026).
KEYS[1] registry set  KEYS[2] touched zset
ARGV[1] queue  ARGV[2] idle ms  ARGV[3] "check" to change nothing (the cheap first look before queue_idle)
returns {1, "forgotten"} (or {1, "may be idle"} for a check) or {0, why it stays}
]]
local queue, idle_ms = ARGV[1], tonumber(ARGV[2])
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
if redis.call('SISMEMBER', KEYS[1], queue) == 0 then return {0, 'not registered'} end
local touched = redis.call('ZSCORE', KEYS[2], queue)
if touched and tonumber(touched) > now_ms - idle_ms then return {0, 'recently enqueued to'} end
if ARGV[3] == 'check' then return {1, 'may be idle'} end
redis.call('SREM', KEYS[1], queue)
redis.call('ZREM', KEYS[2], queue)
return {1, 'forgotten'}
