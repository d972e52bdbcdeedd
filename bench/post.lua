-- wrk script for bench/http_bench.py: POSTs form bodies and counts every non-200 answer.
--
--   wrk ... URL -s bench/post.lua -- AUTHORIZATION fixed BODY
--   wrk ... URL -s bench/post.lua -- AUTHORIZATION files PREFIX
--
-- "fixed" sends BODY on every request. "files" sends each line of PREFIX.<thread number> once
-- (single-use authorization codes); when a thread runs out it resends its last line, which the
-- server refuses, and counts the shortfall in `exhausted`.
-- done() prints one line, "BENCH-RESULT {json}", which http_bench.py parses.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_number", #threads)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
  wrk.headers["Authorization"] = args[1]
  mode = args[2]
  non200 = 0
  exhausted = 0
  statuses = {}
  samples = {}
  if mode == "fixed" then
    wrk.body = args[3]
    fixed_request = wrk.format()
  else
    bodies = {}
    for line in io.lines(args[3] .. "." .. thread_number) do
      bodies[#bodies + 1] = line
    end
    next_body = 1
  end
end

function request()
  if fixed_request then
    return fixed_request
  end
  local body = bodies[next_body]
  if body == nil then
    exhausted = exhausted + 1
    body = bodies[#bodies]
  else
    next_body = next_body + 1
  end
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
    if #samples < 3 then
      samples[#samples + 1] = key .. " " .. string.sub(body or "", 1, 300)
    end
  end
end

local function quote(s)
  s = string.gsub(s, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. s .. '"'
end

function done(summary, latency, requests)
  local non200_total, exhausted_total, merged, all_samples = 0, 0, {}, {}
  for _, thread in ipairs(threads) do
    non200_total = non200_total + (thread:get("non200") or 0)
    exhausted_total = exhausted_total + (thread:get("exhausted") or 0)
    for status, count in pairs(thread:get("statuses") or {}) do
      merged[status] = (merged[status] or 0) + count
    end
    for _, sample in ipairs(thread:get("samples") or {}) do
      if #all_samples < 5 then all_samples[#all_samples + 1] = quote(sample) end
    end
  end
  local status_parts = {}
  for status, count in pairs(merged) do
    status_parts[#status_parts + 1] = quote(status) .. ":" .. count
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH-RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"latency_us":{"min":%d,"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d},' ..
    '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},' ..
    '"non200":%d,"statuses":{%s},"samples":[%s],"exhausted":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.timeout,
    non200_total, table.concat(status_parts, ","), table.concat(all_samples, ","), exhausted_total))
end
