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
-- Built on first use: most calls of most scripts write no event of their own, and building it
-- cost more than the rest of a one-job call (progress.lua).
local timestamp_bytes = nil
local function timestamp()
  if not timestamp_bytes then
    timestamp_bytes = string.char(0x08) .. varint(tonumber(now[1])) .. string.char(0x10) .. varint(tonumber(now[2]) * 1000)
  end
  return timestamp_bytes
end
-- A live record: state|attempt|priority|entry id|first event id|final event id[|consumer]
-- (the consumer only while ACTIVE). read_record and record_of are its one reader and one writer,
-- as scripts.py's Record is on the Python side. Fields stay the strings stored ('3', '12').
-- The first event id is stored as its sequence number alone when it has the entry id's
-- millisecond (enqueue writes both in one call: nearly always), which keeps a waiting job's record
-- within 28 characters, a 32-byte allocation rather than 48 (ADR 0031). A bare number is never a
-- stream id Redis generates ("<ms>-<seq>"), so both forms read back unambiguously, and records
-- written before this change (always the full id) read as they did.
-- read_record(rec): state, attempt, priority, entry id, first event id (always the full id),
-- final event id and consumer ('' when none), or nothing for no record.
local function read_record(rec)
  if not rec then return nil end
  local st, att, prio, eid, first, final, consumer = string.match(rec, '^(%d+)|(%d+)|(%d+)|([^|]*)|([^|]*)|([^|]*)|?(.*)$')
  if first and first ~= '' and not string.find(first, '-', 1, true) then
    local ms = string.match(eid, '^%d+%-')
    -- No entry id to count from (a record an older version rewrote): "0-<seq>" still sorts
    -- before every real event, so a replay from it scans from the stream's start, missing nothing.
    first = (ms or '0-') .. first
  end
  return st, att, prio, eid, first, final, consumer
end
local function record_of(st, attempt, prio, eid, first_ev, final_ev, consumer)
  local dash = string.find(eid, '-', 1, true)
  if dash and string.sub(first_ev, 1, dash) == string.sub(eid, 1, dash) then
    first_ev = string.sub(first_ev, dash + 1)
  end
  local value = st .. '|' .. attempt .. '|' .. prio .. '|' .. eid .. '|' .. first_ev .. '|' .. final_ev
  if consumer then return value .. '|' .. consumer end
  return value
end

-- The fields of a job stream entry: ulid (j), Job bytes (d) and rate key (k, or nil).
local function entry_fields(fields)
  local ulid, job, k
  for f = 1, #(fields or {}), 2 do
    local name = fields[f]
    if name == 'j' then ulid = fields[f + 1] elseif name == 'd' then job = fields[f + 1] elseif name == 'k' then k = fields[f + 1] end
  end
  return ulid, job, k
end

-- Live records this call writes, set together by flush_records() before it returns (one HSET
-- for the batch instead of one per job). written[ulid] is the newest value, which Redis does
-- not have yet: a script that may read a record it wrote itself reads it here first.
local written, record_args = {}, {}
local function put_record(ulid, value)
  written[ulid] = value
  record_args[#record_args + 1] = ulid
  record_args[#record_args + 1] = value
end
local function flush_records()
  if #record_args > 0 then redis.call('HSET', KEYS[1], unpack(record_args)) end
end
-- Whether a job is ACTIVE now, this call's own writes included.
local function is_active(ulid)
  return read_record(written[ulid] or redis.call('HGET', KEYS[1], ulid)) == '3'
end

-- Start an attempt of a claimed entry: attempt + 1, record ACTIVE owned by `consumer`, an ACTIVE
-- event; appends the 6 values claim/reclaim return per job to `out`. The attempt number and the
-- consumer are the claim's fencing token (complete.lua). The rest is the job's record as read.
local function activate(out, state_key, events_key, consumer, band, entry_id, ulid, job, prev_attempt, prio, eid, first_ev, final_ev)
  local attempt = tonumber(prev_attempt) + 1
  -- JobEvent{type: ACTIVE, attempt, time, worker}; the job id is the entry's j field.
  local event = string.char(0x18) .. varint(2) .. string.char(0x20) .. varint(attempt)
    .. bytes_field(0x2a, timestamp()) .. bytes_field(0x32, consumer)
  local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', event)
  put_record(ulid, record_of('3', attempt, prio, eid, first_ev, final_ev, consumer))
  for _, v in ipairs({band, entry_id, ulid, attempt, job, event_id}) do out[#out + 1] = v end
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
