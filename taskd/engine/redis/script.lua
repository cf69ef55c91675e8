-- taskd's shared task space: every command is one call of a function of this
-- library (FCALL), atomic. keys[1] is the deployment's key base ("{prefix}"): every
-- key starts with it, so a deployment lives in one Redis Cluster slot. args[1] is the
-- command, args[2] the caller's clock (seconds, as text), args[3] the same in whole
-- microseconds, args[4] the caller's settings (JSON); the rest depends on the
-- command. Records are hashes of text fields, never decoded here: times and numbers
-- are compared as numbers but stored as the caller sent them.
-- The rule tables, field names and error texts below are generated from
-- taskd.engine.rules and taskd.engine.codec, and every key suffix (K) from
-- taskd.engine.redis.keys, where their legend is (taskd.engine.redis.space renders them).
-- Three parts live in files of their own and are rendered in their places (the
-- markers below): the task trees (trees.lua), the sweep and replay (sweep.lua) and
-- the task counters (tally.lua).

@RULES@
@KEYS@
local SWEEP_BOUND = 256

local B, NOW, NOW_US, CFG
-- Per call: the tasks whose last active descendant just ended (their held outcome,
-- or a removal kept back, is due), and whether a cancel cascades (what it frees is
-- applied once it is done: a parent freed mid-cascade would apply an outcome the
-- cancel replaces). Task trees: docs/trees.md.
local FREED, CASCADING

local function k(s) return B .. s end
local function num(x) return string.format('%.17g', x) end

-- A record is one string key holding its JSON text (an object of text fields): a
-- read is one plain GET (a process reads records without this library), and a
-- write decodes it, changes it, and encodes it once.
local function getrec(id)
  local text = redis.call('GET', k(K.RECORD .. id))
  if not text then return nil end
  return cjson.decode(text), text
end

local function save(r)
  local text = cjson.encode(r)
  redis.call('SET', k(K.RECORD .. r.id), text)
  return text
end

local function visible(r, scope)
  if r == nil then return false end
  if scope == '*' then return true end
  if scope == '-' then return r.ow == nil end
  return r.ow == string.sub(scope, 2)
end

local function owner_key(r)
  if r.ow == nil then return '-' end
  return 's' .. r.ow
end

local function dedup_key(ow, ty, rs)
  -- length-prefixed owner: no owner string can make two keys collide
  local o = ow or ''
  local tag = ow and 's' or '-'
  return tag .. #o .. ':' .. o .. ty .. '\n' .. rs
end

local function count(ty, st, delta)
  local f = ty .. '\n' .. st
  if redis.call('HINCRBY', k(K.COUNTS), f, delta) <= 0 then redis.call('HDEL', k(K.COUNTS), f) end
end

local function active(r, delta)
  redis.call('INCRBY', k(K.ACTIVE), delta)
  local ok = owner_key(r)
  if redis.call('HINCRBY', k(K.ACTIVE_BY_OWNER), ok, delta) <= 0 then redis.call('HDEL', k(K.ACTIVE_BY_OWNER), ok) end
end

local function index(r, cmd)
  local id = r.id
  if cmd == 'ZADD' then
    redis.call('ZADD', k(K.ALL), 0, id)
    redis.call('ZADD', k(K.BY_STATUS .. r.st), 0, id)
    redis.call('ZADD', k(K.BY_TYPE .. r.ty), 0, id)
    if r.ow then redis.call('ZADD', k(K.BY_OWNER .. r.ow), 0, id) else redis.call('ZADD', k(K.UNOWNED), 0, id) end
    if r.rs then redis.call('ZADD', k(K.BY_RESOURCE .. r.rs), 0, id) end
    if r.pa then redis.call('ZADD', k(K.BY_PARENT .. r.pa), 0, id) end
    count(r.ty, r.st, 1)
  else
    redis.call('ZREM', k(K.ALL), id)
    redis.call('ZREM', k(K.BY_STATUS .. r.st), id)
    redis.call('ZREM', k(K.BY_TYPE .. r.ty), id)
    if r.ow then redis.call('ZREM', k(K.BY_OWNER .. r.ow), id) else redis.call('ZREM', k(K.UNOWNED), id) end
    if r.rs then redis.call('ZREM', k(K.BY_RESOURCE .. r.rs), id) end
    if r.pa then redis.call('ZREM', k(K.BY_PARENT .. r.pa), id) end
    count(r.ty, r.st, -1)
  end
end

-- quiet: a new version only of what the record says of its children (their counts,
-- and the progress derived from them): not a note to the process that runs it (its
-- runner has no use for it, and a note of cancelling would cancel its coroutine again)
local function emit(r, quiet)
  local seqkey = k(K.SEQ)
  if redis.call('EXISTS', seqkey) == 0 then
    -- a new task space: event ids start at this instant (in microseconds), so they
    -- stay above any id a client kept from an earlier space under this prefix
    redis.call('SET', seqkey, NOW_US)
    redis.call('SET', k(K.EPOCH), NOW_US)
  end
  local sq = string.format('%d', redis.call('INCR', seqkey))
  r.sq = sq
  local text = save(r)
  -- The entry carries the version without its payload (metadata, result, error):
  -- only the record holds those, so a delete removes them everywhere, and the
  -- stream's size does not grow with results. Metadata never changes and a result
  -- or error is set only on the final version, so a reader takes them from the
  -- record (ENTRY_PAYLOAD says there are some). Id and status beside it: a reader decodes
  -- only what it has a use for.
  local held = {}
  for _, f in ipairs(PAYLOAD) do
    if r[f] ~= nil then held[f] = r[f]; r[f] = nil end
  end
  local entry = cjson.encode(r)
  local some = false
  for f, v in pairs(held) do r[f] = v; some = true end
  local flag = ''
  if some then
    flag = '1'
    redis.call('XADD', k(K.CHANGES), 'MAXLEN', '~', CFG.stream_len, sq .. '-0',
               K.ENTRY_ID, r.id, K.ENTRY_STATUS, r.st, K.ENTRY_RECORD, entry,
               K.ENTRY_PAYLOAD, flag)
  else
    redis.call('XADD', k(K.CHANGES), 'MAXLEN', '~', CFG.stream_len, sq .. '-0',
               K.ENTRY_ID, r.id, K.ENTRY_STATUS, r.st, K.ENTRY_RECORD, entry)
  end
  -- The change as a note to the processes that follow this task (its channel:
  -- waiters, event streams) and to the one that runs it (its process's channel), so
  -- that a process reads the changes it has in hand, not the whole stream. Sharded
  -- pub/sub: the channels hash to this deployment's slot. A note is not kept (unlike
  -- the entry): it carries the whole version, payload included, and a follower
  -- reads nothing more. (JSON has no raw newline.)
  local note = sq .. '\n' .. r.id .. '\n' .. r.st .. '\n\n' .. text
  redis.call('SPUBLISH', k(K.TASK_NOTES .. r.id), note)
  if r.pr and not quiet then redis.call('SPUBLISH', k(K.PROC_NOTES .. r.pr), note) end
  return text
end

@TREES@

local function err(...) return {'err', ...} end

@TALLY@
local free

-- Move r to status if the table allows it (the same status: a progress report).
-- Returns the new record, or nil and an error reply. o.held: the outcome (hd text) to
-- apply once no descendant is active (an active record keeps the one it holds; a
-- terminal one holds none); with it, any active task may turn cancelling.
local function change(r, status, o)
  if TERMINAL[r.st] or (status ~= r.st and not TRANS[r.st][status]
      and not (o.held and status == 'cancelling')) then
    return nil, err('invalid', r.id, r.st, o.action or status)
  end
  local at = NOW
  if tonumber(NOW) <= tonumber(r.ua) then at = r.ua end
  local old = r.st
  r.st = status
  r.ua = at
  if status == 'running' and r.sa == nil then r.sa = at end
  if TERMINAL[status] then r.fa = at else r.fa = nil end
  if status == 'completed' then
    r.pg = '1.0'; r.ms = nil; r.sg = nil; r.rz = o.result
  else
    if o.progress then r.pg = o.progress end
    if o.message then r.ms = o.message end
    if o.stage and o.stage ~= r.sg then
      -- a stage change, kept in the history: the latest MAX_STAGES
      local sh = {}
      if r.sh then sh = cjson.decode(r.sh) end
      sh[#sh + 1] = {o.stage, at, status}
      while #sh > MAX_STAGES do table.remove(sh, 1) end
      r.sh = cjson.encode(sh)
    end
    if o.stage then r.sg = o.stage end
    r.rz = nil
  end
  if status == 'failed' or status == 'cancelled' then r.er = o.error else r.er = nil end
  if TERMINAL[status] then r.hd = nil elseif o.held then r.hd = o.held end
  if old ~= status then
    redis.call('ZREM', k(K.BY_STATUS .. old), r.id)
    redis.call('ZADD', k(K.BY_STATUS .. status), 0, r.id)
    count(r.ty, old, -1)
    count(r.ty, status, 1)
    if status == 'running' then tally_started(r) end
    if TERMINAL[status] then
      tally_finished(r)
      active(r, -1)
      if r.rs then
        local dk = dedup_key(r.ow, r.ty, r.rs)
        if redis.call('HGET', k(K.DEDUP), dk) == r.id then redis.call('HDEL', k(K.DEDUP), dk) end
      end
      redis.call('ZADD', k(K.EXPIRY), num(tonumber(at) + tonumber(CFG['ttl_' .. status])), r.id)
      redis.call('ZREM', k(K.HEARTBEATS), r.id)
      redis.call('ZREM', k(K.GRACE), r.id)
      if r.pr then redis.call('SREM', k(K.RUNS .. r.pr), r.id) end
    elseif status == 'cancelling' then
      redis.call('ZADD', k(K.GRACE), num(tonumber(at) + tonumber(CFG.grace)), r.id)
    end
  end
  -- (held: its own work has ended, its process runs it no more)
  if o.held and r.pr then redis.call('SREM', k(K.RUNS .. r.pr), r.id) end
  local text = emit(r)
  if TERMINAL[status] and r.cb then
    redis.call('XADD', k(K.OUTBOX), 'MAXLEN', '~', 100000, '*', K.ENTRY_RECORD, text)
  end
  if r.pa and old ~= status then
    local delta = 0
    if TERMINAL[status] then delta = -1 end
    child_moved(r.pa, old, status, delta)
  end
  if FREED[1] and CASCADING == 0 then free() end
  return r, text
end

-- End r's own work with status: now, or held while a descendant is active (cancelled:
-- cancelling until then; the completed of a task awaiting its children: its status
-- kept, its progress the share of its children finished).
local function finish(r, status, o)
  if (status == 'cancelled' or (status == 'completed' and r.aw)) and live_of(r.id) > 0 then
    -- (held only where the table allows the move: it is applied as it is)
    if TERMINAL[r.st] or not TRANS[r.st][status] then
      return nil, err('invalid', r.id, r.st, o.action or status)
    end
    local hd = {st = status}
    if o.result then hd.rz = o.result end
    if o.error then hd.er = o.error end
    local held = cjson.encode(hd)
    if status == 'cancelled' then
      return change(r, 'cancelling', {held = held, action = o.action})
    end
    local counts = nil
    if r.ch then counts = cjson.decode(r.ch) end
    return change(r, r.st, {held = held, action = o.action, progress = share(counts)})
  end
  return change(r, status, o)
end

-- Apply what waited for a task's last active descendant: its held outcome, or the
-- removal its TTL asked for.
free = function()
  while FREED[1] do
    local id = table.remove(FREED)
    local r = getrec(id)
    if r then
      if r.hd and not TERMINAL[r.st] then
        local held = cjson.decode(r.hd)
        change(r, held.st, {result = held.rz, error = held.er})
      elseif redis.call('SISMEMBER', k(K.KEPT), id) == 1 then
        remove(r)
      end
    end
  end
end

-- Records travel as their stored JSON text: a reply of one bulk string is far cheaper
-- to parse on the client than an array of fields. reply(r, text), or reply(nil, err).
local function reply(r, x)
  if r == nil then return x end
  return {'rec', x}
end

local function beat(r)
  if r.hb then redis.call('ZADD', k(K.HEARTBEATS), num(tonumber(NOW) + tonumber(r.hb)), r.id) end
end

-- The oldest finished record without an active descendant (nil: none).
local function oldest_terminal()
  local best = nil
  local live = k(K.LIVE)
  for st, _ in pairs(TERMINAL) do
    local key = k(K.BY_STATUS .. st)
    local at, head = 0, nil
    repeat
      local ids = redis.call('ZRANGE', key, at, at + 63)
      for _, id in ipairs(ids) do
        if redis.call('HEXISTS', live, id) == 0 then head = id; break end
      end
      at = at + 64
    until head or #ids < 64
    if head and (best == nil or head < best) then best = head end
  end
  return best
end

-- create / spawn: a = {scope-or-owner, type, resource, metadata, callback, heartbeat,
-- random, traceparent, parent, await_children ('1' or ''), process (spawn only)}
local function insert(a, spawn)
  local owner = a[1]
  local ow = nil
  if owner ~= '-' then ow = string.sub(owner, 2) end
  local ty, rs = a[2], a[3]
  if rs == '' then rs = nil end
  local pa = a[9]
  if pa == '' then pa = nil end
  if pa then
    -- the parent: one the new task's owner sees, that takes children
    local p = getrec(pa)
    if not visible(p, owner) then return err('not_found', pa) end
    if not ACTIVE[p.st] or p.st == 'cancelling' then
      return err('invalid', pa, p.st, TEXT.add_child_verb)
    end
  end
  if rs then
    local holder = redis.call('HGET', k(K.DEDUP), dedup_key(ow, ty, rs))
    if holder then return err('conflict', holder, ty, rs) end
  end
  local quota = tonumber(CFG.quota)
  if quota and (tonumber(redis.call('HGET', k(K.ACTIVE_BY_OWNER), owner)) or 0) >= quota then
    return err('quota', CFG.quota)
  end
  local cap = tonumber(CFG.max_tasks)
  if redis.call('ZCARD', k(K.ALL)) >= cap then
    if (tonumber(redis.call('GET', k(K.ACTIVE))) or 0) >= cap then
      return err('full', CFG.max_tasks)
    end
    while redis.call('ZCARD', k(K.ALL)) >= cap do
      local oldest = oldest_terminal()
      if oldest == nil then return err('full', CFG.max_tasks, 'parents') end
      remove(getrec(oldest))
    end
  end
  local stamp = tonumber(NOW_US)
  local last = tonumber(redis.call('GET', k(K.STAMP))) or 0
  if stamp <= last then stamp = last + 1 end
  redis.call('SET', k(K.STAMP), string.format('%d', stamp))
  -- ids start with their creation instant in fixed-width hex: they sort in creation
  -- order, across every process, which is what the indexes and page cursors rely on
  local id = string.format('%013x', stamp) .. a[7]
  local at = string.format('%d.%06d', math.floor(stamp / 1000000), stamp % 1000000)
  local r = {id = id, ty = ty, st = 'pending', rs = rs, ca = at, ua = at, ow = ow}
  if a[4] ~= '' then r.md = a[4] end
  if a[5] ~= '' then r.cb = a[5] end
  if a[6] ~= '' then r.hb = a[6] end
  if a[8] ~= '' then r.tp = a[8] end
  r.pa = pa
  if a[10] == '1' then r.aw = '1' end
  if spawn then
    r.st = 'running'; r.sa = at; r.ip = '1'; r.pr = a[11]
    redis.call('SADD', k(K.RUNS .. a[11]), id)
    redis.call('SADD', k(K.PROCS), a[11])
    tally_started(r)
  end
  index(r, 'ZADD')
  active(r, 1)
  if rs then redis.call('HSET', k(K.DEDUP), dedup_key(ow, ty, rs), id) end
  if r.hb then redis.call('ZADD', k(K.HEARTBEATS), num(tonumber(at) + tonumber(r.hb)), id) end
  local text = emit(r)
  if pa then child_moved(pa, nil, r.st, 1) end
  return {'rec', text}
end

local function lookup(id, scope)
  local r, text = getrec(id)
  if not visible(r, scope) then return nil, err('not_found', id) end
  return r, text
end

local function external(r, action)
  if r.ip and not TERMINAL[r.st] then
    return err('invalid', r.id, TEXT.run_by_tracker, action)
  end
  if r.hd then return err('invalid', r.id, TEXT.waiting_for_children, action) end
end

local OPS = {}

OPS.create = function(a) return insert(a, false) end
OPS.spawn = function(a) return insert(a, true) end


OPS.start = function(a)
  local r, e = lookup(a[1], a[2])
  if r == nil then return e end
  e = external(r, 'start')
  if e then return e end
  if not START_FROM[r.st] then return err('invalid', r.id, r.st, 'start') end
  beat(r)
  return reply(change(r, 'running', {action = 'start'}))
end

OPS.progress = function(a)
  local r, e = lookup(a[1], a[2])
  if r == nil then return e end
  if not PROGRESS_ON[r.st] then return err('invalid', r.id, r.st, TEXT.progress_verb) end
  beat(r)
  local o = {}
  if a[3] ~= '' then o.progress = a[3] end
  if a[4] ~= '\0' then o.message = a[4] end
  if a[5] and a[5] ~= '' then o.stage = a[5] end
  return reply(change(r, r.st, o))
end

OPS.complete = function(a)
  local r, e = lookup(a[1], a[2])
  if r == nil then return e end
  e = external(r, 'complete')
  if e then return e end
  local result = nil
  if a[3] ~= '' then result = a[3] end
  return reply(finish(r, 'completed', {result = result, action = 'complete'}))
end

OPS.fail = function(a)
  local r, e = lookup(a[1], a[2])
  if r == nil then return e end
  e = external(r, 'fail')
  if e then return e end
  return reply(change(r, 'failed', {error = a[3], action = 'fail'}))
end

local cancel_one

-- Cancel the active descendants of task id (each with its subtree), children oldest
-- first, each as a direct cancel without confirm would.
local function cascade(id, reason)
  if live_of(id) == 0 then return end
  for _, cid in ipairs(redis.call('ZRANGE', k(K.BY_PARENT .. id), 0, -1)) do
    local c = getrec(cid)
    if c then
      if ACTIVE[c.st] then
        cancel_one(c, reason, false)
      else  -- (finished, with active descendants of its own: they are reached)
        cascade(cid, reason)
      end
    end
  end
end

-- Cancel r and its active descendants (deepest first): the new record and its text,
-- r and 'same' when the cancel changes nothing, or nil and an error reply.
cancel_one = function(r, reason, confirm)
  -- the process that runs a spawned task hears of cancelling on its change stream and
  -- cancels the coroutine; the record turns cancelled once that has unwound
  -- confirm: the worker of an external task acknowledges
  local moves = CANCEL_EXTERNAL
  if r.ip then moves = CANCEL_SPAWNED elseif confirm then moves = CONFIRM_EXTERNAL end
  local to = moves[r.st]
  if to == nil then return nil, err('invalid', r.id, r.st, 'cancel') end
  -- asked before, or done: idempotent, the record as it is
  if to == r.st then return r, 'same' end
  cascade(r.id, reason)
  r = getrec(r.id)  -- (its children's counts moved)
  -- an external task whose descendants are still active after the cascade: its work
  -- is theirs, so it is cancelled once they have settled, not when its worker confirms
  local waits = not r.ip and live_of(r.id) > 0
  -- (a held task's own work has ended: there is no one left to ask)
  if to == 'cancelled' or r.hd or waits then return finish(r, 'cancelled', {error = reason}) end
  return change(r, to, {action = 'cancel'})
end

OPS.cancel = function(a)
  local r, e = lookup(a[1], a[2])
  if r == nil then return e end
  local text = e
  CASCADING = CASCADING + 1
  local out, x = cancel_one(r, a[3], a[4] == '1')
  CASCADING = CASCADING - 1
  if out == nil then return x end
  if x == 'same' then return {'same', text} end
  if FREED[1] then
    free()
    local _, now = getrec(r.id)
    if now then x = now end
  end
  return {'rec', x}
end

-- a spawned coroutine's runner ran out of time: cancelling while it unwinds
OPS.timeout = function(a)
  local r = getrec(a[1])
  if r == nil or r.pr ~= a[2] or r.st ~= 'running' then return {'none'} end
  return reply(change(r, 'cancelling', {}))
end

-- a spawned coroutine ended on process a[2]: a[3] outcome, a[4] result, a[5] error.
-- Only the process that runs it may record it, and only while it is active: a process
-- that was declared lost cannot write over what was recorded since.
OPS.ended = function(a)
  local r, text = getrec(a[1])
  if r == nil then return {'none'} end
  if r.pr ~= a[2] or TERMINAL[r.st] then return {'was', text} end
  -- its end was decided (its cancel grace ran out): it waits for its descendants
  if r.hd then return {'rec', text} end
  local o = {}
  if a[3] ~= 'completed' then o.error = a[5] elseif a[4] ~= '' then o.result = a[4] end
  -- (cancelled with active descendants: held, and out of its process's runs)
  return reply(finish(r, a[3], o))
end

-- a finished task and its subtree (all finished): {'ok', number of records removed}
OPS.delete = function(a)
  local r, e = lookup(a[1], a[2])
  if r == nil then return e end
  if not DELETE_FROM[r.st] then return err('invalid', r.id, r.st, 'delete') end
  if live_of(r.id) > 0 then return err('invalid', r.id, TEXT.active_descendants, 'delete') end
  return {'ok', remove_tree(r)}
end

-- one task of a bulk delete, with its subtree: deleted if still visible and deletable
-- and no descendant is active, else skipped (never an error: the batch goes on);
-- {'ok', number of records removed}
OPS.purge = function(a)
  local r = getrec(a[1])
  if not visible(r, a[2]) or not DELETE_FROM[r.st] or live_of(r.id) > 0 then
    return {'skip'}
  end
  return {'ok', remove_tree(r)}
end

@SWEEP@

-- The entry points. This file is a Redis Functions library (FUNCTION LOAD): the
-- tables and functions above are built once, when the library loads, and each call
-- runs only its command. Two functions share the code: @NAME@ for every command
-- (it may write, so Redis refuses it when full or on a replica), and @NAME@_ro,
-- flagged no-writes, for the commands that only read, which Redis still runs when it
-- is over maxmemory: reads go on while writes are refused.
-- (library code runs at load time without Lua's standard functions: no pairs here)
local RO = {replay = OPS.replay}
local cfg_text = nil

local function run(keys, args, ops)
  B = keys[1]
  FREED = {}
  CASCADING = 0
  NOW = args[2]
  NOW_US = args[3]
  -- every process sends its settings with each call: decoded once per text
  if args[4] ~= cfg_text then
    CFG = cjson.decode(args[4])
    cfg_text = args[4]
  end
  local op = ops[args[1]]
  if op == nil then return redis.error_reply('taskd: unknown command ' .. tostring(args[1])) end
  local a = {}
  for i = 5, #args do a[#a + 1] = args[i] end
  return op(a)
end

redis.register_function{
  function_name = '@NAME@',
  callback = function(keys, args) return run(keys, args, OPS) end,
}
redis.register_function{
  function_name = '@NAME@_ro',
  callback = function(keys, args) return run(keys, args, RO) end,
  flags = {'no-writes'},
}
