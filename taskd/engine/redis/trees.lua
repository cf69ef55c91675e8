-- Task trees (docs/trees.md), part of script.lua's library: rendered in its place
-- (its marker there), so it shares that file's locals (k, getrec, save, emit, index, ...).

-- --- trees: parent links (docs/trees.md) -------------------------------------------
-- A record names its parent (pa). The children of each parent are an index (c:<id>);
-- each task's number of active descendants (all depths) is a field of K.LIVE (none:
-- no field); the children's counts by status are in the parent's record (ch, JSON
-- text), as is the outcome it holds for its descendants (hd, JSON text).

local function live_of(id)
  return tonumber(redis.call('HGET', k(K.LIVE), id)) or 0
end

-- The share of a parent's children that are finished, as its progress: counts is
-- the decoded ch (nil: none).
local function share(counts)
  local total, done = 0, 0
  for st, n in pairs(counts or {}) do
    total = total + n
    if TERMINAL[st] then done = done + n end
  end
  if total < 1 then total = 1 end
  return string.format('%.4f', done / total)
end

-- A child of pa moved from status old to new (nil: added, removed): the parent's
-- counts follow, as a new version of it (its ua unchanged); a parent holding a
-- completed outcome (await_children) shows the share of its children finished as
-- its progress. delta: the child became active (1) or ended (-1): every ancestor's
-- number of active descendants follows, and one that reaches 0 is freed.
local function child_moved(pa, old, new, delta)
  local p = getrec(pa)
  if p then
    local counts = {}
    if p.ch then counts = cjson.decode(p.ch) end
    if old then
      local n = (counts[old] or 0) - 1
      if n > 0 then counts[old] = n else counts[old] = nil end
    end
    if new then counts[new] = (counts[new] or 0) + 1 end
    if next(counts) == nil then
      p.ch = nil
    else
      p.ch = cjson.encode(counts)
      if p.hd and cjson.decode(p.hd).st == 'completed' then p.pg = share(counts) end
    end
    emit(p, true)
  end
  if delta == 0 then return end
  local up = p
  while pa do
    local n = redis.call('HINCRBY', k(K.LIVE), pa, delta)
    if n <= 0 then
      redis.call('HDEL', k(K.LIVE), pa)
      if n == 0 and delta < 0 then FREED[#FREED + 1] = pa end
    end
    if up == nil then break end
    pa = up.pa
    if pa then up = getrec(pa) end
  end
end

-- Drop a record (expired, evicted or deleted): its children, if any, stay (their pa
-- then names a task that is gone); its parent's counts follow.
local function remove(r)
  index(r, 'ZREM')
  redis.call('DEL', k(K.RECORD .. r.id))
  redis.call('ZREM', k(K.EXPIRY), r.id)
  redis.call('ZREM', k(K.HEARTBEATS), r.id)
  redis.call('ZREM', k(K.GRACE), r.id)
  redis.call('SREM', k(K.KEPT), r.id)
  local delta = 0
  if ACTIVE[r.st] then
    active(r, -1)
    delta = -1
    if r.rs and redis.call('HGET', k(K.DEDUP), dedup_key(r.ow, r.ty, r.rs)) == r.id then
      redis.call('HDEL', k(K.DEDUP), dedup_key(r.ow, r.ty, r.rs))
    end
  end
  if r.pa then child_moved(r.pa, r.st, nil, delta) end
end

-- Remove a finished task and its subtree (parents first: a parent gone is not
-- recounted); the number of records removed.
local function remove_tree(r)
  local doomed = {r}
  local i = 1
  while i <= #doomed do
    for _, cid in ipairs(redis.call('ZRANGE', k(K.BY_PARENT .. doomed[i].id), 0, -1)) do
      local c = getrec(cid)
      if c then doomed[#doomed + 1] = c end
    end
    i = i + 1
  end
  for _, d in ipairs(doomed) do remove(d) end
  return #doomed
end
