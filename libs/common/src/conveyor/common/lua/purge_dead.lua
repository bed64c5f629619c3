--[[ purge_dead: delete dead letters for good (their history stays in PostgreSQL).
KEYS[1] dead stream
ARGV[1] ulid, or "" for every dead letter
returns how many were deleted
]]
if ARGV[1] == '' then
  local n = redis.call('XLEN', KEYS[1])
  redis.call('DEL', KEYS[1])
  return n
end
local cursor = '-'
while true do
  local entries = redis.call('XRANGE', KEYS[1], cursor, '+', 'COUNT', 1000)
  if #entries == 0 then return 0 end
  for _, entry in ipairs(entries) do
    if entry[2][2] == ARGV[1] then
      return redis.call('XDEL', KEYS[1], entry[1])
    end
  end
  cursor = '(' .. entries[#entries][1]
end
