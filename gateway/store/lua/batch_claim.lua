-- Claims a job for one worker: a lease key holding the worker's token, expiring unless renewed, so a
-- crashed worker's job is taken over by another once the lease runs out.
-- KEYS: 1 job hash, 2 lease. ARGV: 1 token, 2 lease ms, 3 now (s)
-- Returns the job's fields (flat), or 'gone' / 'done' / 'busy'.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 'gone'
end
if status ~= 'validating' and status ~= 'in_progress' and status ~= 'cancelling' then
  return 'done'
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return 'busy'
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if status == 'validating' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[3])
end
return redis.call('HGETALL', KEYS[1])
