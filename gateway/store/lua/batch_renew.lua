-- Extends a held lease. KEYS: 1 job hash, 2 lease. ARGV: 1 token, 2 lease ms
-- Returns the job's status, or nil when the lease is no longer this worker's.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return false
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return redis.call('HGET', KEYS[1], 'status')
