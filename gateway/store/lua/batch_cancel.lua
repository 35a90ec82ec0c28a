-- Asks a job to stop. A job a worker holds becomes 'cancelling' (the worker stops within a heartbeat and
-- finishes it as 'cancelled', keeping the lines done); a job nobody holds is cancelled at once.
-- KEYS: 1 job hash, 2 lease, 3 input chunks, 4 output list, 5 errors list, 6 team's active set
-- ARGV: 1 now (s), 2 retention s, 3 job id
-- Returns the status after the call, or nil for an unknown job.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return false
end
if status ~= 'validating' and status ~= 'in_progress' then
  return status
end
local now = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'cancelling_at', now)
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[1], 'status', 'cancelling')
  return 'cancelling'
end
local retention = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', now, 'expires_at', now + retention)
redis.call('DEL', KEYS[3])
redis.call('EXPIRE', KEYS[1], retention)
redis.call('EXPIRE', KEYS[4], retention)
redis.call('EXPIRE', KEYS[5], retention)
redis.call('SREM', KEYS[6], ARGV[3])
return 'cancelled'
