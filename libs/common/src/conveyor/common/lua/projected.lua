--[[ projected: the results service committed these events to PostgreSQL: let the finished jobs'
live records expire, then acknowledge the entries (Invariant 3: after the commit, never before).
Retention counts from projection (issue 10: retention counts from projection, not from finish).
Finishing puts a job in the done set with score +inf (never expires); this lowers it to now +
retention, for each job whose current final event is the one projected or an older one: a job
re-run since (retried from the dead letters) and finished again keeps +inf until that newer
outcome is projected too. ZADD XX: a job no longer in the done set (re-queued) is not put back;
LT: an expiry already set is never pushed later. The expiry is set before the XACK, so that an
XACK refused (NOGROUP) leaves no finished record without its expiry.
Both lists come as one space-separated argument each (ADR 0030): a batch acks about a thousand
entries, and packing each as an argument of its own cost the results service more than the fold.
KEYS[1] state hash  KEYS[2] events stream  KEYS[3] done zset
ARGV[1] retention ms  ARGV[2] "ulid id ulid id ...": each job and the id of the last event projected
for it ("<ms>-<seq>")  ARGV[3] consumer group (may be absent with no ids)  ARGV[4] "id id ...": the
entries to ack in the group (may be absent or empty)
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
local ulids, projected_ids = {}, {}
for ulid, projected in string.gmatch(ARGV[2] or '', '(%S+) (%S+)') do
  ulids[#ulids + 1] = ulid
  projected_ids[#projected_ids + 1] = projected
end
-- The records in one command per 1,000 jobs (a command costs more than the Lua around it; unpack
-- is bounded by Lua's stack).
local recs = {}
for from = 1, #ulids, 1000 do
  for _, rec in ipairs(redis.call('HMGET', KEYS[1], unpack(ulids, from, math.min(from + 999, #ulids)))) do
    recs[#recs + 1] = rec
  end
end
for i = 1, #ulids do
  local ulid, projected = ulids[i], projected_ids[i]
  local st, _, _, _, _, final_ev = read_record(recs[i] or nil)
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
local ids = {}
for id in string.gmatch(ARGV[4] or '', '%S+') do
  ids[#ids + 1] = id
  if #ids >= 1000 then
    redis.call('XACK', KEYS[2], ARGV[3], unpack(ids))
    ids = {}
  end
end
if #ids > 0 then
  redis.call('XACK', KEYS[2], ARGV[3], unpack(ids))
end
return changed
