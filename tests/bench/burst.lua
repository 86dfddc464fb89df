-- wrk script for the overload burst: POST BENCH_BODY, and latency percentiles *per status*.
--
-- wrk measures latency for all responses together, and its response() callback does not say which
-- request an answer belongs to. So every request carries its send time (CLOCK_MONOTONIC, in
-- microseconds) in its x-correlation-id, which the gateway echoes on every answer, its refusals
-- included; response() subtracts it from the time the answer arrived, and counts it in a histogram
-- per status with buckets 2 % wide (a few hundred buckets per status, however many answers: wrk
-- copies each thread's table into the main one at the end). The summary line ("BURST {...}")
-- gives per status: count, p50, p99 and max in microseconds, each within 2 %.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now_ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now_ts)
  return tonumber(now_ts.tv_sec) * 1000000 + math.floor(tonumber(now_ts.tv_nsec) / 1000)
end

local body = os.getenv("BENCH_BODY") or '{"items":[{"sku":"BK-12","qty":1}]}'
local threads = {}
local counter = 0

function setup(thread)
  table.insert(threads, thread)
end

local GROWTH = math.log(1.02)
local function bucket(us) return math.floor(math.log(us + 1) / GROWTH) end
local function bucket_top(b) return math.floor(math.exp((b + 1) * GROWTH)) - 1 end

function init(args)
  -- "status:bucket" -> count. Flat, with string keys: thread:get copies tables into the main
  -- state, and wrk's copy mishandles nested tables with number keys ("invalid key to 'next'").
  histograms = {}
  maxima = {}     -- status -> slowest answer in microseconds
  unmatched = 0
end

function request()
  counter = counter + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["x-correlation-id"] = string.format("burst-%d-%d", now_us(), counter),
  }
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, _)
  local id = headers["x-correlation-id"] or headers["X-Correlation-Id"]
  local sent = id and tonumber(string.match(id, "^burst%-(%d+)%-"))
  if not sent then
    unmatched = unmatched + 1
    return
  end
  local key = tostring(status)
  local us = now_us() - sent
  local slot = key .. ":" .. bucket(us)
  histograms[slot] = (histograms[slot] or 0) + 1
  if (maxima[key] or 0) < us then maxima[key] = us end
end

-- The upper bound of the bucket holding the p-th percentile of `counts` ({bucket -> count}).
local function percentile(counts, total, p)
  local buckets = {}
  for b in pairs(counts) do buckets[#buckets + 1] = b end
  table.sort(buckets)
  local rank, seen = math.max(1, math.ceil(total * p / 100)), 0
  for _, b in ipairs(buckets) do
    seen = seen + counts[b]
    if seen >= rank then return bucket_top(b) end
  end
  return 0
end

function done(summary, _, _)
  local merged, totals, slowest, missing = {}, {}, {}, 0
  for _, thread in ipairs(threads) do
    missing = missing + (thread:get("unmatched") or 0)
    for status, max in pairs(thread:get("maxima") or {}) do
      if (slowest[status] or 0) < max then slowest[status] = max end
    end
    for slot, n in pairs(thread:get("histograms") or {}) do
      local status, b = string.match(slot, "^(%d+):(%d+)$")
      b = tonumber(b)
      local into = merged[status] or {}
      into[b] = (into[b] or 0) + n
      merged[status] = into
      totals[status] = (totals[status] or 0) + n
    end
  end
  local parts = {}
  for status, counts in pairs(merged) do
    local total = totals[status]
    parts[#parts + 1] = string.format('"%s":{"count":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}',
      status, total, percentile(counts, total, 50), percentile(counts, total, 99), slowest[status])
  end
  local e = summary.errors
  io.write(string.format(
    'BURST {"duration_us":%d,"requests":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,' ..
    '"unmatched":%d,"statuses":{%s}}\n',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.timeout, missing,
    table.concat(parts, ",")))
end
