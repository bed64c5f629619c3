--[[ recover: this consumer's own pending jobs that it does not know it holds.
A claim whose reply was lost (the connection broke after the script ran), or a worker
restarted under the same id, leaves jobs ACTIVE in this consumer's pending list; reading
that history (XREADGROUP ... 0) hands them back at once instead of after the visibility
timeout. Entries whose job has already finished are acked and deleted.
KEYS as in claim.lua: [1] state [4..12] bands [19] admitted stream ("band" 10)
ARGV[1] consumer group  ARGV[2] consumer  ARGV[3] most per band
returns a flat array, 6 values per job as in claim.lua (the ACTIVE event id is "": the
attempt's ACTIVE event was written by the claim that was lost)
]]
--#include prelude
local state_key = KEYS[1]
local group, consumer, most = ARGV[1], ARGV[2], tonumber(ARGV[3])
local found = {}
for _, band in ipairs({10, 9, 8, 7, 6, 5, 4, 3, 2, 1}) do
  local stream = stream_of(band)
  if redis.call('EXISTS', stream) == 1 then
    local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', most, 'STREAMS', stream, '0')
    for _, entry in ipairs(res and res[1][2] or {}) do
      local entry_id, fields = entry[1], entry[2]
      local ulid, job = entry_fields(fields)
      local rec = ulid and redis.call('HGET', state_key, ulid)
      local st, attempt, _, eid, _, _, owner = read_record(rec)
      if st == '3' and owner == consumer and eid == entry_id and job then
        found[#found + 1] = band
        found[#found + 1] = entry_id
        found[#found + 1] = ulid
        found[#found + 1] = tonumber(attempt)
        found[#found + 1] = job
        found[#found + 1] = ''
      elseif not st or tonumber(st) >= 5 or not job then
        redis.call('XACK', stream, group, entry_id)
        redis.call('XDEL', stream, entry_id)
      end
    end
  end
end
return found
