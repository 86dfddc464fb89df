-- wrk script for the benchmark: an optional JSON POST body, and one machine-readable summary line.
--
-- BENCH_BODY (environment): when set, every request is a POST of this body as application/json.
-- The summary line ("BENCH {...}") carries what wrk's own report does not: p99.9 and the error
-- counts by kind. wrk counts a response with a status of 400 or more as a "status" error.

local body = os.getenv("BENCH_BODY")
if body ~= nil and body ~= "" then
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
