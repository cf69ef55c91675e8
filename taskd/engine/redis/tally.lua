-- The deployment's task counters, for /metrics and /api/v1/stats (docs/operations.md).
-- Spliced into the library (script.lua, before change()) and called by the calls that
-- move a task, so a count is written atomically with the transition it counts,
-- whichever process (or sweep) makes it, and any process reads the same totals.
-- What is counted mirrors taskd._counters.TaskCounters: tasks finished by type and
-- status, run (started -> finished) and wait (created -> started) times in histogram
-- buckets, and tasks finished per minute. Record fields are text (seconds as decimal
-- text): r.ty type, r.st status, r.ca created, r.sa started, r.fa finished. The
-- bucket bounds, the type cap and OTHER come from taskd._counters; the key names (K)
-- from taskd.engine.redis.keys, whose legend says what each holds.

@COUNTERS@

-- At most MAX_TYPES task types get series of their own, the first seen (a counter
-- cannot move between series without breaking rate()); later ones count as OTHER.
local function tally_type(ty)
  local set = k(K.TASK_TYPES)
  if redis.call('SISMEMBER', set, ty) == 1 then return ty end
  if redis.call('SCARD', set) >= MAX_TYPES then return OTHER end
  redis.call('SADD', set, ty)
  return ty
end

-- One observation: its bucket ("<slot>\n<type>", slot 1 for the first bound,
-- #BUCKETS + 1 for +Inf; per bucket, not cumulative) and the sum ("s\n<type>", in
-- whole microseconds: an integer HINCRBY costs less than HINCRBYFLOAT).
local function observe(key, ty, seconds)
  if seconds < 0 then seconds = 0 end  -- a clock step back counts as 0, as in Python
  local slot = #BUCKETS + 1
  for i, bound in ipairs(BUCKETS) do
    if seconds <= bound then slot = i; break end
  end
  redis.call('HINCRBY', key, slot .. '\n' .. ty, 1)
  redis.call('HINCRBY', key, 's\n' .. ty, string.format('%d', math.floor(seconds * 1e6 + 0.5)))
end

-- r just became running: how long it waited (0 for a spawned task).
local function tally_started(r)
  observe(k(K.WAIT_SECONDS), tally_type(r.ty), tonumber(r.sa) - tonumber(r.ca))
end

-- r just reached a terminal status (r.st): the finished count, its run time if it
-- started, and its minute. Minutes are kept one hash per hour ("<minute>\n<status>"),
-- so the last hour is two reads; each hash expires MINUTES_TTL seconds after its
-- first count, once the chart's hour has passed it.
local function tally_finished(r)
  local ty = tally_type(r.ty)
  redis.call('HINCRBY', k(K.FINISHED), ty .. '\n' .. r.st, 1)
  local fa = tonumber(r.fa)
  if r.sa then observe(k(K.RUN_SECONDS), ty, fa - tonumber(r.sa)) end
  local minute = math.floor(fa / 60)
  local key = k(K.PER_MINUTE .. string.format('%d', math.floor(minute / 60)))
  if redis.call('HINCRBY', key, string.format('%d', minute) .. '\n' .. r.st, 1) == 1 then
    -- a new field, maybe a new hash (its first field always is): give it its expiry
    redis.call('EXPIRE', key, MINUTES_TTL, 'NX')
  end
end
