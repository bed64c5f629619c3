-- prelude: shared by the scripts whose source says "--#include prelude" (scripts.py splices it in).
-- Protobuf encoding for the few JobEvent fields the scripts write themselves, and the time of
-- this call (Redis's clock, so every script agrees however the clients' clocks drift).
local function varint(v)
  local parts = {}
  while v >= 128 do
    parts[#parts + 1] = string.char(v % 128 + 128)
    v = math.floor(v / 128)
  end
  parts[#parts + 1] = string.char(v)
  return table.concat(parts)
end
local function bytes_field(tag, s) return string.char(tag) .. varint(#s) .. s end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
-- google.protobuf.Timestamp{seconds, nanos} of now, ready to wrap as JobEvent.time (tag 0x2a).
local timestamp = string.char(0x08) .. varint(tonumber(now[1])) .. string.char(0x10) .. varint(tonumber(now[2]) * 1000)
-- A live record: state|attempt|priority|entry id|first event id|final event id[|consumer]
local RECORD = '^(%d+)|(%d+)|(%d+)|([^|]*)|([^|]*)|([^|]*)'

-- Start an attempt of a claimed entry: attempt + 1, record ACTIVE owned by `consumer`, an ACTIVE
-- event; appends the 6 values claim/reclaim return per job to `out`. The attempt number and the
-- consumer are the claim's fencing token (complete.lua). `rec` is the string.match of RECORD.
local function activate(out, state_key, events_key, consumer, band, entry_id, ulid, job, rec)
  local attempt = tonumber(rec[2]) + 1
  -- JobEvent{type: ACTIVE, attempt, time, worker}; the job id is the entry's j field.
  local event = string.char(0x18) .. varint(2) .. string.char(0x20) .. varint(attempt)
    .. bytes_field(0x2a, timestamp) .. bytes_field(0x32, consumer)
  local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', event)
  redis.call('HSET', state_key, ulid, '3|' .. attempt .. '|' .. rec[3] .. '|' .. rec[4] .. '|' .. rec[5] .. '|' .. rec[6] .. '|' .. consumer)
  for _, v in ipairs({band, entry_id, ulid, attempt, job, event_id}) do out[#out + 1] = v end
end

-- Flow control (rate limits, concurrency caps, back-offs). Per-queue KEYS, as in keys.py:
-- [19] admitted stream  [20] limits hash  [21] blocked zset  [22] ready zset  [23] rate keys hash
-- [24] queue start window  [25] back-offs zset (member "" = the whole queue, else a rate key).
-- The job stream of a claim's band: 1..9 are the priority bands, 10 the admitted stream.
local function stream_of(band)
  if band == 10 then return KEYS[19] end
  return KEYS[3 + band]
end
-- Per-key keys share the queue's hash tag: "conveyor:{q}:key:<kind>:<rate key>".
local function key_key(kind, k) return string.sub(KEYS[1], 1, -6) .. 'key:' .. kind .. ':' .. k end

-- The flow-control settings, parsed: rate/key_rate as {n, period ms}, conc/key_conc as numbers,
-- overrides under rate:<k> and conc:<k> kept as strings ("n:period" and "n").
local function flow_limits()
  local raw = redis.call('HGETALL', KEYS[20])
  local L = {}
  for i = 1, #raw, 2 do L[raw[i]] = raw[i + 1] end
  return L
end
local function parse_rate(spec)
  if not spec then return nil end
  local n, p = string.match(spec, '^(%d+):(%d+)$')
  return {tonumber(n), tonumber(p)}
end

-- Sliding window of start times (a list, newest first, at most `n` long): how many more may
-- start now, or 0 and the ms when the next one may.
local function window_free(list, rate)
  local n, period = rate[1], rate[2]
  local cutoff = now_ms - period
  while true do
    local oldest = redis.call('LINDEX', list, -1)
    if not oldest or tonumber(oldest) > cutoff then break end
    redis.call('RPOP', list)
  end
  local used = redis.call('LLEN', list)
  if used < n then return n - used, 0 end
  return 0, tonumber(redis.call('LINDEX', list, n - 1)) + period
end
local function window_add(list, rate)
  redis.call('LPUSH', list, now_ms)
  redis.call('LTRIM', list, 0, rate[1] - 1)
  redis.call('PEXPIRE', list, rate[2])
end

-- The ms until which a back-off holds `member` ("" = the whole queue), or 0.
local function backed_off(member)
  local until_ms = redis.call('ZSCORE', KEYS[25], member)
  if until_ms and tonumber(until_ms) > now_ms then return tonumber(until_ms) end
  return 0
end

-- Jobs running now across all workers: the pending entries of every job stream (an entry is
-- pending from its claim to its outcome, so nothing has to be counted by hand or given back).
local function running_count()
  local n = 0
  for band = 1, 10 do
    local stream = stream_of(band)
    if redis.call('EXISTS', stream) == 1 then n = n + redis.call('XPENDING', stream, 'workers')[1] end
  end
  return n
end

-- 0 when a job of rate key `k` may start now, else the ms to look at the key again (its rate
-- window frees up, or a back-off ends; at its cap: a finishing job wakes it, 5 s at the latest).
local function key_wait(L, k)
  local b = backed_off(k)
  if b > 0 then return b end
  local conc = L['conc:' .. k] or L['key_conc']
  if conc then
    conc = tonumber(conc)
    local run = key_key('run', k)
    if redis.call('SCARD', run) >= conc then
      -- A member no longer running (whatever ended it) must not hold a slot: the set heals itself.
      for _, u in ipairs(redis.call('SMEMBERS', run)) do
        local rec = redis.call('HGET', KEYS[1], u)
        if not rec or string.sub(rec, 1, 2) ~= '3|' then redis.call('SREM', run, u) end
      end
      if redis.call('SCARD', run) >= conc then return now_ms + 5000 end
    end
  end
  local rate = parse_rate(L['rate:' .. k] or L['key_rate'])
  if rate then
    local free, until_ms = window_free(key_key('starts', k), rate)
    if free <= 0 then return until_ms end
  end
  return 0
end

-- Count a start against the queue's and the key's limits.
local function note_start(L, k, ulid)
  local qrate = parse_rate(L['rate'])
  if qrate then window_add(KEYS[24], qrate) end
  if k then
    redis.call('SADD', key_key('run', k), ulid)
    local rate = parse_rate(L['rate:' .. k] or L['key_rate'])
    if rate then window_add(key_key('starts', k), rate) end
  end
end

-- A job stopped running (any outcome, cancel, dead letter): give its key's slot back. When
-- the key has jobs held back, make the next claim look at it now; returns true then (the
-- caller signals the workers). `final`: the job is done, forget its key.
local function release(ulid, final)
  local k = redis.call('HGET', KEYS[23], ulid)
  if not k then return false, nil end
  redis.call('SREM', key_key('run', k), ulid)
  if final then redis.call('HDEL', KEYS[23], ulid) end
  if redis.call('EXISTS', key_key('held', k)) == 1 then
    redis.call('ZADD', KEYS[21], 'XX', now_ms, k)
    return true, k
  end
  return false, k
end
