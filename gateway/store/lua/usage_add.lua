-- Adds one flush of a team's usage tallies to its day hashes, exactly once: each writer (one gateway process)
-- numbers its flushes and retries a failed one with the same number, so a reply lost after the write cannot
-- double-count.
-- KEYS[1]: the last flush number applied for this team from this writer; KEYS[2..]: the team's day hashes.
-- ARGV: flush number, writer-key TTL (s), retention (s), then per day hash: n, then n field/value pairs.
-- A value with a '.' or an exponent is a float (HINCRBYFLOAT), otherwise an integer (HINCRBY).
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if seq <= last then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local retention = ARGV[3]
local a = 4
for k = 2, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n do
    local field, value = ARGV[a], ARGV[a + 1]
    if string.find(value, '[%.eE]') then
      redis.call('HINCRBYFLOAT', KEYS[k], field, value)
    else
      redis.call('HINCRBY', KEYS[k], field, value)
    end
    a = a + 2
  end
  redis.call('EXPIRE', KEYS[k], retention)
end
return 1
