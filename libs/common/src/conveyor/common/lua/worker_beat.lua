--[[ worker_beat: register or refresh a live worker (ListWorkers). One call per heartbeat.
KEYS[1] the registry set of worker ids  KEYS[2] this worker's entry
ARGV[1] worker id  ARGV[2] WorkerInfo bytes  ARGV[3] ttl ms (the entry expires unless refreshed)
]]
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
