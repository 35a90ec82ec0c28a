-- Quota admission of one request for one team, atomically: every policy is checked, then all are debited
-- or none. The reference semantics are gateway/quota.py `MemoryQuotaBackend`; both are integer arithmetic
-- (milliseconds, scaled bucket levels), so they agree exactly and no float rounding admits a token too many.
--
-- KEYS[1]   the team's quota hash: t (last update ms), r / k (requests / tokens bucket levels, scaled by the
--           60000-ms period), dw / dn (UTC day number, tokens in it), mw / mn (first day of the month, tokens)
-- ARGV[1]   now in ms, or '' for Redis TIME (the one clock every replica agrees on; tests pass a clock)
-- ARGV[2]   'admit' or 'adjust' (reconcile: add a signed token difference, never refuse)
-- ARGV[3-6] limits: requests_per_minute, tokens_per_minute, tokens_per_day, tokens_per_month (0 = none)
-- ARGV[7]   requests to count (admit: 0 or 1)
-- ARGV[8]   tokens (admit: the charge; adjust: the signed difference)
-- ARGV[9]   adjust: the UTC day number of the reservation; ARGV[10]: its month's first day number
-- ARGV[11]  the monthly money budget in nano-USD (0 = none); its spend is the hash's bw / bn (month, nano-USD)
-- ARGV[12]  nano-USD (admit: the estimated cost; adjust: the signed difference)
-- Returns   {admitted, blocking policy (1-4, 5 = budget, 0 = none), wait ms, now ms, day number, month first day,
--            remaining_1, reset_ms_1, ..., remaining_4, reset_ms_4, budget remaining, budget reset_ms}

local PERIOD = 60000
local DAY = 86400000

local function now_ms()
  if ARGV[1] ~= '' then
    return tonumber(ARGV[1])
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Days since 1970-01-01 <-> proleptic Gregorian (y, m, d), after H. Hinnant's civil_from_days.
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local now = now_ms()
local mode = ARGV[2]
local limit = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local requests = tonumber(ARGV[7])
local tokens = tonumber(ARGV[8])
local budget = tonumber(ARGV[11]) or 0
local cost = tonumber(ARGV[12]) or 0

local h = redis.call('HMGET', KEYS[1], 't', 'r', 'k', 'dw', 'dn', 'mw', 'mn', 'bw', 'bn')
local elapsed = math.max(0, now - (tonumber(h[1]) or now))

-- Token buckets hold `level` = (units still to drain) * PERIOD; they drain `limit` per ms.
local level = {}
for i = 1, 2 do
  level[i] = 0
  if limit[i] > 0 then level[i] = math.max(0, (tonumber(h[i + 1]) or 0) - elapsed * limit[i]) end
end

local day = math.floor(now / DAY)
local y, m = civil(day)
local month = days_from_civil(y, m, 1)
local month_end = (m == 12) and days_from_civil(y + 1, 1, 1) or days_from_civil(y, m + 1, 1)
local window = {0, 0, day, month}
local window_end = {0, 0, (day + 1) * DAY, month_end * DAY}
local used = {0, 0, 0, 0}
if tonumber(h[4]) == day then used[3] = tonumber(h[5]) end
if tonumber(h[6]) == month then used[4] = tonumber(h[7]) end
local spent = 0
if tonumber(h[8]) == month then spent = tonumber(h[9]) end

local admitted, blocking, wait = 1, 0, 0
if mode == 'admit' then
  local costs = {requests, tokens, tokens, tokens}
  for i = 1, 4 do
    local w = 0
    if limit[i] > 0 and costs[i] > 0 then
      if i <= 2 then
        local over = level[i] + costs[i] * PERIOD - limit[i] * PERIOD
        if over > 0 then w = math.ceil(over / limit[i]) end
      elseif used[i] + costs[i] > limit[i] then
        w = window_end[i] - now
      end
    end
    if w > wait then
      admitted, blocking, wait = 0, i, w
    end
  end
  if budget > 0 and cost > 0 and spent + cost > budget and window_end[4] - now > wait then
    admitted, blocking, wait = 0, 5, window_end[4] - now
  end
  if admitted == 1 then
    for i = 1, 2 do
      if limit[i] > 0 then level[i] = level[i] + costs[i] * PERIOD end
    end
    for i = 3, 4 do
      if limit[i] > 0 then used[i] = used[i] + costs[i] end
    end
    if budget > 0 then spent = spent + cost end
  end
else
  -- Reconcile: a refund lands only in the window it was reserved in; a charge lands in the current one.
  if limit[2] > 0 then level[2] = math.max(0, level[2] + tokens * PERIOD) end
  local reserved = {0, 0, tonumber(ARGV[9]), tonumber(ARGV[10])}
  for i = 3, 4 do
    if limit[i] > 0 and (tokens > 0 or reserved[i] == window[i]) then
      used[i] = math.max(0, used[i] + tokens)
    end
  end
  if budget > 0 and (cost > 0 or reserved[4] == month) then spent = math.max(0, spent + cost) end
end

local out = {admitted, blocking, wait, now, day, month}
local ttl = 1000
for i = 1, 4 do
  local remaining, reset = 0, 0
  if limit[i] > 0 then
    if i <= 2 then
      remaining = math.max(0, math.floor((limit[i] * PERIOD - level[i]) / PERIOD))
      reset = math.ceil(level[i] / limit[i])
    else
      remaining = math.max(0, limit[i] - used[i])
      reset = window_end[i] - now
    end
    ttl = math.max(ttl, reset)
  end
  out[#out + 1] = remaining
  out[#out + 1] = reset
end
if budget > 0 then
  out[#out + 1] = math.max(0, budget - spent)
  out[#out + 1] = window_end[4] - now
  ttl = math.max(ttl, window_end[4] - now)
else
  out[#out + 1] = 0
  out[#out + 1] = 0
end

redis.call('HSET', KEYS[1], 't', math.max(now, tonumber(h[1]) or now), 'r', level[1], 'k', level[2],
  'dw', day, 'dn', used[3], 'mw', month, 'mn', used[4], 'bw', month, 'bn', string.format('%.0f', spent))
-- The state is worthless once every bucket is drained and every window is over.
redis.call('PEXPIRE', KEYS[1], ttl + 1000)
return out
