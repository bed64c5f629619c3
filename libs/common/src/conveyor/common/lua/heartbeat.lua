--[[ heartbeat: keep this worker's claims alive (idle time is the only lease).
For each job still claimed by this consumer with this attempt, reset its entry's idle time
with XCLAIM ... JUSTID (which does not count as a delivery). A job whose claim moved on is
left alone: XCLAIM would otherwise steal it back from the worker that took it over.
KEYS[1] state hash  KEYS[4..12] job streams, bands 1..9  KEYS[17] cancel hash
KEYS[19] admitted stream ("band" 10) (KEYS as in claim.lua)
ARGV[1] consumer group  ARGV[2] consumer  ARGV[3] number of jobs
ARGV[4] the jobs packed back to back, each as struct '>B I2 c0 c26 I4': band, entry id, ulid, attempt
returns an array with, per job: 1 still held, 0 lost, or the reason string when CancelJob
asked the running attempt to stop
]]
--#include records
local group, consumer, n, packed = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local pos = 1
local out = {}
for _ = 1, n do
  local band, entry_id, ulid, attempt
  band, entry_id, ulid, attempt, pos = struct.unpack('>B I2 c0 c26 I4', packed, pos)
  local rec = redis.call('HGET', KEYS[1], ulid)
  local st, att, _, eid, _, _, owner = read_record(rec)
  if st == '3' and tonumber(att) == attempt and eid == entry_id and owner == consumer then
    local stream = KEYS[3 + band]
    if band == 10 then stream = KEYS[19] end
    redis.call('XCLAIM', stream, group, consumer, 0, entry_id, 'JUSTID')
    local reason = redis.call('HGET', KEYS[17], ulid)
    if reason then
      if reason == '' then reason = 'cancelled' end
      out[#out + 1] = reason
    else
      out[#out + 1] = 1
    end
  else
    out[#out + 1] = 0
  end
end
return out
