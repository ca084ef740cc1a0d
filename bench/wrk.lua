-- wrk script for bench/run.py: one file for the four workloads.
--
--   wrk -t1 -c32 -d5s -s bench/wrk.lua http://127.0.0.1:PORT -- WORKLOAD STYLE IDS_FILE [PROXY [DELAY_MS]]
--
-- WORKLOAD: list | get | create | mixed
-- STYLE:    json  (the project and the ceiling: POST/PATCH bodies are JSON)
--           query (the FastAPI reference: POST /todos?title=…, PATCH /todos/{id}?completed=…)
-- IDS_FILE: one todo id per line (uuids or integers), the seeded rows, for get/mixed.
-- PROXY:    "vercel" adds the headers Vercel's proxy puts on every request (the runtime
--           reads and strips the x-vercel-internal-* ones), as tests/vercel_harness.py does.
-- DELAY_MS: each connection waits this long before each request ("-": none): a paced load,
--           about connections × 1000 / DELAY_MS requests/s, for comparing CPU at one rate.
--
-- mixed is a fixed 20-request cycle: 10 list, 6 get-by-id, 2 create, 2 patch (50/30/10/10).
-- Requests are formatted once at start; a request only picks a precomputed string.
-- done() prints one line "BENCHJSON {...}" that bench/run.py parses.

local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

local function load_ids(path)
  local ids = {}
  if path == nil or path == "" or path == "-" then return ids end
  local file = assert(io.open(path, "r"))
  for line in file:lines() do
    if line ~= "" then ids[#ids + 1] = line end
  end
  file:close()
  return ids
end

local PROXY_HEADERS = {
  ["x-forwarded-host"] = "aurora-todo.vercel.app", ["x-forwarded-proto"] = "https",
  ["x-forwarded-for"] = "203.0.113.7", ["x-real-ip"] = "203.0.113.7",
  ["x-vercel-forwarded-for"] = "203.0.113.7", ["x-vercel-deployment-url"] = "aurora-todo.vercel.app",
  ["x-vercel-id"] = "iad1::iad1::bench-1",
  ["x-vercel-internal-invocation-id"] = "6f1c2b9e-0000-4000-8000-000000000001",
  ["x-vercel-internal-request-id"] = "1",
  ["x-vercel-internal-span-id"] = "00f067aa0ba902b7",
  ["x-vercel-internal-trace-id"] = "4bf92f3577b34da6a3ce929d0e0e4736",
  ["x-vercel-internal-deadline"] = "2099-01-01T00:00:00.000Z",
}

function init(args)
  local workload, style, ids = args[1] or "list", args[2] or "json", load_ids(args[3])
  local proxy = args[4] == "vercel"
  local pause = tonumber(args[5] or "")
  if pause then delay = function() return pause end end
  math.randomseed((tid or 1) * 7919 + os.time())
  local function headers(extra)
    local all = {}
    if proxy then for k, v in pairs(PROXY_HEADERS) do all[k] = v end end
    for k, v in pairs(extra or {}) do all[k] = v end
    return all
  end
  local json = {["Content-Type"] = "application/json"}
  local list = wrk.format("GET", "/todos", headers())
  local create, patch_of
  if style == "query" then
    create = wrk.format("POST", "/todos?title=bench%20todo", headers())
    patch_of = function(id) return wrk.format("PATCH", "/todos/" .. id .. "?completed=true", headers()) end
  else
    create = wrk.format("POST", "/todos", headers(json), '{"title":"bench todo"}')
    patch_of = function(id)
      return wrk.format("PATCH", "/todos/" .. id, headers(json), '{"completed":true}')
    end
  end
  local gets, patches = {}, {}
  for i, id in ipairs(ids) do
    gets[i] = wrk.format("GET", "/todos/" .. id, headers())
    patches[i] = patch_of(id)
  end
  local n = #ids
  if workload == "list" then
    request = function() return list end
  elseif workload == "create" then
    request = function() return create end
  elseif workload == "get" then
    assert(n > 0, "get needs an ids file")
    request = function() return gets[math.random(n)] end
  elseif workload == "mixed" then
    assert(n > 0, "mixed needs an ids file")
    local cycle = {"l", "g", "l", "g", "l", "c", "l", "g", "l", "p",
                   "l", "g", "l", "g", "l", "c", "l", "g", "l", "p"}
    local i = 0
    request = function()
      i = i % 20 + 1
      local kind = cycle[i]
      if kind == "l" then return list
      elseif kind == "g" then return gets[math.random(n)]
      elseif kind == "c" then return create
      else return patches[math.random(n)] end
    end
  else
    error("unknown workload " .. tostring(workload))
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
