--[[ projected: the results service committed these finished jobs to PostgreSQL, so their live
records may now expire, the retention after this commit (issue 10: retention counts from
projection, not from finish). Finishing puts a job in the done set with score +inf (never
expires); this lowers it to now + retention, for each job whose current final event is the
one projected or an older one: a job re-run since (retried from the dead letters) and finished
again keeps +inf until that newer outcome is projected too. ZADD XX: a job no longer in the
done set (re-queued) is not put back; LT: an expiry already set is never pushed later.
KEYS[1] state hash  KEYS[2] events stream (unused)  KEYS[3] done zset
ARGV[1] retention ms  ARGV[2..] pairs: ulid, id of the last event projected for it ("<ms>-<seq>")
returns the number of records whose expiry was set
]]
--#include prelude
local expires = now_ms + tonumber(ARGV[1])
local function id_key(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  if not ms then return nil end
  return tonumber(ms), tonumber(seq)
end
local changed = 0
local args = {}
-- The records in one command per 1,000 jobs (a command costs more than the Lua around it; unpack
-- is bounded by Lua's stack).
local recs = {}
for from = 2, #ARGV - 1, 2000 do
  local ulids = {}
  for i = from, math.min(from + 1998, #ARGV - 1), 2 do ulids[#ulids + 1] = ARGV[i] end
  for _, rec in ipairs(redis.call('HMGET', KEYS[1], unpack(ulids))) do recs[#recs + 1] = rec end
end
for i = 2, #ARGV - 1, 2 do
  local ulid, projected = ARGV[i], ARGV[i + 1]
  local st, _, _, _, _, final_ev = read_record(recs[i / 2] or nil)
  local due = true
  if st then
    local state = tonumber(st)
    if state < 5 or state > 8 then
      due = false  -- not finished now (re-queued, running): its next outcome will be projected
    else
      local fms, fseq = id_key(final_ev)
      local pms, pseq = id_key(projected)
      if fms and pms and (fms > pms or (fms == pms and fseq > pseq)) then
        due = false  -- a newer outcome than the one projected
      end
    end
  end
  if due then
    args[#args + 1] = expires
    args[#args + 1] = ulid
  end
  if #args >= 1000 then
    changed = changed + redis.call('ZADD', KEYS[3], 'XX', 'LT', 'CH', unpack(args))
    args = {}
  end
end
if #args > 0 then
  changed = changed + redis.call('ZADD', KEYS[3], 'XX', 'LT', 'CH', unpack(args))
end
return changed
