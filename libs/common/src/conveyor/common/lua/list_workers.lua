--[[ list_workers: the entries of the live workers; forgets ids whose entry expired (dead workers).
The check and the forgetting are one step, so a worker that refreshes meanwhile is never dropped.
KEYS[1] the registry set  KEYS[2..] the entries of the ids to read (from SMEMBERS)
ARGV[1..] the ids, in the order of KEYS[2..]
returns a flat array: id, WorkerInfo bytes, for each live worker
]]
local out = {}
for i = 2, #KEYS do
  local info = redis.call('GET', KEYS[i])
  if info then
    out[#out + 1] = ARGV[i - 1]
    out[#out + 1] = info
  else
    redis.call('SREM', KEYS[1], ARGV[i - 1])
  end
end
return out
