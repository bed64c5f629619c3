--[[ register_queue: put a queue in the registry (keys.QUEUES) and note when (keys.QUEUES_TOUCHED).
Called on enqueue at most once per registration TTL per queue per process (queue_registry.py);
forget_queue.lua refuses a queue touched within its idle time, which is longer than that TTL,
so no process can hold a cached registration of a queue that has been forgotten.
KEYS[1] registry set  KEYS[2] touched zset (queue -> ms of its last registration)
ARGV[1] queue
returns 1 when the queue was not registered
]]
local now = redis.call('TIME')
redis.call('ZADD', KEYS[2], now[1] * 1000 + math.floor(now[2] / 1000), ARGV[1])
return redis.call('SADD', KEYS[1], ARGV[1])
