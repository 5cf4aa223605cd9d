-- wrk script for the sam-callback benchmark: every request is a valid, authenticated callback
-- for a different deploymentId. Arguments: path token rows offset prefix threads.
-- The summary is written as one JSON line prefixed with "BENCH_JSON " for bench/run.py.

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  path = args[1]
  token = args[2]
  rows = tonumber(args[3])
  offset = tonumber(args[4])
  prefix = args[5]
  nthreads = tonumber(args[6] or "1")
  counter = tid
  headers = {
    ["Content-Type"] = "application/json",
    ["X-Authorization"] = token,
  }
end

function request()
  local n = (offset + counter) % rows
  counter = counter + nthreads
  local body = string.format(
    '{"deploymentId":"%s%07d","status":"RUN_COMPLETED","deviceId":%d,"userId":%d,'
      .. '"botOutput":{"resultado":{"type":"STRING","string":"OK"},"filas":{"type":"NUMBER","number":"%d"}}}',
    prefix, n, 1000 + n % 50, 20 + n % 7, n % 1000)
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,'
      .. '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
