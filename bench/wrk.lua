-- The bench's wrk script. Arguments after `--`: MODE FILE KEY [RUN]
--   cycle:  FILE holds one request body per line; each thread cycles through them from its own offset.
--   unique: FILE holds two lines, the text before and after a request-unique token (RUN-thread-counter),
--           so every request carries inputs nobody has sent before.
--   fresh:  as cycle, with each body's opening brace followed by 0-210 spaces in turn: the same inputs (cache
--           hits) in a body whose bytes are new (211 is prime to the file's length in the bench).
--   mix:    FILE's first line is N, the next two a `unique` template, the rest `cycle` bodies: every Nth
--           request is new (a miss), the others cycle (hits).
-- done() prints one JSON line that bench/load.py reads.

local threads_started = 0
local mode, bodies, n, i, pre, post, run, counter, every

function setup(thread)
  threads_started = threads_started + 1
  thread:set("tid", threads_started)
end

function init(args)
  mode = args[1]
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[3]
  bodies = {}
  for line in io.lines(args[2]) do bodies[#bodies + 1] = line end
  if mode == "mix" then
    every = tonumber(table.remove(bodies, 1))
  end
  if mode ~= "cycle" and mode ~= "fresh" then
    pre = table.remove(bodies, 1)
    post = table.remove(bodies, 1)
    run = args[4] or "0"
    counter = 0
  end
  n = #bodies
  i = n > 0 and ((tid or 1) * 7919) % n or 0
end

function request()
  local body
  if mode == "fresh" then
    i = i % n + 1
    counter = (counter or 0) + 1
    body = "{" .. string.rep(" ", counter % 211) .. string.sub(bodies[i], 2)
  elseif mode == "cycle" or (mode == "mix" and (counter + 1) % every ~= 0) then
    i = i % n + 1
    body = bodies[i]
    if mode == "mix" then counter = counter + 1 end
  else
    counter = counter + 1
    body = pre .. run .. "-" .. (tid or 1) .. "-" .. counter .. post
  end
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
