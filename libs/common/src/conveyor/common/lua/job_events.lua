--[[ job_events: one job's events from a queue's event stream, scanning a bounded range.
KEYS[1] events stream
ARGV[1] ulid  ARGV[2] exclusive start id ("(" + id) or inclusive id  ARGV[3] entries to scan
returns {matches, next}: matches is a flat array of event id, JobEvent bytes;
next is the id to continue after ("" when the end of the stream was reached)
]]
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], '+', 'COUNT', tonumber(ARGV[3]))
local matches = {}
for _, entry in ipairs(entries) do
  local fields = entry[2]
  if fields[2] == ARGV[1] then
    matches[#matches + 1] = entry[1]
    matches[#matches + 1] = fields[4]
  end
end
local next_id = ''
if #entries == tonumber(ARGV[3]) then next_id = entries[#entries][1] end
return {matches, next_id}
