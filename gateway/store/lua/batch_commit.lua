-- Checkpoints one chunk: appends its output and error lines and advances the progress together, only
-- while the caller holds the lease and the chunk is the next one, so each line is written exactly once.
-- KEYS: 1 job hash, 2 lease, 3 output list, 4 errors list
-- ARGV: 1 token, 2 chunk index, 3 output blob, 4 errors blob ('' = none), 5 completed lines, 6 failed lines,
--       7 lease ms
-- Returns the job's status after the commit, or nil when the lease was lost or the chunk is not next.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return false
end
local index = tonumber(ARGV[2])
if tonumber(redis.call('HGET', KEYS[1], 'next_chunk')) ~= index then
  return false
end
if ARGV[3] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[4])
end
redis.call('HINCRBY', KEYS[1], 'completed', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[6])
redis.call('HSET', KEYS[1], 'next_chunk', index + 1)
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return redis.call('HGET', KEYS[1], 'status')
