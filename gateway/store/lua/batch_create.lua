-- Creates a batch job in one step: its hash, input chunks, validation errors and place in the team's index.
-- A runnable job also takes one of the team's active slots, and is refused (0) when none is free; a job with
-- nothing to run is created finished, its keys expiring after the retention.
-- KEYS: 1 job hash, 2 input chunks, 3 errors list, 4 team's active set, 5 team's job index (zset),
--       6 the team's job counter (orders the index)
-- ARGV: 1 job id, 2 max active jobs, 3 runnable '1'/'0', 4 retention s, 5 errors blob ('' = none),
--       6 number of field/value pairs, then the pairs, then the chunk blobs
local id = ARGV[1]
local runnable = ARGV[3] == '1'
if runnable then
  if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[2]) then
    return 0
  end
  redis.call('SADD', KEYS[4], id)
end
local pairs_end = 6 + 2 * tonumber(ARGV[6])
for i = 7, pairs_end, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
for i = pairs_end + 1, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
if ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[5])
end
redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[6]), id)
if not runnable then
  redis.call('DEL', KEYS[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return 1
