--[[ trim_events: drop events older than the retention that the results service has acked.
Invariant 5: events wait in Redis while the results service or PostgreSQL is down.
KEYS[1] events stream
ARGV[1] results consumer group  ARGV[2] cutoff id (now - retention, "<ms>-0")
returns the number of entries removed
]]
local cutoff = ARGV[2]
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local delivered = nil
for _, g in ipairs(groups) do
  local name, last
  for f = 1, #g, 2 do
    if g[f] == 'name' then name = g[f + 1] elseif g[f] == 'last-delivered-id' then last = g[f + 1] end
  end
  if name == ARGV[1] then delivered = last end
end
if not delivered then return 0 end
-- Everything up to and including the last delivered entry may go (MINID keeps ids >= limit).
local dms, dseq = string.match(delivered, '^(%d+)-(%d+)$')
local limit = dms .. '-' .. string.format('%d', tonumber(dseq) + 1)
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
if pending[1] > 0 and older(pending[2], limit) then limit = pending[2] end
if older(cutoff, limit) then limit = cutoff end
return redis.call('XTRIM', KEYS[1], 'MINID', limit)
