--[[ purge_dead: delete dead letters for good (their history stays in PostgreSQL).
Bounded work: one job is found through the index (no scan); "all" deletes at most ARGV[2]
of the oldest per call and says whether more are left.
KEYS[1] dead stream  KEYS[2] dead index (ulid -> dead entry id)
ARGV[1] ulid, or "" for the oldest dead letters  ARGV[2] most to delete in this call
returns {how many were deleted, more (1 when dead letters are left after an "all" call, else 0)}
]]
local dead_key, index_key = KEYS[1], KEYS[2]
if ARGV[1] ~= '' then
  local dead_id = redis.call('HGET', index_key, ARGV[1])
  if not dead_id then return {0, 0} end
  redis.call('HDEL', index_key, ARGV[1])
  return {redis.call('XDEL', dead_key, dead_id), 0}
end
local entries = redis.call('XRANGE', dead_key, '-', '+', 'COUNT', tonumber(ARGV[2]))
local ids, ulids = {}, {}
for i, entry in ipairs(entries) do
  ids[i] = entry[1]
  for f = 1, #entry[2], 2 do
    if entry[2][f] == 'j' then ulids[#ulids + 1] = entry[2][f + 1] end
  end
end
if #ids > 0 then redis.call('XDEL', dead_key, unpack(ids)) end
if #ulids > 0 then redis.call('HDEL', index_key, unpack(ulids)) end
local left = redis.call('XLEN', dead_key)
if left == 0 then redis.call('DEL', dead_key, index_key) end
return {#ids, left > 0 and 1 or 0}
