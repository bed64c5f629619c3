--[[ enqueue: add jobs to one queue atomically, honouring idempotency keys.
Invariant 1 (DESIGN.md): the job, its live record and its first event are written in one
step, or not at all; a known idempotency key adds nothing.
A job due now goes into its band's stream with a QUEUED event; a delayed job (due > 0) is parked
(delayed zset + parked hash) with a DELAYED event, and a wake-up signal is sent so that
blocked workers recompute how long to wait.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset  KEYS[4..12] job streams, bands 1..9
KEYS[13] delayed zset  KEYS[14] parked hash  KEYS[15] signal stream  KEYS[16] dead stream  KEYS[17] cancel hash  KEYS[18] paused flag  KEYS[19..25] flow control (KEYS[23] rate keys hash)
KEYS[26] dead-letter index  KEYS[27] retrying zset (script_keys() ends there; unused here)  KEYS[28..] idempotency keys
ARGV[1] number of jobs  ARGV[2] the jobs packed back to back (one argument, so the client
  encodes one buffer rather than several per job), each as struct '>c26 B H d d I4 c0 I4 c0 B c0':
  ulid, priority (1-9), idempotency key index (0 = none, else 1-based into KEYS[28..]),
  idempotency window ms, due ms (0 = now), Job bytes, first JobEvent bytes (QUEUED or DELAYED),
  rate key ("" = none)
returns a flat array, 3 values per job: ulid, created (1|0), JobState (0 = no longer in Redis)
]]
--#include records
local state_key, events_key, delayed_key, parked_key, signal_key = KEYS[1], KEYS[2], KEYS[13], KEYS[14], KEYS[15]
local n, packed = tonumber(ARGV[1]), ARGV[2]
local pos = 1
local out = {}
local signalled = false
-- Streams known to exist (with their consumer group) in this call.
local ready = {}

if redis.call('EXISTS', events_key) == 0 then
  redis.call('XGROUP', 'CREATE', events_key, 'results', '0', 'MKSTREAM')
end

for _ = 1, n do
  local ulid, prio, idem_index, idem_ttl, due, job, event, k
  ulid, prio, idem_index, idem_ttl, due, job, event, k, pos = struct.unpack('>c26 B H d d I4 c0 I4 c0 B c0', packed, pos)
  local existing = false
  if idem_index > 0 then
    existing = redis.call('GET', KEYS[27 + idem_index])
  end
  if existing then
    -- A duplicate idempotency key later in the batch reads its job's record as this call wrote it.
    local rec = written[existing] or redis.call('HGET', state_key, existing)
    local st = 0
    if rec then st = tonumber((read_record(rec))) end
    out[#out + 1] = existing
    out[#out + 1] = 0
    out[#out + 1] = st
  else
    local state
    if due > 0 then
      if k ~= '' then redis.call('HSET', KEYS[23], ulid, k) end  -- parked: the stream entry will carry it
      local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', event)
      redis.call('ZADD', delayed_key, due, ulid)
      redis.call('HSET', parked_key, ulid, job)
      -- record: state|attempt|priority|entry id|first event id|final event id
      put_record(ulid, record_of('2', 0, prio, '', event_id, ''))
      signalled = true
      state = 2
    else
      local stream = KEYS[3 + prio]
      if not ready[stream] then
        if redis.call('EXISTS', stream) == 0 then
          redis.call('XGROUP', 'CREATE', stream, 'workers', '0', 'MKSTREAM')
        end
        ready[stream] = true
      end
      local entry_id
      if k ~= '' then
        entry_id = redis.call('XADD', stream, '*', 'j', ulid, 'd', job, 'k', k)
      else
        entry_id = redis.call('XADD', stream, '*', 'j', ulid, 'd', job)
      end
      local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', event)
      put_record(ulid, record_of('1', 0, prio, entry_id, short_first(entry_id, event_id), ''))
      state = 1
    end
    if idem_index > 0 then
      redis.call('SET', KEYS[27 + idem_index], ulid, 'PX', string.format('%d', idem_ttl))
    end
    out[#out + 1] = ulid
    out[#out + 1] = 1
    out[#out + 1] = state
  end
end
flush_records()
if signalled then
  redis.call('XADD', signal_key, 'MAXLEN', '~', 16, '*', 's', 'delayed')
end
return out
