-- Ends a job (completed, failed, cancelled): sets its status and timestamps, drops its inputs and lease,
-- frees the team's active slot, and lets the job and its output expire after the retention.
-- With a token, only the lease holder may finish; with '' (a cancel), only a job nobody holds.
-- KEYS: 1 job hash, 2 lease, 3 input chunks, 4 output list, 5 errors list, 6 team's active set
-- ARGV: 1 token or '', 2 status, 3 now (s), 4 retention s, 5 job id, 6 error message ('' = none), 7 its code
local holder = redis.call('GET', KEYS[2])
if ARGV[1] == '' then
  if holder then
    return 0
  end
elseif holder ~= ARGV[1] then
  return 0
end
if not redis.call('HGET', KEYS[1], 'status') then
  return 0
end
local now = tonumber(ARGV[3])
local retention = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[2] .. '_at', now, 'expires_at', now + retention)
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[6], 'error_code', ARGV[7])
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('EXPIRE', KEYS[1], retention)
redis.call('EXPIRE', KEYS[4], retention)
redis.call('EXPIRE', KEYS[5], retention)
redis.call('SREM', KEYS[6], ARGV[5])
return 1
