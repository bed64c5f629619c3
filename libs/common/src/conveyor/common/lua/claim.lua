--[[ claim: promote due delayed jobs, then take up to COUNT waiting jobs, highest priority
band first, and mark them ACTIVE, within the queue's flow-control limits.
Promotion is atomic here, so whichever worker gets there first promotes a due job, once
(no scheduler process to lose). Each claimed job gets attempt + 1, state ACTIVE, this
consumer as owner and an ACTIVE event in the same step.
Flow control (prelude): a paused or backed-off queue, a full whole-queue rate window or
concurrency cap claim nothing (the caller waits for a signal or the returned wake-up time,
it does not poll). A job whose rate key may not start now is held: its entry leaves the
stream for the key's held set (ordered by band, then by entry id) and its record's entry is
"h"; once the key may start again, its held jobs come before anything still in the stream of
the same band (they were read first), through the admitted stream ("band" 10). So a limited
job keeps its place and priority, no worker holds it, and other keys run beside it.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset  KEYS[4..12] job streams, bands 1..9
KEYS[13] delayed zset  KEYS[14] parked hash  KEYS[15] signal stream  KEYS[18] paused flag
KEYS[19..25] flow control (see prelude)  KEYS[27] retrying zset (the retry-scheduled part of delayed)
ARGV[1] consumer group  ARGV[2] consumer (worker id)  ARGV[3] count
returns {claimed, wait_from, next_due}:
  claimed: flat array, 6 values per job: band, entry id, ulid, attempt, Job bytes, ACTIVE event id
  wait_from: when nothing was claimed, the last generated id of each band 1..9 and of the
    signal stream ("0-0" when a stream does not exist; "" for a band not worth waiting on,
    because the whole queue may start nothing now), so the caller can block without a gap
  next_due: ms when the caller should claim again even without a new entry or signal: the
    earliest delayed job, rate window or back-off end ("" when none)
]]
--#include prelude
local state_key, events_key, delayed_key, parked_key, signal_key = KEYS[1], KEYS[2], KEYS[13], KEYS[14], KEYS[15]
local blocked_key, ready_key, keys_key = KEYS[21], KEYS[22], KEYS[23]
local group, consumer, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- Most entries one call reads (held ones included) before it returns and is called again.
local MAX_SCAN = 1000
-- Held jobs are ordered by (9 - band) * BAND_SPAN + entry ms: higher bands first, then FIFO.
local BAND_SPAN = 1e13

local wake_at = nil
local function wake(t)
  if t and t > 0 and (not wake_at or t < wake_at) then wake_at = t end
end

-- Promote due jobs: JobEvent{type: QUEUED, time} for each.
local due = redis.call('ZRANGEBYSCORE', delayed_key, '-inf', now_ms, 'LIMIT', 0, 1000)
for _, ulid in ipairs(due) do
  local job = redis.call('HGET', parked_key, ulid)
  local rec = redis.call('HGET', state_key, ulid)
  local st, attempt, prio, eid, first_ev, final_ev = read_record(rec)
  if job and (st == '2' or st == '4') then
    local stream = KEYS[3 + tonumber(prio)]
    if redis.call('EXISTS', stream) == 0 then
      redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    end
    local k = redis.call('HGET', keys_key, ulid)
    local entry_id
    if k then
      redis.call('HDEL', keys_key, ulid)
      entry_id = redis.call('XADD', stream, '*', 'j', ulid, 'd', job, 'k', k)
    else
      entry_id = redis.call('XADD', stream, '*', 'j', ulid, 'd', job)
    end
    redis.call('XADD', events_key, '*', 'j', ulid, 'e', string.char(0x18) .. varint(1) .. bytes_field(0x2a, timestamp()))
    redis.call('HSET', state_key, ulid, record_of('1', attempt, prio, entry_id, first_event_id(eid, first_ev), final_ev))
  end
  redis.call('HDEL', parked_key, ulid)
  redis.call('ZREM', delayed_key, ulid)
  redis.call('ZREM', KEYS[27], ulid)
end

-- Sliding windows of start times (lists, newest first). The queue's window takes this call's
-- starts at the end in one LPUSH, counted meanwhile in `pending`; expired times are trimmed
-- only when the list could be full: while even counting them there is room, one LLEN decides
-- (so a window holds at most `n` times, and an idle one expires with its period).
local pending, touched = {}, {}
-- Drop the times of `list` (`len` long) that left the window; returns the length kept.
local function window_trim(list, len, period)
  local cutoff = now_ms - period
  if len == 0 or tonumber(redis.call('LINDEX', list, -1)) > cutoff then return len end
  -- Binary search for the first expired time (times only decrease towards the tail).
  local lo, hi = 0, len - 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if tonumber(redis.call('LINDEX', list, mid)) <= cutoff then hi = mid else lo = mid + 1 end
  end
  if lo == 0 then redis.call('DEL', list) else redis.call('LTRIM', list, 0, lo - 1) end
  return lo
end
local function window_free(list, rate, wanted)
  local n, period = rate[1], rate[2]
  local p = pending[list] or 0
  local len = redis.call('LLEN', list)
  if len + p + wanted <= n then return n - len - p, 0 end
  len = window_trim(list, len, period)
  local used = len + p
  if used < n then return n - used, 0 end
  -- Full: the next start may come when the n-th newest start leaves the window.
  local nth = n - 1 - p
  if nth < 0 then return 0, now_ms + period end
  return 0, tonumber(redis.call('LINDEX', list, nth)) + period
end
local function window_add(list, rate)
  pending[list] = (pending[list] or 0) + 1
  touched[list] = rate[2]
end
-- One start in a key's window, taken push-first: the LPUSH's reply is the count, so a key
-- with room costs one command. Returns 0 when taken, else the ms when the window frees up
-- (the start is taken back).
local function window_take(list, rate)
  local n, period = rate[1], rate[2]
  local len = redis.call('LPUSH', list, now_ms)
  touched[list] = period
  if len <= n then return 0 end
  if window_trim(list, len, period) <= n then return 0 end
  redis.call('LPOP', list)
  return tonumber(redis.call('LINDEX', list, n - 1)) + period
end
local function window_flush()
  for list, m in pairs(pending) do
    local stamps = {}
    for i = 1, m do stamps[i] = now_ms end
    redis.call('LPUSH', list, unpack(stamps))
  end
  for list, period in pairs(touched) do redis.call('PEXPIRE', list, period) end
end

-- Whole-queue gates: when one is closed, nothing is worth reading (gated).
local claimed = {}
local gated = false
local L = flow_limits()
local keyed_limits = L['key_rate'] or L['key_conc']
if not keyed_limits then
  for field in pairs(L) do
    if string.find(field, ':', 1, true) then keyed_limits = true; break end
  end
end
local has_backoffs = redis.call('EXISTS', KEYS[25]) == 1
local has_held = any_held()

-- Rate key k's limits and key names, worked out once per call:
-- {cap or false, rate or false, running set or false, start window or false}. A key's running
-- set is kept only while a cap applies to it (setting one fills it: limits.lua).
local key_limits = {}
local function limits_of(k)
  local lim = key_limits[k]
  if not lim then
    local conc = L['conc:' .. k] or L['key_conc']
    local rate = parse_rate(L['rate:' .. k] or L['key_rate'])
    lim = {conc and tonumber(conc) or false, rate or false, conc and key_key('run', k) or false,
      rate and key_key('starts', k) or false}
    key_limits[k] = lim
  end
  return lim
end

-- Jobs running across all workers when this call began plus the most it may start: no key
-- with a cap at least this high can reach it in this call, so its running set need not be
-- counted (the set holds at most the running jobs, and never-binding caps cost no SCARD).
local running_bound = nil
local function may_reach(cap)
  if not running_bound then running_bound = running_count() + want end
  return cap < running_bound
end

-- 0 when a job of rate key `k` may start now (its start is then already counted in the key's
-- rate window), else the ms to look at the key again (its rate window frees up, or a back-off
-- ends; at its cap: a finishing job wakes it, 5 s at the latest).
local function key_wait(k)
  if has_backoffs then
    local b = backed_off(k)
    if b > 0 then return b end
  end
  if not keyed_limits then return 0 end
  local lim = limits_of(k)
  local conc, rate = lim[1], lim[2]
  if conc and may_reach(conc) then
    local run = lim[3]
    if redis.call('SCARD', run) >= conc then
      -- A member no longer running (whatever ended it) must not hold a slot: the set heals itself.
      -- (A job this call started counts: is_active reads this call's own writes first.)
      for _, u in ipairs(redis.call('SMEMBERS', run)) do
        if not is_active(u) then redis.call('SREM', run, u) end
      end
      if redis.call('SCARD', run) >= conc then return now_ms + 5000 end
    end
  end
  if rate then return window_take(lim[4], rate) end
  return 0
end

-- Count a start against the queue's rate and the key's cap (key_wait took its rate window).
local qrate = parse_rate(L['rate'])
local function note_start(k, ulid)
  if qrate then window_add(KEYS[24], qrate) end
  if k and keyed_limits then
    local run = limits_of(k)[3]
    if run then redis.call('SADD', run, ulid) end
  end
end

if redis.call('EXISTS', KEYS[18]) == 1 then want = 0; gated = true end
if want > 0 and has_backoffs then
  redis.call('ZREMRANGEBYSCORE', KEYS[25], '-inf', now_ms)
  has_backoffs = redis.call('EXISTS', KEYS[25]) == 1
  local b = backed_off('')
  if b > 0 then want = 0; gated = true; wake(b) end
end
if want > 0 and qrate then
  local free, until_ms = window_free(KEYS[24], qrate, want)
  if free <= 0 then want = 0; gated = true; wake(until_ms) elseif free < want then want = free end
end
if want > 0 and L['conc'] then
  -- At the cap, a finishing job signals (complete.lua).
  local running = running_count()
  local free = tonumber(L['conc']) - running
  if free <= 0 then want = 0; gated = true elseif free < want then want = free end
  running_bound = running + want
end

-- Keys whose wait is over may start held jobs again (each is checked again when its turn comes).
if want > 0 and redis.call('EXISTS', blocked_key) == 1 then
  for _, k in ipairs(redis.call('ZRANGEBYSCORE', blocked_key, '-inf', now_ms, 'LIMIT', 0, 1000)) do
    redis.call('ZREM', blocked_key, k)
    local head = redis.call('ZRANGE', key_key('held', k), 0, 0, 'WITHSCORES')
    if head[2] then redis.call('ZADD', ready_key, head[2], k) end
  end
end

-- Start an attempt of a held job of key k that may start now (its head), via the admitted stream.
local function start_held(k)
  local held = key_key('held', k)
  local ulid = redis.call('ZRANGE', held, 0, 0)[1]
  if not ulid then
    redis.call('ZREM', ready_key, k)
    return false
  end
  redis.call('ZREM', held, ulid)
  local next_head = redis.call('ZRANGE', held, 0, 0, 'WITHSCORES')
  if next_head[2] then redis.call('ZADD', ready_key, next_head[2], k) else redis.call('ZREM', ready_key, k) end
  local job = redis.call('HGET', parked_key, ulid)
  redis.call('HDEL', parked_key, ulid)
  local rec = redis.call('HGET', state_key, ulid)
  local st, attempt, prio, eid, first_ev, final_ev = read_record(rec)
  if not job or st ~= '1' or eid ~= 'h' then  -- cancelled or expired while held
    redis.call('HDEL', keys_key, ulid)
    return false
  end
  if redis.call('EXISTS', KEYS[19]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[19], group, '$', 'MKSTREAM')
  end
  redis.call('HDEL', keys_key, ulid)
  local entry_id = redis.call('XADD', KEYS[19], '*', 'j', ulid, 'd', job, 'k', k)
  redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', KEYS[19], '>')
  activate(claimed, state_key, events_key, consumer, 10, entry_id, ulid, job,
    attempt, prio, entry_id, first_event_id(eid, first_ev), final_ev)
  note_start(k, ulid)
  want = want - 1
  return true
end

local scanned = 0
for band = 9, 1, -1 do
  if want <= 0 then break end
  -- Held jobs whose key may start: older than anything still in this band's stream.
  while want > 0 and has_held do
    local top = redis.call('ZRANGE', ready_key, 0, 0, 'WITHSCORES')
    if not top[2] or 9 - math.floor(tonumber(top[2]) / BAND_SPAN) < band then break end
    local k = top[1]
    local wait = key_wait(k)
    if wait > 0 then
      redis.call('ZREM', ready_key, k)
      redis.call('ZADD', blocked_key, wait, k)
    elseif not start_held(k) then
      -- Nothing started after all: give back the start key_wait took in the key's window.
      local lim = keyed_limits and limits_of(k)
      if lim and lim[2] then redis.call('LPOP', lim[4]) end
    end
  end
  local stream = KEYS[3 + band]
  while want > 0 and scanned < MAX_SCAN and redis.call('EXISTS', stream) == 1 do
    local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', stream, '>')
    if not res or #res[1][2] == 0 then break end
    local entries = res[1][2]
    -- The records of everything read, in one command.
    local parsed, ulids = {}, {}
    for i, entry in ipairs(entries) do
      local ulid, job, k = entry_fields(entry[2])
      parsed[i] = {ulid, job, k}
      ulids[i] = ulid or ''
    end
    local recs = redis.call('HMGET', state_key, unpack(ulids))
    for i, entry in ipairs(entries) do
      scanned = scanned + 1
      local entry_id = entry[1]
      local ulid, job, k = parsed[i][1], parsed[i][2], parsed[i][3]
      local rec = ulid and recs[i]
      local st, attempt, prio, eid, first_ev, final_ev = read_record(rec)
      local wait = 0
      if k and st == '1' and eid == entry_id then
        -- Behind the key's held jobs (FIFO per key), or the key may not start now.
        if has_held and redis.call('EXISTS', key_key('held', k)) == 1 then wait = -1 else wait = key_wait(k) end
      end
      if not st or tonumber(st) >= 5 or eid ~= entry_id then
        -- Cancelled, expired or superseded while waiting: never run it.
        redis.call('XACK', stream, group, entry_id)
        redis.call('XDEL', stream, entry_id)
      elseif wait ~= 0 then
        local order = (9 - band) * BAND_SPAN + tonumber(string.match(entry_id, '^(%d+)'))
        redis.call('XACK', stream, group, entry_id)
        redis.call('XDEL', stream, entry_id)
        redis.call('HSET', parked_key, ulid, job)
        redis.call('HSET', keys_key, ulid, k)
        redis.call('ZADD', key_key('held', k), order, ulid)
        has_held = true
        redis.call('HSET', state_key, ulid, record_of('1', attempt, prio, 'h', first_event_id(eid, first_ev), final_ev))
        if wait > 0 then
          redis.call('ZADD', blocked_key, wait, k)
        else
          redis.call('ZADD', ready_key, 'XX', 'LT', order, k)
        end
      else
        activate(claimed, state_key, events_key, consumer, band, entry_id, ulid, job,
          attempt, prio, eid, first_ev, final_ev)
        if qrate or (k and keyed_limits) then note_start(k, ulid) end
        want = want - 1
      end
    end
  end
end

window_flush()
flush_records()

local wait_from = {}
local next_due = ''
if #claimed == 0 then
  local function last_id(stream)
    if redis.call('EXISTS', stream) == 0 then return '0-0' end
    local info = redis.call('XINFO', 'STREAM', stream)
    for f = 1, #info, 2 do
      if info[f] == 'last-generated-id' then return info[f + 1] end
    end
    return '0-0'
  end
  for band = 1, 9 do
    if gated then wait_from[band] = '' else wait_from[band] = last_id(KEYS[3 + band]) end
  end
  wait_from[10] = last_id(signal_key)
  local first = redis.call('ZRANGE', delayed_key, 0, 0, 'WITHSCORES')
  if first[2] then wake(tonumber(first[2])) end
  local blocked_first = redis.call('ZRANGE', blocked_key, 0, 0, 'WITHSCORES')
  if blocked_first[2] then wake(tonumber(blocked_first[2])) end
  if scanned >= MAX_SCAN then wake(now_ms) end
  if wake_at then next_due = string.format('%d', wake_at) end
end
return {claimed, wait_from, next_due}
