--[[ enqueue: add jobs to one queue atomically, honouring idempotency keys.
Invariant 1 (DESIGN.md): the job, its live record and its QUEUED event are written
in one step, or not at all; a known idempotency key adds nothing.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset  KEYS[4..12] job streams, bands 1..9
KEYS[13..] the idempotency keys the jobs name
ARGV[1] number of jobs, then 6 values per job:
  ulid, priority (1-9), Job bytes, QUEUED JobEvent bytes,
  idempotency key index (0 = none, else 1-based into KEYS[13..]), idempotency window ms
returns a flat array, 3 values per job: ulid, created (1|0), JobState (0 = no longer in Redis)
]]
local state_key, events_key = KEYS[1], KEYS[2]
local n = tonumber(ARGV[1])
local out = {}

if redis.call('EXISTS', events_key) == 0 then
  redis.call('XGROUP', 'CREATE', events_key, 'results', '0', 'MKSTREAM')
end

for i = 0, n - 1 do
  local base = 2 + i * 6
  local ulid, prio, job, event = ARGV[base], tonumber(ARGV[base + 1]), ARGV[base + 2], ARGV[base + 3]
  local idem_index, idem_ttl = tonumber(ARGV[base + 4]), ARGV[base + 5]
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
      redis.call('SET', KEYS[12 + idem_index], ulid, 'PX', idem_ttl)
    end
    out[#out + 1] = ulid
    out[#out + 1] = 1
    out[#out + 1] = 1
  end
end
return out
