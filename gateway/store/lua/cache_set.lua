-- Cache writes: KEYS[i] gets ARGV[i + 1], each expiring in ARGV[1] seconds. One command for a whole upstream
-- batch instead of a pipeline of SETs: redis-py's client-side cost is per command, not per argument.
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
end
return #KEYS
