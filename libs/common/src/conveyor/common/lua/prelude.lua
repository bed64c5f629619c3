-- prelude: shared by the scripts whose source says "--#include prelude" (scripts.py splices it in):
-- records.lua, this call's time in ms, and the claim, finish and flow-control helpers.
--#include records
local now_ms = tonumber(time_now()[1]) * 1000 + math.floor(tonumber(time_now()[2]) / 1000)

-- Start an attempt of a claimed entry: attempt + 1, record ACTIVE owned by `consumer`, an ACTIVE
-- event; appends the 6 values claim/reclaim return per job to `out`. The attempt number and the
-- consumer are the claim's fencing token (complete.lua). The rest is the job's record as read.
-- JobEvent{type: ACTIVE, attempt, time, worker}: all but the attempt is the same for every job of
-- a call, so it is built once (the job id is the entry's j field).
local ACTIVE_HEAD = string.char(0x18, 2, 0x20)
local active_tail, active_consumer = nil, nil
local function activate(out, state_key, events_key, consumer, band, entry_id, ulid, job, prev_attempt, prio, eid, first_ev, final_ev)
  local attempt = tonumber(prev_attempt) + 1
  if active_consumer ~= consumer then
    active_tail, active_consumer = bytes_field(0x2a, timestamp()) .. bytes_field(0x32, consumer), consumer
  end
  local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', ACTIVE_HEAD .. varint(attempt) .. active_tail)
  put_record(ulid, record_of('3', attempt, prio, eid, first_ev, final_ev, consumer))
  local m = #out
  out[m + 1], out[m + 2], out[m + 3], out[m + 4], out[m + 5], out[m + 6] = band, entry_id, ulid, attempt, job, event_id
end

-- A final event written inside Redis: JobEvent{type, attempt, time, worker, error{message, kind}, job}.
local function final_event(event_type, attempt, consumer, message, kind, job)
  local err = bytes_field(0x0a, message) .. bytes_field(0x12, kind)
  return string.char(0x18) .. varint(event_type) .. string.char(0x20) .. varint(tonumber(attempt))
    .. bytes_field(0x2a, timestamp()) .. bytes_field(0x32, consumer) .. bytes_field(0x52, err) .. bytes_field(0x62, job)
end

-- End a job inside Redis: its final event, its final record (written by flush_records), kept
-- until the results service has committed the outcome to PostgreSQL: the done set's score is
-- +inf until projected.lua sets the expiry (retention counts from projection; ``retention`` is
-- the results service's to apply). KEYS[1..3] as in every queue script. Returns the event id.
local function finish(ulid, state, event, attempt, prio, eid, first_ev, retention)
  local event_id = redis.call('XADD', KEYS[2], '*', 'j', ulid, 'e', event)
  put_record(ulid, record_of(state, attempt, prio, eid, first_ev, event_id))
  redis.call('ZADD', KEYS[3], '+inf', ulid)
  return event_id
end

-- Flow control (rate limits, concurrency caps, back-offs). Per-queue KEYS, as in keys.py:
-- [19] admitted stream  [20] limits hash  [21] blocked zset  [22] ready zset
-- [23] rate keys of parked and held jobs (a job in a stream carries its key as field k)
-- [24] queue start window  [25] back-offs zset (member "" = the whole queue, else a rate key).
-- The job stream of a claim's band: 1..9 are the priority bands, 10 the admitted stream.
local function stream_of(band)
  if band == 10 then return KEYS[19] end
  return KEYS[3 + band]
end
-- Per-key keys share the queue's hash tag: "conveyor:{q}:key:<kind>:<rate key>".
local key_base = nil
local function key_key(kind, k)
  if not key_base then key_base = string.sub(KEYS[1], 1, -6) .. 'key:' end
  return key_base .. kind .. ':' .. k
end

-- The flow-control settings, parsed: rate/key_rate as {n, period ms}, conc/key_conc as numbers,
-- overrides under rate:<k> and conc:<k> kept as strings ("n:period" and "n").
local function flow_limits()
  local raw = redis.call('HGETALL', KEYS[20])
  local L = {}
  for i = 1, #raw, 2 do L[raw[i]] = raw[i + 1] end
  return L
end
-- Parsed once per spec and call: every key under the same default shares one.
local parsed_rates = {}
local function parse_rate(spec)
  if not spec then return nil end
  local rate = parsed_rates[spec]
  if not rate then
    local n, p = string.match(spec, '^(%d+):(%d+)$')
    rate = {tonumber(n), tonumber(p)}
    parsed_rates[spec] = rate
  end
  return rate
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
    -- A stream that does not exist (yet) is an error reply: cheaper than asking EXISTS first.
    local summary = redis.pcall('XPENDING', stream_of(band), 'workers')
    if type(summary) == 'table' and summary[1] then n = n + summary[1] end
  end
  return n
end

-- A job of rate key `k` stopped running (any outcome, cancel, dead letter): give its slot back.
-- When the key has jobs held back (`check_held`: the caller saw a ready or blocked key), make
-- the next claim look at it now and return true (the caller signals the workers).
local function release(ulid, k, check_held)
  if not k or k == '' then return false end
  redis.call('SREM', key_key('run', k), ulid)
  if check_held and redis.call('EXISTS', key_key('held', k)) == 1 then
    redis.call('ZADD', KEYS[21], 'XX', now_ms, k)
    return true
  end
  return false
end
-- Whether any rate key has held-back jobs or is blocked (else nothing is held: skip the checks).
local function any_held()
  return redis.call('EXISTS', KEYS[21], KEYS[22]) > 0
end
