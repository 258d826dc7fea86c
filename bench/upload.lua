-- wrk script: a real multipart upload with a valid Secret, the same request every time.
--   wrk -s bench/upload.lua URL -- BODY_FILE HEADERS_FILE [METHOD]
-- BODY_FILE is the whole multipart body; HEADERS_FILE has "Name: value" lines (Content-Type with
-- the boundary, Authorization with the Secret); METHOD defaults to POST (bench.inprocess
-- --download sends GET with an empty body). wrk builds the request once per thread, so the
-- client does no per-request work. done() prints one machine-readable line for bench/run.py.

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  for line in io.lines(args[2]) do
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    if name then wrk.headers[name] = value end
  end
  wrk.method = args[3] or "POST"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes_read":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
