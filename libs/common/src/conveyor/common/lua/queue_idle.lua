--[[ queue_idle: whether a queue is idle, checked in one step on its own keys (its hash slot).
Idle: nothing queued or running (every band stream and the admitted stream empty: a stream holds
exactly its waiting and unacked entries), nothing delayed or retry-scheduled, nothing held by its
rate keys, no dead letter, no flow-control setting, not paused, not backed off, and every event
read by the results service (or no results service ever read it). Schedules are checked by the
caller. The registry itself is another slot: forget_queue.lua takes the queue out of it afterwards,
refusing when the queue was registered again meanwhile (see queue_registry.py and ADR 0026).
KEYS the queue's keys, as QueueKeys.script_keys():
  [1] state [2] events [3] done [4..12] bands 1..9 [13] delayed [14] parked [15] signal [16] dead
  [17] cancel [18] paused [19] admitted [20] limits [21] blocked [22] ready [23] rate keys
  [24] starts [25] backoff [26] dead index [27] retrying
ARGV[1] results consumer group
returns {1, "idle"} or {0, why it stays}
]]
local results_group = ARGV[1]
for band = 1, 9 do
  if redis.call('XLEN', KEYS[3 + band]) > 0 then return {0, 'jobs queued or running'} end
end
if redis.call('XLEN', KEYS[19]) > 0 then return {0, 'jobs running'} end
if redis.call('ZCARD', KEYS[13]) > 0 then return {0, 'jobs delayed or retry-scheduled'} end
if redis.call('XLEN', KEYS[16]) > 0 then return {0, 'dead letters'} end
if redis.call('EXISTS', KEYS[20]) == 1 then return {0, 'flow-control settings'} end
if redis.call('EXISTS', KEYS[18]) == 1 then return {0, 'paused'} end
if redis.call('EXISTS', KEYS[25]) == 1 then return {0, 'backed off'} end
-- Held jobs: every rate key with some is in the ready or the blocked zset.
local held_prefix = string.sub(KEYS[1], 1, -6) .. 'key:held:'
for _, zset in ipairs({KEYS[22], KEYS[21]}) do
  for _, k in ipairs(redis.call('ZRANGE', zset, 0, -1)) do
    if redis.call('EXISTS', held_prefix .. k) == 1 then return {0, 'jobs held by their rate key'} end
  end
end
-- Events the results service has not read and acknowledged yet.
if redis.call('EXISTS', KEYS[2]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    local info = {}
    for f = 1, #g, 2 do info[g[f]] = g[f + 1] end
    if info['name'] == results_group then
      if tonumber(info['pending']) > 0 then return {0, 'events not yet projected'} end
      if #redis.call('XRANGE', KEYS[2], '(' .. info['last-delivered-id'], '+', 'COUNT', 1) > 0 then
        return {0, 'events not yet projected'}
      end
    end
  end
end
return {1, 'idle'}
