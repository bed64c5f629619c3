--[[ projected: the results service committed these finished jobs to PostgreSQL, so their live
records may now expire, the retention after this commit (issue 10: retention counts from
projection, not from finish). Finishing puts a job in the done set with score +inf (never
expires); this lowers it to now + retention. XX: a job re-queued since (retry from the dead
letters removed it) is not put back; LT: an expiry already set is never pushed later.
KEYS[1] done zset
ARGV[1] retention ms  ARGV[2..] ulids
returns the number of records whose expiry was set
]]
local t = redis.call('TIME')
local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local changed = 0
local args = {}
for i = 2, #ARGV do
  args[#args + 1] = expires
  args[#args + 1] = ARGV[i]
  if #args >= 1000 or i == #ARGV then
    changed = changed + redis.call('ZADD', KEYS[1], 'XX', 'LT', 'CH', unpack(args))
    args = {}
  end
end
return changed
