--[[ queue_stats: one queue's live counts by state, read at one instant (GetQueueStats, ListQueues).
Read-only. Queued and active come from each band's stream and its consumer group: entries
leave the stream when acked (complete.lua XDELs them), so the stream holds exactly the
waiting entries plus the delivered, not yet acked ones (the group's pending list).
Delayed and retry-scheduled jobs share the delayed zset; each one's live record state (2 or 4)
tells them apart, which costs one HMGET per 1000 of them.
KEYS as in claim.lua: [1] state hash [4..12] job streams, bands 1..9 [13] delayed zset
  [16] dead stream [18] paused flag [19] admitted stream [21] blocked zset [22] ready zset
Jobs held back by their rate key's limits (claim.lua) wait in per-key held sets: counted as held.
ARGV[1] consumer group of the workers
returns {time_s, time_us, paused (0|1), dead, delayed, retry_scheduled, next_due_ms ("" if none),
  oldest queued entry id ("" if none), held, active in the admitted stream, then per band 1..9: queued, active, then per consumer
  holding claims: consumer, claims (all bands)}
]]
--#include prelude
local state_key, delayed_key, dead_key, paused_key = KEYS[1], KEYS[13], KEYS[16], KEYS[18]
local group = ARGV[1]
local now = redis.call('TIME')

local bands = {}
local oldest = ''
local holders = {}
local oldest_ms, oldest_seq
for band = 1, 9 do
  local stream = KEYS[3 + band]
  local queued, active = 0, 0
  if redis.call('EXISTS', stream) == 1 then
    local length = redis.call('XLEN', stream)
    local last_delivered = '0-0'
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local info = {}
      for f = 1, #g, 2 do info[g[f]] = g[f + 1] end
      if info['name'] == group then
        active = tonumber(info['pending'])
        last_delivered = info['last-delivered-id']
      end
    end
    if active > 0 then
      -- Summary form: {count, smallest id, greatest id, {{consumer, count}, ...}}
      for _, c in ipairs(redis.call('XPENDING', stream, group)[4] or {}) do
        holders[c[1]] = (holders[c[1]] or 0) + tonumber(c[2])
      end
    end
    queued = math.max(length - active, 0)
    if queued > 0 then
      -- The oldest waiting entry: the first one after the group's last delivered id.
      local first = redis.call('XRANGE', stream, '(' .. last_delivered, '+', 'COUNT', 1)[1]
      if first then
        local ms, seq = string.match(first[1], '^(%d+)-(%d+)$')
        ms, seq = tonumber(ms), tonumber(seq)
        if oldest == '' or ms < oldest_ms or (ms == oldest_ms and seq < oldest_seq) then
          oldest, oldest_ms, oldest_seq = first[1], ms, seq
        end
      end
    end
  end
  bands[#bands + 1] = queued
  bands[#bands + 1] = active
end

local delayed, retry = 0, 0
local total = redis.call('ZCARD', delayed_key)
local chunk = 1000
for start = 0, total - 1, chunk do
  local ulids = redis.call('ZRANGE', delayed_key, start, start + chunk - 1)
  if #ulids > 0 then
    for _, rec in ipairs(redis.call('HMGET', state_key, unpack(ulids))) do
      if rec then
        local st = read_record(rec)
        if st == '2' then delayed = delayed + 1 elseif st == '4' then retry = retry + 1 end
      end
    end
  end
end
local next_due = ''
local first_due = redis.call('ZRANGE', delayed_key, 0, 0, 'WITHSCORES')
if first_due[2] then next_due = first_due[2] end

-- Held jobs: every key with some is in the ready or the blocked zset.
local held = 0
local seen = {}
local base = string.sub(state_key, 1, -6) .. 'key:held:'
for _, zset in ipairs({KEYS[22], KEYS[21]}) do
  for _, k in ipairs(redis.call('ZRANGE', zset, 0, -1)) do
    if not seen[k] then
      seen[k] = true
      held = held + redis.call('ZCARD', base .. k)
    end
  end
end
local admitted_active = 0
if redis.call('EXISTS', KEYS[19]) == 1 then
  local summary = redis.call('XPENDING', KEYS[19], group)
  admitted_active = tonumber(summary[1])
  for _, c in ipairs(summary[4] or {}) do
    holders[c[1]] = (holders[c[1]] or 0) + tonumber(c[2])
  end
end

local out = {now[1], now[2], redis.call('EXISTS', paused_key), redis.call('XLEN', dead_key), delayed, retry, next_due, oldest,
  held, admitted_active}
for _, v in ipairs(bands) do out[#out + 1] = v end
for consumer, claims in pairs(holders) do
  out[#out + 1] = consumer
  out[#out + 1] = claims
end
return out
