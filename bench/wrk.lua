-- wrk script for bench/run.py: one file for the four workloads.
--
--   wrk -t1 -c32 -d5s -s bench/wrk.lua http://127.0.0.1:PORT -- WORKLOAD STYLE IDS_FILE
--
-- WORKLOAD: list | get | create | mixed
-- STYLE:    json  (the project and the ceiling: POST/PATCH bodies are JSON)
--           query (the FastAPI reference: POST /todos?title=…, PATCH /todos/{id}?completed=…)
-- IDS_FILE: one todo id per line (uuids or integers), the seeded rows, for get/mixed.
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

function init(args)
  local workload, style, ids = args[1] or "list", args[2] or "json", load_ids(args[3])
  math.randomseed((tid or 1) * 7919 + os.time())
  local list = wrk.format("GET", "/todos")
  local create, patch_of
  if style == "query" then
    create = wrk.format("POST", "/todos?title=bench%20todo")
    patch_of = function(id) return wrk.format("PATCH", "/todos/" .. id .. "?completed=true") end
  else
    create = wrk.format("POST", "/todos", {["Content-Type"] = "application/json"},
                        '{"title":"bench todo"}')
    patch_of = function(id)
      return wrk.format("PATCH", "/todos/" .. id, {["Content-Type"] = "application/json"},
                        '{"completed":true}')
    end
  end
  local gets, patches = {}, {}
  for i, id in ipairs(ids) do
    gets[i] = wrk.format("GET", "/todos/" .. id)
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
