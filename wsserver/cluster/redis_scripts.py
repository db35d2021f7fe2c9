"""The Lua scripts of the Redis backplane (each one round trip, atomic in Redis).

Frames are never built here: the codec (:mod:`wsserver.wire.codec`) passes
the bytes around an offset as arguments, and a script only puts the offset
between them.
"""

from __future__ import annotations

from ..core.channels import HISTORY_ENTRY_OVERHEAD

__all__ = [
    "ALIVE",
    "ANSWER_CALL",
    "APPEND",
    "CHANNEL",
    "CLAIM_AGENT",
    "CLAIM_SESSION",
    "END",
    "HEARTBEAT",
    "REFRESH_AGENTS",
    "RELEASE_AGENT",
    "ROUTE_CALL",
    "SEND",
]

# One channel operation: ARGV = op, history ttl (s), history size, pub/sub
# channel, an epoch for a new channel, three op-specific values, the head of
# a presence event, the joined flag (sub), the tail of a presence event, the
# bytes all histories may hold, the bytes one publisher's messages may hold,
# the publisher (pub).
#   pub:   ARGV[6], ARGV[7] = the message around its offset, ARGV[14] = the publisher
#   leave: ARGV[6] = the member leaving
#   sub:   ARGV[6] = the member, ARGV[7] = since, ARGV[8] = epoch, ARGV[10] = '1' to join
#
# Histories in bytes: every entry appended is also indexed, oldest first, in
# wss:hist:idx (all channels; its bytes in wss:hist:bytes) and, for a
# publication, in wss:hist:p:{publisher} (bytes in wss:hist:pb:{publisher}).
# Past a bound (or past the ttl) the oldest index entry goes, and its
# channel's history is trimmed up to its offset (MINID: always from the
# front, so a history stays contiguous), unless that channel has a new epoch
# since. The counters count what was appended and not yet let go by its
# index: at least what the histories hold, however they were trimmed.
CHANNEL = """
local op = ARGV[1]
local ttl_ms = math.floor(tonumber(ARGV[2]) * 1000)
local size = tonumber(ARGV[3])
local pubch = ARGV[4]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[1], epoch)
  redis.call('DEL', KEYS[2], KEYS[3])
end
local function let_go(index, counter, used, limit)  -- at most 64 entries per call
  for _ = 1, 64 do
    local oldest = redis.call('XRANGE', index, '-', '+', 'COUNT', 1)[1]
    if not oldest then return used end
    local born = tonumber(string.match(oldest[1], '^(%d+)'))
    if used <= limit and born >= now_ms - ttl_ms then return used end
    local f = oldest[2]  -- h, history key, e, epoch key, v, epoch, o, offset, n, bytes
    redis.call('XDEL', index, oldest[1])
    if redis.call('GET', f[4]) == f[6] then
      redis.call('XTRIM', f[2], 'MINID', (tonumber(f[8]) + 1) .. '-0')
    end
    used = redis.call('DECRBY', counter, tonumber(f[10]))
  end
  return used
end
local function index(off, bytes, publisher)
  local entry = {'h', KEYS[3], 'e', KEYS[1], 'v', epoch, 'o', off, 'n', bytes}
  redis.call('XADD', 'wss:hist:idx', '*', unpack(entry))
  local used = redis.call('INCRBY', 'wss:hist:bytes', bytes)
  redis.call('PEXPIRE', 'wss:hist:idx', ttl_ms)
  redis.call('PEXPIRE', 'wss:hist:bytes', ttl_ms)
  if publisher ~= '' then
    local pidx, pbytes = 'wss:hist:p:' .. publisher, 'wss:hist:pb:' .. publisher
    redis.call('XADD', pidx, '*', unpack(entry))
    local mine = redis.call('INCRBY', pbytes, bytes)
    redis.call('PEXPIRE', pidx, ttl_ms)
    redis.call('PEXPIRE', pbytes, ttl_ms)
    let_go(pidx, pbytes, mine, tonumber(ARGV[13]))
  end
  let_go('wss:hist:idx', 'wss:hist:bytes', used, tonumber(ARGV[12]))
end
local function append(frame_head, frame_tail, publisher)
  local off = redis.call('INCR', KEYS[2])
  local frame = frame_head .. off .. frame_tail
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', size, off .. '-0', 'f', frame, 't', now_ms)
  redis.call('PEXPIRE', KEYS[3], ttl_ms)
  redis.call('PUBLISH', pubch, off .. ' ' .. frame)
  index(off, #frame + @OVERHEAD@, publisher)
  return off
end
local function presence()  -- ARGV[9], ARGV[11]: the event around its offset (built by the codec)
  return append(ARGV[9], ARGV[11], '')
end
if op == 'pub' then
  if redis.call('HLEN', KEYS[4]) == 0 then
    redis.call('PEXPIRE', KEYS[1], ttl_ms)
    redis.call('PEXPIRE', KEYS[2], ttl_ms)
  end
  return append(ARGV[6], ARGV[7], ARGV[14])
elseif op == 'leave' then
  local n = redis.call('HINCRBY', KEYS[4], ARGV[6], -1)
  if n <= 0 then
    redis.call('HDEL', KEYS[4], ARGV[6])
    presence()
  end
  if redis.call('HLEN', KEYS[4]) == 0 then
    redis.call('PEXPIRE', KEYS[1], ttl_ms)
    redis.call('PEXPIRE', KEYS[2], ttl_ms)
  end
  return n
elseif op == 'sub' then
  local offset = tonumber(redis.call('GET', KEYS[2]) or '0')
  local recovered = 0
  local missed = {}
  local since = ARGV[7]
  if since ~= '' and (ARGV[8] == '' or ARGV[8] == epoch) then
    local s = tonumber(since)
    if s >= offset then
      if s == offset then recovered = 1 end
    else
      local entries = redis.call('XRANGE', KEYS[3], (s + 1) .. '-0', '+')
      if #entries > 0 and entries[1][1] == (s + 1) .. '-0' and tonumber(entries[1][2][4]) >= now_ms - ttl_ms then
        recovered = 1
        for i, e in ipairs(entries) do
          if tonumber(string.match(e[1], '^(%d+)')) <= offset then missed[#missed + 1] = e[2][2] end
        end
      end
    end
  end
  local joined = 0
  if ARGV[10] == '1' then
    redis.call('PERSIST', KEYS[1])
    redis.call('PERSIST', KEYS[2])
    joined = redis.call('HINCRBY', KEYS[4], ARGV[6], 1)
  end
  local members = redis.call('HKEYS', KEYS[4])
  if joined == 1 then presence() end
  return {epoch, offset, recovered, missed, members}
end
return redis.error_reply('unknown op ' .. op)
""".replace("@OVERHEAD@", str(HISTORY_ENTRY_OVERHEAD))

# A direct message: 0 no such agent, 1 queued, 2 its queue is full. The queue
# (:dm, its bytes in :dmb) is drained into the session's log while a client
# is attached; while the agent is away it holds at most ARGV[2] messages and
# ARGV[3] bytes (each message counts its stored form: the data, sender and id).
SEND = """
local sid = redis.call('GET', KEYS[1])
if not sid then return 0 end
local key = 'wss:s:' .. sid
local owner = redis.call('HGET', key, 'owner')
if not owner then return 0 end
local size = #ARGV[1]
if redis.call('LLEN', key .. ':dm') >= tonumber(ARGV[2])
   or tonumber(redis.call('GET', key .. ':dmb') or '0') + size > tonumber(ARGV[3]) then
  return 2
end
redis.call('RPUSH', key .. ':dm', ARGV[1])
redis.call('INCRBY', key .. ':dmb', size)
redis.call('PUBLISH', 'wss:n:' .. owner, '{"op":"dm","sid":' .. cjson.encode(sid) .. '}')
return 1
"""

# An agent name for a new session (ARGV[1]); ARGV[2]: the name's expiry in
# ms, which the node running the session keeps refreshing (REFRESH_AGENTS).
CLAIM_AGENT = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] and (redis.call('EXISTS', 'wss:s:' .. cur) == 1
                               or redis.call('EXISTS', 'wss:claim:' .. cur) == 1) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', 'wss:claim:' .. ARGV[1], '1', 'PX', 10000)  -- held until the session is registered
return 1
"""

# Keep the agent names of a node's live sessions: ARGV[1] the expiry in ms,
# then a session id per key; a name another session holds now is left alone.
REFRESH_AGENTS = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then redis.call('PEXPIRE', key, ARGV[1]) end
end
return 0
"""

# A batch of one session's sequenced frames. Written only by the session's
# owner (else 0: another node adopted it); frames at or below the stored seq
# are skipped, so writing the memory log again after an outage is harmless.
# 5 ARGV per frame: seq, frame, op ('s' stream.start or a run's wait or
# step, 'r' + a call id: a run's tool result, 'e' stream.end, 'm' direct
# message or routed call), stream id, the stream's request (for 's' and 'r').
# After 'r', an agent's result waiting in KEYS[6] is in the log: it goes.
# Direct messages and routed calls in the log leave the session's queue
# (KEYS[5]) and their bytes its count (KEYS[7]).
APPEND = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local dms = 0
for i = 4, #ARGV - 4, 5 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[2], seq .. '-0', 'f', ARGV[i + 1])
    last = seq
    local op = ARGV[i + 2]
    local kind = string.sub(op, 1, 1)
    if kind == 's' or kind == 'r' then
      redis.call('SADD', KEYS[3], ARGV[i + 3])
      if ARGV[i + 4] ~= '' then redis.call('HSET', KEYS[4], ARGV[i + 3], ARGV[i + 4]) end
    end
    if kind == 'r' then
      redis.call('HDEL', KEYS[6], ARGV[i + 3] .. ' ' .. string.sub(op, 2))
    elseif op == 'e' then
      redis.call('SREM', KEYS[3], ARGV[i + 3])
      redis.call('HDEL', KEYS[4], ARGV[i + 3])
    elseif op == 'm' then
      dms = dms + 1
    end
  end
end
redis.call('HSET', KEYS[1], 'seq', last, 'acked', ARGV[2])
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[3] .. '-0')
if dms > 0 then  -- in the log now: off the queue
  local bytes = 0
  for _, item in ipairs(redis.call('LRANGE', KEYS[5], 0, dms - 1)) do bytes = bytes + #item end
  redis.call('LTRIM', KEYS[5], dms, -1)
  if redis.call('DECRBY', KEYS[7], bytes) <= 0 then redis.call('DEL', KEYS[7]) end
end
return 1
"""

END = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[8])
redis.call('SREM', KEYS[7], ARGV[2])
return 1
"""

# A run's call for an agent (KEYS[1] = wss:agent:{name}, KEYS[2] = wss:call:{route}):
# recorded (whose run made it, the agent's session) and queued for the agent's
# session like a direct message, once per route (a node that adopted the run
# routes it again: 1, nothing sent twice). ARGV = requester sid, stream, call,
# the queued item, the record's ttl (ms). 0: no live session holds the name.
ROUTE_CALL = """
local sid = redis.call('GET', KEYS[1])
if not sid then return 0 end
local owner = redis.call('HGET', 'wss:s:' .. sid, 'owner')
if not owner then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
redis.call('HSET', KEYS[2], 'requester', ARGV[1], 'stream', ARGV[2], 'call', ARGV[3], 'agent', sid)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('RPUSH', 'wss:s:' .. sid .. ':dm', ARGV[4])
redis.call('INCRBY', 'wss:s:' .. sid .. ':dmb', #ARGV[4])  -- (counted as the log's APPEND uncounts it)
redis.call('PUBLISH', 'wss:n:' .. owner, '{"op":"dm","sid":' .. cjson.encode(sid) .. '}')
return 1
"""

# A session answers a routed call (KEYS[1] = wss:call:{route}): only the
# session it was routed to, once (the same content again is 'same'). The
# result waits in the requesting session's hash of results (field "{stream}
# {call}") until the frame carrying it is in that session's log; its owner is
# told. ARGV = answering sid, the content (JSON), the result (JSON).
ANSWER_CALL = """
local rec = redis.call('HMGET', KEYS[1], 'requester', 'stream', 'call', 'agent', 'answered')
if not rec[1] then return 'unknown' end
if rec[4] ~= ARGV[1] then return 'forbidden' end
if rec[5] then
  if rec[5] == ARGV[2] then return 'same' end
  return 'different'
end
redis.call('HSET', KEYS[1], 'answered', ARGV[2])
local rkey = 'wss:s:' .. rec[1]
redis.call('HSET', rkey .. ':res', rec[2] .. ' ' .. rec[3], ARGV[3])
local owner = redis.call('HGET', rkey, 'owner')
if owner then
  redis.call('PUBLISH', 'wss:n:' .. owner, '{"op":"result","sid":' .. cjson.encode(rec[1]) .. '}')
end
return 'ok'
"""

RELEASE_AGENT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# Ownership moves only from the lost node, and before the new owner writes.
CLAIM_SESSION = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

HEARTBEAT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
local lost = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[2]))
table.insert(lost, 1, tostring(added))
return lost
"""

ALIVE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(score) >= now_ms - tonumber(ARGV[2]) then return 1 end
return 0
"""
