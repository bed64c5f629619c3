--[[ progress: append a PROGRESS event while this consumer still holds the job's claim.
KEYS[1] events stream  KEYS[2] state hash
ARGV[1] consumer  ARGV[2] ulid  ARGV[3] attempt  ARGV[4] JobEvent bytes
returns the event id, or 0 when the claim has moved on (fenced, as in complete.lua)
]]
--#include records
local rec = redis.call('HGET', KEYS[2], ARGV[2])
if not rec then return 0 end
local st, att, _, _, _, _, owner = read_record(rec)
if st ~= '3' or att ~= ARGV[3] or owner ~= ARGV[1] then
  return 0
end
return redis.call('XADD', KEYS[1], '*', 'j', ARGV[2], 'e', ARGV[4])
