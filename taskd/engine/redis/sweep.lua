-- The sweep and the replay, part of script.lua's library: rendered in its place
-- (its marker there), so they share that file's locals (OPS, change, finish, remove, ...).

local function first_score(key)
  local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return head[2]
end

-- Fire what is due: TTL expiry, heartbeat timeouts, cancel grace, lost processes.
-- Every deadline is re-checked against the record, so each fires once whichever
-- process gets there first. Returns the earliest deadline left ('' if none).
OPS.sweep = function(a)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', k(K.EXPIRY), '-inf', NOW, 'LIMIT', 0, SWEEP_BOUND)) do
    redis.call('ZREM', k(K.EXPIRY), id)
    local r = getrec(id)
    if r and TERMINAL[r.st] then
      -- kept while a descendant is active: removed once the last of them ends
      if live_of(id) > 0 then redis.call('SADD', k(K.KEPT), id) else remove(r) end
    end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', k(K.HEARTBEATS), '-inf', NOW, 'LIMIT', 0, SWEEP_BOUND)) do
    redis.call('ZREM', k(K.HEARTBEATS), id)
    local r = getrec(id)
    -- (a held task's own work has ended: it waits for its descendants only)
    if r and ACTIVE[r.st] and not r.hd then change(r, 'failed', {error = TEXT.heartbeat_timeout}) end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', k(K.GRACE), '-inf', NOW, 'LIMIT', 0, SWEEP_BOUND)) do
    redis.call('ZREM', k(K.GRACE), id)
    local r = getrec(id)
    if r and r.st == 'cancelling' and not r.hd then
      local due = tonumber(r.ua) + tonumber(CFG.grace)
      if due > tonumber(NOW) then
        redis.call('ZADD', k(K.GRACE), num(due), id)  -- it reported since
      else
        finish(r, 'cancelled', {error = TEXT.not_acknowledged})
      end
    end
  end
  for _, p in ipairs(redis.call('SMEMBERS', k(K.PROCS))) do
    if redis.call('EXISTS', k(K.ALIVE .. p)) == 0 then
      for _, id in ipairs(redis.call('SMEMBERS', k(K.RUNS .. p))) do
        local r = getrec(id)
        if r and ACTIVE[r.st] and r.pr == p and not r.hd then
          change(r, 'failed', {error = TEXT.process_lost})
        end
      end
      redis.call('DEL', k(K.RUNS .. p))
      redis.call('SREM', k(K.PROCS), p)
    end
  end
  local best = nil
  for _, key in ipairs({k(K.EXPIRY), k(K.HEARTBEATS), k(K.GRACE)}) do
    local s = first_score(key)
    if s and (best == nil or tonumber(s) < tonumber(best)) then best = s end
  end
  return {'sweep', best or ''}
end

-- Changes after a Last-Event-ID: a = {first entry id, count}. Each entry gets its
-- payload back from its record; an entry whose record is gone (deleted, expired,
-- evicted) is left out: what was deleted is never replayed. Returns the number of
-- entries read (a full count means there may be more), {seq, record, ...}, and the
-- sequence numbers of the last and the first entry read.
OPS.replay = function(a)
  local raw = redis.call('XRANGE', k(K.CHANGES), a[1], '+', 'COUNT', a[2])
  local out = {}
  for _, e in ipairs(raw) do
    local f = {}
    for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
    local fi, fr = f[K.ENTRY_ID], f[K.ENTRY_RECORD]
    if fr and fi then
      local text = nil
      if f[K.ENTRY_PAYLOAD] then
        local now = getrec(fi)
        if now then
          -- metadata never changes; a result or error is final once terminal
          local r = cjson.decode(fr)
          r[PAYLOAD[1]] = now[PAYLOAD[1]]
          if TERMINAL[f[K.ENTRY_STATUS]] then
            r[PAYLOAD[2]] = now[PAYLOAD[2]]
            r[PAYLOAD[3]] = now[PAYLOAD[3]]
          end
          text = cjson.encode(r)
        end
      elseif redis.call('EXISTS', k(K.RECORD .. fi)) == 1 then
        text = fr
      end
      if text then
        out[#out + 1] = string.match(e[1], '^(%d+)')
        out[#out + 1] = text
      end
    end
  end
  local first, last = '', ''
  if #raw > 0 then
    first = string.match(raw[1][1], '^(%d+)')
    last = string.match(raw[#raw][1], '^(%d+)')
  end
  return {'replay', #raw, out, last, first}
end
