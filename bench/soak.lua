-- wrk script for bench/soak: POSTs one file (SOAK_BODY, Content-Type SOAK_TYPE) to every request
-- and counts the answers by status; done() prints one "status CODE COUNT" line per status.
local path = os.getenv("SOAK_BODY")
local f = assert(io.open(path, "rb"), "cannot open SOAK_BODY " .. tostring(path))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("SOAK_TYPE") or "image/jpeg"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do
      total[code] = (total[code] or 0) + n
    end
  end
  for code, n in pairs(total) do
    io.write(string.format("status %d %d\n", code, n))
  end
  io.write(string.format("latency_ms p50 %.1f p99 %.1f max %.1f\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
