--[[ enqueue: add jobs to one queue atomically, honouring idempotency keys.
Invariant 1 (DESIGN.md): the job, its live record and its QUEUED event are written
in one step, or not at all; a known idempotency key adds nothing.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset  KEYS[4..12] job streams, bands 1..9
KEYS[13..] the idempotency keys the jobs name
ARGV[1] number of jobs  ARGV[2] the jobs packed back to back (one argument, so the client
  encodes one buffer rather than six per job), each as struct '>c26 B H d I4 c0 I4 c0':
  ulid, priority (1-9), idempotency key index (0 = none, else 1-based into KEYS[13..]),
  idempotency window ms, Job bytes, QUEUED JobEvent bytes
returns a flat array, 3 values per job: ulid, created (1|0), JobState (0 = no longer in Redis)
]]
local state_key, events_key = KEYS[1], KEYS[2]
local n, packed = tonumber(ARGV[1]), ARGV[2]
local pos = 1
local out = {}

if redis.call('EXISTS', events_key) == 0 then
  redis.call('XGROUP', 'CREATE', events_key, 'results', '0', 'MKSTREAM')
end

for _ = 1, n do
  local ulid, prio, idem_index, idem_ttl, job, event
  ulid, prio, idem_index, idem_ttl, job, event, pos = struct.unpack('>c26 B H d I4 c0 I4 c0', packed, pos)
  local existing = false
  if idem_index > 0 then
    existing = redis.call('GET', KEYS[12 + idem_index])
  end
  if existing then
    local rec = redis.call('HGET', state_key, existing)
    local st = 0
    if rec then st = tonumber(string.match(rec, '^(%d+)|')) end
    out[#out + 1] = existing
    out[#out + 1] = 0
    out[#out + 1] = st
  else
    local stream = KEYS[3 + prio]
    if redis.call('EXISTS', stream) == 0 then
      redis.call('XGROUP', 'CREATE', stream, 'workers', '0', 'MKSTREAM')
    end
    local entry_id = redis.call('XADD', stream, '*', 'j', ulid, 'd', job)
    local event_id = redis.call('XADD', events_key, '*', 'j', ulid, 'e', event)
    -- record: state|attempt|priority|entry id|first event id|final event id
    redis.call('HSET', state_key, ulid, '1|0|' .. prio .. '|' .. entry_id .. '|' .. event_id .. '|')
    if idem_index > 0 then
      redis.call('SET', KEYS[12 + idem_index], ulid, 'PX', string.format('%d', idem_ttl))
    end
    out[#out + 1] = ulid
    out[#out + 1] = 1
    out[#out + 1] = 1
  end
end
return out
