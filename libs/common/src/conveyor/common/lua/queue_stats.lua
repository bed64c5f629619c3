--[[ queue_stats: one queue's live counts by state, read at one instant (GetQueueStats, ListQueues).
Read-only. Queued and active come from each band's stream and its consumer group: entries
leave the stream when acked (complete.lua XDELs them), so the stream holds exactly the
waiting entries plus the delivered, not yet acked ones (the group's pending list).
Delayed and retry-scheduled jobs share the delayed zset; the retry-scheduled ones are also in
the retrying zset (complete.lua adds them, claim.lua and cancel.lua remove them), so both counts
are ZCARDs, however many jobs wait.
KEYS as in claim.lua: [1] state hash [4..12] job streams, bands 1..9 [13] delayed zset
  [16] dead stream [18] paused flag [19] admitted stream [21] blocked zset [22] ready zset
  [27] retrying zset
Jobs held back by their rate key's limits (claim.lua) wait in per-key held sets: counted as held.
ARGV[1] consumer group of the workers
returns {time_s, time_us, paused (0|1), dead, delayed, retry_scheduled, next_due_ms ("" if none),
  oldest queued entry id ("" if none), held, active in the admitted stream, then per band 1..9: queued, active, then per consumer
  holding claims: consumer, claims (all bands)}
]]
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

-- Bounded: the retrying zset holds the retry-scheduled part of the delayed zset, so two ZCARDs.
local retry = redis.call('ZCARD', KEYS[27])
local delayed = math.max(redis.call('ZCARD', delayed_key) - retry, 0)
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
