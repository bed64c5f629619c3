--[[ forget_queue: take an idle queue out of the registry, re-checking in one step that it is idle.
Idle: registered (touched) longer ago than ARGV[2] ms, and nothing queued or running (every band
stream and the admitted stream empty: a stream holds exactly its waiting and unacked entries),
nothing delayed or retry-scheduled, nothing held by its rate keys, no dead letter, no flow-control
setting, not paused, not backed off, and every event read by the results service (or no results
service ever read it). Schedules are checked by the caller (a schedule's fire registers its queue
again). Nothing of the queue is deleted: an enqueue registers it again (register_queue.lua).
Cluster: the registry and the queue's keys are in different slots; see ADR 0015.
KEYS[1] registry set  KEYS[2] touched zset  KEYS[3..] the queue's keys, as QueueKeys.script_keys():
  [3] state [4] events [5] done [6..14] bands 1..9 [15] delayed [16] parked [17] signal [18] dead
  [19] cancel [20] paused [21] admitted [22] limits [23] blocked [24] ready [25] rate keys
  [26] starts [27] backoff [28] dead index [29] retrying
ARGV[1] queue  ARGV[2] idle ms  ARGV[3] results consumer group
returns {1, "forgotten"} or {0, why it stays}
]]
local queue, idle_ms, results_group = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)

if redis.call('SISMEMBER', KEYS[1], queue) == 0 then return {0, 'not registered'} end
local touched = redis.call('ZSCORE', KEYS[2], queue)
if touched and tonumber(touched) > now_ms - idle_ms then return {0, 'recently enqueued to'} end
for band = 1, 9 do
  if redis.call('XLEN', KEYS[5 + band]) > 0 then return {0, 'jobs queued or running'} end
end
if redis.call('XLEN', KEYS[21]) > 0 then return {0, 'jobs running'} end
if redis.call('ZCARD', KEYS[15]) > 0 then return {0, 'jobs delayed or retry-scheduled'} end
if redis.call('XLEN', KEYS[18]) > 0 then return {0, 'dead letters'} end
if redis.call('EXISTS', KEYS[22]) == 1 then return {0, 'flow-control settings'} end
if redis.call('EXISTS', KEYS[20]) == 1 then return {0, 'paused'} end
if redis.call('EXISTS', KEYS[27]) == 1 then return {0, 'backed off'} end
-- Held jobs: every rate key with some is in the ready or the blocked zset.
local held_prefix = string.sub(KEYS[3], 1, -6) .. 'key:held:'
for _, zset in ipairs({KEYS[24], KEYS[23]}) do
  for _, k in ipairs(redis.call('ZRANGE', zset, 0, -1)) do
    if redis.call('EXISTS', held_prefix .. k) == 1 then return {0, 'jobs held by their rate key'} end
  end
end
-- Events the results service has not read and acknowledged yet.
if redis.call('EXISTS', KEYS[4]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[4])) do
    local info = {}
    for f = 1, #g, 2 do info[g[f]] = g[f + 1] end
    if info['name'] == results_group then
      if tonumber(info['pending']) > 0 then return {0, 'events not yet projected'} end
      if #redis.call('XRANGE', KEYS[4], '(' .. info['last-delivered-id'], '+', 'COUNT', 1) > 0 then
        return {0, 'events not yet projected'}
      end
    end
  end
end
redis.call('SREM', KEYS[1], queue)
redis.call('ZREM', KEYS[2], queue)
return {1, 'forgotten'}
