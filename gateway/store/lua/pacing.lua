-- Pacing of the one shared upstream key across every replica: a sliding-window log of scheduled calls.
-- Each caller is given the earliest slot at which its call keeps every window of `window` ms under the
-- request and token limits, and sleeps until then; no caller ever polls. The reference semantics are
-- gateway/pacing.py `MemoryPacingBackend`.
--
-- KEYS[1]  the log: sorted set, score = slot (ms), member = '<seq>:<tokens>'
-- KEYS[2]  meta hash: seq, sum (tokens in the log), until (no slot before this: the upstream said 429)
-- ARGV[1]  now in ms, or '' for Redis TIME
-- ARGV[2]  'acquire' or 'hold'
-- acquire: ARGV[3] window ms, ARGV[4] requests per window (0 = none), ARGV[5] tokens per window (0 = none),
--          ARGV[6] this call's tokens, ARGV[7] the longest the caller may wait (ms)
-- hold:    ARGV[3] ms from now before which no slot is given
-- Returns  {granted (1/0), slot ms, now ms}

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local held = tonumber(redis.call('HGET', KEYS[2], 'until') or '0')
if ARGV[2] == 'hold' then
  local untl = math.max(held, now + tonumber(ARGV[3]))
  redis.call('HSET', KEYS[2], 'until', untl)
  redis.call('PEXPIRE', KEYS[2], math.max(redis.call('PTTL', KEYS[2]), untl - now + 1000))
  return {1, untl, now}
end

local window, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tokens, max_wait = tonumber(ARGV[6]), tonumber(ARGV[7])

-- Forget calls that left every window, keeping the token sum of the log exact.
local sum = tonumber(redis.call('HGET', KEYS[2], 'sum') or '0')
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
if #gone > 0 then
  for _, member in ipairs(gone) do
    sum = sum - tonumber(string.match(member, ':(%d+)$'))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  redis.call('HSET', KEYS[2], 'sum', sum)
end

-- Slots never go backwards, so the window ending at each slot is the only one it can overfill.
local slot = math.max(now, held)
local count = redis.call('ZCARD', KEYS[1])
if count > 0 then
  slot = math.max(slot, tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]))
end
if rpm > 0 and count >= rpm then
  local nth = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
  slot = math.max(slot, tonumber(nth[2]) + window)
end
if tpm > 0 then
  -- A call larger than the whole budget goes alone, once the window is empty.
  local over = sum + math.min(tokens, tpm) - tpm
  -- Oldest first, a few at a time: usually the first call or two free enough, and the log may be long.
  local freed, start = 0, 0
  while over > 0 and start < count do
    local chunk = redis.call('ZRANGE', KEYS[1], start, start + 31, 'WITHSCORES')
    for i = 1, #chunk, 2 do
      freed = freed + tonumber(string.match(chunk[i], ':(%d+)$'))
      if freed >= over then
        slot = math.max(slot, tonumber(chunk[i + 1]) + window)
        over = 0
        break
      end
    end
    start = start + 32
  end
end

if slot - now > max_wait then
  return {0, slot, now}
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
redis.call('ZADD', KEYS[1], slot, seq .. ':' .. tokens)
redis.call('HSET', KEYS[2], 'sum', sum + tokens)
local ttl = slot - now + window + 1000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, slot, now}
