-- wrk script for bench/serve_compare.py: POST one pre-built body on every request, then print a
-- machine-readable summary line. Set by the environment:
--   WRK_BODY          path of the body file (sent as is, JSON or binary)
--   WRK_CONTENT_TYPE  Content-Type header (default application/json)
--   WRK_HEADERS       more headers, "Name: value" pairs separated by ";" (e.g. KServe's
--                     Inference-Header-Content-Length for the V2 binary tensor extension)

local function read_file(path)
   local file = assert(io.open(path, "rb"), "WRK_BODY: cannot open " .. tostring(path))
   local content = file:read("*a")
   file:close()
   return content
end

wrk.method = "POST"
wrk.body = read_file(os.getenv("WRK_BODY"))
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "application/json"
for name, value in string.gmatch(os.getenv("WRK_HEADERS") or "", "([^:;]+):%s*([^;]+)") do
   wrk.headers[name:match("^%s*(.-)%s*$")] = value
end

-- Percentiles come from wrk's own latency histogram (microseconds); status counts non-2xx/3xx.
function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
      '"mean_us": %.1f, "max_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
      '"status_errors": %d, "timeouts": %d}\n',
      summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.mean, latency.max, errors.connect, errors.read, errors.write,
      errors.status, errors.timeout))
end
