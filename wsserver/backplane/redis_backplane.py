"""The Redis backplane: several nodes share sessions, channels, presence and agent names.

Each node has a random name and a heartbeat in the sorted set ``wss:nodes``.
A session is *owned* by the node that runs it (its seq, streams and provider
calls live there); its replay log is written through to Redis before frames
are sent. A client that reconnects to another node is *tunnelled* to the
owner: the node it reached relays its frames both ways over Redis pub/sub,
so ``cancel``, ``interrupt`` and ``ack`` reach the node that runs the
generation. When a node's heartbeat is older than ``node_timeout``, the first
node to notice *adopts* its sessions from Redis: their streams end with
``error node_lost`` and clients resume there (or through a tunnel to it).

Keys (``{sid}`` a session id, ``{c}`` a channel, ``{n}`` a node)::

    wss:nodes                 ZSET node -> last heartbeat (Redis clock, ms)
    wss:node:{n}:sessions     SET  sessions the node owns
    wss:s:{sid}               HASH owner identity agent public_id seq acked subs
    wss:s:{sid}:log           STREAM the replay log, entry id "{seq}-0", field f = frame
    wss:s:{sid}:run           SET  ids of the session's running streams
    wss:s:{sid}:req           HASH running stream id -> its request (for an adopting node)
    wss:s:{sid}:dm            LIST direct messages not yet in the session's log
    wss:claim:{sid}           a new session's agent claim, until it is registered
    wss:agent:{name}          STRING the session holding the agent name
    wss:c:{c}:e / :o / :h / :m  epoch, offset counter, history STREAM, members HASH
    pub/sub  wss:c:{c}        "{offset} {frame}" of every channel publication
    pub/sub  wss:n:{n}        control messages to a node (tunnels, direct messages)
    pub/sub  wss:p:{tunnel}   frames from the owner back to the tunnelling node

Costs: a batch of frames of one session (a writer's flush) is one EVALSHA
(the owner check, one XADD per frame, HSET, XTRIM inside Redis); everything
queued in one loop turn goes in one pipeline, a single round trip. A
publication is one EVALSHA (INCR, XADD, PUBLISH inside Redis); a direct
message one EVALSHA.
Redis Cluster is not supported (scripts touch keys they are not given).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..hub import Hub, valid_name
from . import LOCAL, Backplane, Route

if TYPE_CHECKING:
    from ..session import HubCall, Session

__all__ = ["RedisBackplane", "RedisHub"]

logger = logging.getLogger("wsserver.backplane")

#: What means "Redis is not answering" (a script error, say, does not).
DOWN = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)

_CHANNEL_LUA = """
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
local function append(frame_head, frame_tail)
  local off = redis.call('INCR', KEYS[2])
  local frame = frame_head .. off .. frame_tail
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', size, off .. '-0', 'f', frame, 't', now_ms)
  redis.call('PEXPIRE', KEYS[3], ttl_ms)
  redis.call('PUBLISH', pubch, off .. ' ' .. frame)
  return off
end
local function presence(what, member)
  return append('{"type":"presence","channel":' .. cjson.encode(ARGV[9]) .. ',"offset":',
                ',"' .. what .. '":' .. cjson.encode(member) .. '}')
end
if op == 'pub' then
  if redis.call('HLEN', KEYS[4]) == 0 then
    redis.call('PEXPIRE', KEYS[1], ttl_ms)
    redis.call('PEXPIRE', KEYS[2], ttl_ms)
  end
  return append(ARGV[6], ARGV[7])
elseif op == 'leave' then
  local n = redis.call('HINCRBY', KEYS[4], ARGV[6], -1)
  if n <= 0 then
    redis.call('HDEL', KEYS[4], ARGV[6])
    presence('left', ARGV[6])
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
  if joined == 1 then presence('joined', ARGV[6]) end
  return {epoch, offset, recovered, missed, members}
end
return redis.error_reply('unknown op ' .. op)
"""

_SEND_LUA = """
local sid = redis.call('GET', KEYS[1])
if not sid then return 0 end
local owner = redis.call('HGET', 'wss:s:' .. sid, 'owner')
if not owner then return 0 end
redis.call('RPUSH', 'wss:s:' .. sid .. ':dm', ARGV[1])
redis.call('PUBLISH', 'wss:n:' .. owner, '{"op":"dm","sid":' .. cjson.encode(sid) .. '}')
return 1
"""

_CLAIM_AGENT_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] and (redis.call('EXISTS', 'wss:s:' .. cur) == 1
                               or redis.call('EXISTS', 'wss:claim:' .. cur) == 1) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', 'wss:claim:' .. ARGV[1], '1', 'PX', 10000)  -- held until the session is registered
return 1
"""

# A batch of one session's sequenced frames. Written only by the session's
# owner (else 0: another node adopted it); frames at or below the stored seq
# are skipped, so writing the memory log again after an outage is harmless.
# 5 ARGV per frame: seq, frame, op ('s' stream.start, 'e' stream.end,
# 'm' direct message), stream id, the stream's request (for 's').
_APPEND_LUA = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local dms = 0
for i = 4, #ARGV - 4, 5 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[2], seq .. '-0', 'f', ARGV[i + 1])
    last = seq
    local op = ARGV[i + 2]
    if op == 's' then
      redis.call('SADD', KEYS[3], ARGV[i + 3])
      if ARGV[i + 4] ~= '' then redis.call('HSET', KEYS[4], ARGV[i + 3], ARGV[i + 4]) end
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
if dms > 0 then redis.call('LTRIM', KEYS[5], dms, -1) end  -- in the log now: off the queue
return 1
"""

_END_LUA = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SREM', KEYS[6], ARGV[2])
return 1
"""

_RELEASE_AGENT_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# Ownership moves only from the lost node, and before the new owner writes.
_CLAIM_SESSION_LUA = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

_HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
local lost = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[2]))
table.insert(lost, 1, tostring(added))
return lost
"""

_ALIVE_LUA = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(score) >= now_ms - tonumber(ARGV[2]) then return 1 end
return 0
"""


def _eval_in(pipe: Any, script: Any, keys: list[str], args: list[Any]) -> None:
    """Queue a script in a pipeline by its sha. The scripts are loaded when the
    node connects (:meth:`RedisBackplane._load_scripts`); redis-py's own way
    (``pipe.scripts``) would cost a ``SCRIPT EXISTS`` round trip per pipeline."""
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def _request(stream: Any) -> bytes:
    return orjson.dumps(
        {
            "provider": stream.provider,
            "model": stream.model,
            "messages": [m.model_dump() for m in stream.messages],
            "params": stream.params.model_dump(exclude_none=True),
            "channel": stream.channel,
        }
    )


def _redacted(url: str) -> str:
    """``url`` without its password (for logs)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user + ':' if user else ':'}***@{host}"


def _skey(sid: str) -> str:
    return f"wss:s:{sid}"


def _stream_id(frame: bytes) -> str:
    return str(orjson.loads(frame)["stream"])


class TunnelInbox:
    """What the owner sent through a tunnel, waiting for the client's socket.

    ``bytes`` counts toward the connection's slow-consumer limit, so a client
    that stops reading is closed (1013) here as it would be on the owner.
    """

    __slots__ = ("_queue", "bytes")

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.bytes = 0

    def put(self, data: bytes) -> None:
        self.bytes += len(data)
        self._queue.put_nowait(data)

    async def get(self) -> bytes:
        data = await self._queue.get()
        self.bytes -= len(data)
        return data


class RedisHub(Hub):
    """The node-local view of the shared channels.

    ``channels[name].subscribers`` still lists this node's subscribed
    sessions (publications reach them through :meth:`deliver_remote`); offsets,
    epochs, history, presence and agent names live in Redis.
    """

    remote = True

    def __init__(self, backplane: RedisBackplane, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backplane = backplane

    def deliver_remote(self, name: str, offset: int, frame: bytes) -> None:
        channel = self.channels.get(name)
        if channel is not None and channel.subscribers and self.deliver is not None:
            self.deliver(name, frame, list(channel.subscribers), offset)  # type: ignore[call-arg]

    def claim_agent(self, name: str, session: Session) -> bool:
        self.agents[name] = session  # shared uniqueness was settled by route()
        return True

    def release_agent(self, session: Session) -> None:
        if session.agent is not None and self.agents.get(session.agent) is session:
            del self.agents[session.agent]
            self.backplane.script_later(session.id, "release_agent", [f"wss:agent:{session.agent}"], [session.id])

    def publish(self, name: str, sender: str, data: Any, *, encoded_data: bytes | None = None) -> int:
        """A stream's frames into a channel: published in order, not awaited."""
        head, tail = self.backplane.message_parts(name, sender, encoded_data or orjson.dumps(data))
        self.backplane.channel_op_nowait(name, "pub", head, tail)
        return 0

    def unsubscribe(self, name: str, session: Session) -> bool:
        channel = self.channels.get(name)
        if channel is None or session not in channel.subscribers:
            return False
        del channel.subscribers[session]
        self.backplane.channel_op_nowait(name, "leave", session.name, sid=session.id)
        self.backplane.save_subscriptions(session)
        return True

    def sweep(self) -> int:
        """Forget channels with no subscriber here, and stop listening to them."""
        gone = [name for name, channel in self.channels.items() if not channel.subscribers]
        for name in gone:
            del self.channels[name]
            self.backplane.unlisten_nowait(f"wss:c:{name}")
        return len(gone)

    def join_announce(self, channel: Any, session: Session) -> None:  # pragma: no cover - done by "sub"
        raise AssertionError("presence joins happen in the subscribe script")

    def subscribe(self, name: str, session: Session, since: int | None, epoch: str | None) -> Any:  # pragma: no cover
        raise AssertionError("a remote hub subscribes through Backplane.call")


class RedisBackplane(Backplane):
    """Sessions, channels, presence and agent names shared through Redis."""

    shared = True

    def __init__(self, server: Any, url: str, *, node_id: str | None = None, node_timeout: float = 3.0) -> None:
        cfg = server.config
        self.server = server
        self.url = url
        self.node = node_id or "n-" + secrets.token_hex(4)
        self.node_timeout = node_timeout
        self.redis = aioredis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.hub = RedisHub(
            self, deliver=server._deliver, history_size=cfg.channel_history, history_ttl=cfg.channel_history_ttl
        )
        self._pubsub: Any = None
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._scripts = {
            "channel": self.redis.register_script(_CHANNEL_LUA),
            "send": self.redis.register_script(_SEND_LUA),
            "claim_agent": self.redis.register_script(_CLAIM_AGENT_LUA),
            "release_agent": self.redis.register_script(_RELEASE_AGENT_LUA),
            "heartbeat": self.redis.register_script(_HEARTBEAT_LUA),
            "append": self.redis.register_script(_APPEND_LUA),
            "claim_session": self.redis.register_script(_CLAIM_SESSION_LUA),
            "end": self.redis.register_script(_END_LUA),
            "alive": self.redis.register_script(_ALIVE_LUA),
        }
        #: Writes in the order they were asked for: (fill the pipeline, future, check).
        self._queue: list[tuple[Callable[[Any], None], asyncio.Future[Any] | None, Any]] = []
        #: Writes asked for during an outage, by session: replayed by _resync().
        self._deferred: list[tuple[str, Callable[[Any], None]]] = []
        #: Direct messages handed to a session and not yet trimmed off its queue, by id.
        self._dm_seen: dict[str, set[str]] = {}
        self._dm_draining: dict[str, bool] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._recovering: asyncio.Task[None] | None = None
        self.healthy = False
        self.down_since: float | None = None
        #: Tunnels from this node to owners elsewhere: id -> (owner, the inbox of frames).
        self.tunnels: dict[str, tuple[str, TunnelInbox]] = {}
        self._adopting: dict[str, asyncio.Task[None]] = {}
        #: Registrations of new sessions not yet confirmed (see write_log).
        self._registering: dict[str, asyncio.Future[Any]] = {}
        #: Counters for the tests and /metrics.
        self.stats = {"adopted_sessions": 0, "lost_nodes": 0, "outages": 0}

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.redis.ping()  # fail fast at startup: a wrong URL is a configuration error
        await self._load_scripts()
        await self._connect_pubsub()
        self.healthy = True
        await self._heartbeat()
        await self._adopt_previous()
        loop = asyncio.get_running_loop()
        self._watcher = loop.create_task(self._watch_nodes())
        logger.info("redis backplane %s: node %s", _redacted(self.url), self.node)

    async def close(self) -> None:
        for task in (self._watcher, self._listener, self._recovering, *self._adopting.values()):
            if task is not None:
                task.cancel()
        if self.healthy:
            with _suppress_down():
                if self._queue:
                    await asyncio.wait_for(self._flush_once(), 2.0)
                # Declared lost at once: another node adopts this node's sessions
                # (their streams ended with error shutdown) at its next heartbeat.
                await self.redis.zadd("wss:nodes", {self.node: 0})
        if self._pubsub is not None:
            with _suppress_down():
                await self._pubsub.aclose()
        with _suppress_down():
            await self.redis.aclose()

    def status(self) -> str | None:
        if self.healthy:
            return None
        return "degraded: the Redis backplane is unreachable; serving local sessions only"

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------- outages

    def _down(self, exc: BaseException) -> None:
        if self.healthy:
            self.healthy = False
            self.stats["outages"] += 1
            self.down_since = asyncio.get_running_loop().time()
            logger.warning("redis backplane unreachable (%s); serving local sessions only", exc)
            self.server.node_lost(None)  # every tunnel goes through Redis
        if self._recovering is None or self._recovering.done():
            self._recovering = self._spawn(self._recover())

    async def _recover(self) -> None:
        """Reconnect with full-jitter backoff, then write this node's state back."""
        delay = 0.1
        while True:
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 5.0)
            try:
                await self.redis.ping()
                await self._connect_pubsub()
                await self._resync()
            except DOWN as exc:
                logger.debug("redis still unreachable: %s", exc)
                continue
            except Exception:  # never give up on recovering: log it and try again
                logger.exception("writing this node's state back to Redis failed; retrying")
                continue
            logger.warning("redis backplane reachable again; state written back")
            return

    async def _load_scripts(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for script in self._scripts.values():
            pipe.script_load(script.script)
        await pipe.execute()

    async def _owners(self, sids: list[str]) -> dict[str, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hget(_skey(sid), "owner")
        return {sid: None if o is None else o.decode() for sid, o in zip(sids, await pipe.execute())}

    async def _resync(self) -> None:
        """After an outage: make Redis know what this node holds, then serve again.

        Sessions another node adopted meanwhile (this node was declared lost)
        are dropped here. The others get their memory log written again (the
        append script skips what Redis has); one whose hash is gone (Redis
        restarted empty) is registered again with its agent name and presence.
        What ended or left during the outage is written last.
        """
        await self._load_scripts()  # (a restarted Redis has none)
        await self._heartbeat()
        lives = list(self.server.sessions.values())
        deferred = list(self._deferred)  # (kept until the writes are queued: this may fail)
        owners = await self._owners([live.session.id for live in lives] + [sid for sid, _ in deferred])
        for live in lives:
            owner = owners[live.session.id]
            if owner is not None and owner != self.node:
                self.server.fence_session(live.session.id)
        # No await from here on: these go first in the write queue, before
        # anything the sessions produce from now on.
        for live in lives:
            session = live.session
            if self.server.sessions.get(session.id) is not live:
                continue
            session.unsynced = []
            if owners[session.id] is None:
                self._enqueue(lambda pipe, s=session: self._reregister(pipe, s), wait=False)
            self._write(session, list(session.log), wait=False)
        for sid, fill in deferred:
            if owners[sid] in (None, self.node):
                self._enqueue(fill, wait=False)
        del self._deferred[: len(deferred)]
        self.healthy = True
        await self._flush_pending()

    def _reregister(self, pipe: Any, session: Session) -> None:
        self._register(pipe, session)
        key = _skey(session.id)
        if session.agent is not None:
            pipe.set(f"wss:agent:{session.agent}", session.id)
        for name in session.subscriptions:
            pipe.hincrby(f"wss:c:{name}:m", session.name, 1)
        for stream in session.streams.values():
            pipe.sadd(f"{key}:run", stream.id)
            pipe.hset(f"{key}:req", stream.id, _request(stream))

    # --------------------------------------------------------------- writes

    def _enqueue(
        self, fill: Callable[[Any], None], wait: bool, check: Callable[[list[Any]], None] | None = None
    ) -> asyncio.Future[Any] | None:
        """Queue ``fill(pipeline)``; ``check`` gets the replies of its commands."""
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.append((fill, future, check))
        if self._flusher is None or self._flusher.done():
            self._flusher = self._spawn(self._flush_loop())
        return future

    async def _flush_loop(self) -> None:
        while self._queue:
            await self._flush_once()

    async def _flush_once(self) -> None:
        """Everything queued, in one pipeline (one round trip)."""
        batch, self._queue = self._queue, []
        pipe = self.redis.pipeline(transaction=False)
        spans = []
        error: BaseException | None = None
        try:
            for fill, _, _ in batch:
                first = len(pipe)
                fill(pipe)
                spans.append((first, len(pipe)))
            replies = await pipe.execute(raise_on_error=False) if len(pipe) else []
        except DOWN as exc:
            self._down(exc)
            error = exc
        except Exception as exc:  # a bug must not stall every writer waiting here
            logger.exception("backplane write failed")
            error = exc
        if error is None and any(isinstance(r, NoScriptError) for r in replies):
            # Redis forgot the scripts (it restarted under us): recover as from
            # an outage, which loads them and writes every session again.
            error = ConnectionError("redis lost its scripts")
            self._down(error)
        for i, (_, future, check) in enumerate(batch):
            if error is None and check is not None:
                try:
                    check(replies[spans[i][0] : spans[i][1]])
                except Exception:
                    logger.exception("backplane write check failed")
            if future is not None and not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(ConnectionError(str(error)))

    def _register(self, pipe: Any, session: Session) -> None:
        pipe.hset(
            _skey(session.id),
            mapping={
                "owner": self.node,
                "identity": session.identity,
                "agent": session.agent or "",
                "public_id": session.public_id,
                "subs": orjson.dumps(sorted(session.subscriptions)),
                "rules": b""
                if session.rules is None
                else orjson.dumps({"subscribe": session.rules.subscribe, "publish": session.rules.publish}),
            },
        )
        pipe.sadd(f"wss:node:{self.node}:sessions", session.id)

    def _write(self, session: Session, entries: list[tuple[int, bytes]], wait: bool) -> asyncio.Future[Any] | None:
        """Queue the append script for ``entries`` of ``session`` (the owner check included)."""
        key = _skey(session.id)
        keys = [key, f"{key}:log", f"{key}:run", f"{key}:req", f"{key}:dm"]
        args: list[Any] = [self.node, session.acked, session.log_first]
        for seq, frame in entries:
            op, stream_id, request = "", "", b""
            if frame.startswith(b'{"type":"stream.start"'):
                op, stream_id = "s", _stream_id(frame)
                stream = session.streams.get(stream_id)
                if stream is not None:  # what an adopting node needs to continue it (interrupt)
                    request = _request(stream)
            elif frame.startswith(b'{"type":"stream.end"'):
                op, stream_id = "e", _stream_id(frame)
            elif frame.startswith(b'{"type":"message","seq":'):
                op = "m"
            args += [seq, frame, op, stream_id, request]
        script = self._scripts["append"]

        def check(replies: list[Any]) -> None:
            if replies and replies[0] == 0:  # another node owns it now
                self.server.fence_session(session.id)

        return self._enqueue(lambda pipe: _eval_in(pipe, script, keys, args), wait, check)

    async def write_log(self, session: Session | None) -> None:
        if session is None:
            return
        registering = self._registering.pop(session.id, None)
        if registering is not None:  # its welcome waits until other nodes can find it
            with contextlib.suppress(ConnectionError):
                await registering
        entries = session.unsynced
        if not entries:
            return
        session.unsynced = []
        if not self.healthy:
            return  # sent without Redis; the memory log is written again by _resync()
        future = self._write(session, entries, wait=True)
        assert future is not None
        with contextlib.suppress(ConnectionError):
            await future  # (degraded: the frames go out; _resync() writes them later)

    def write_log_nowait(self, session: Session) -> None:
        entries = session.unsynced
        if entries:
            session.unsynced = []
            if self.healthy:
                self._write(session, entries, wait=False)

    def _later(self, sid: str, fill: Callable[[Any], None]) -> None:
        """A write that must not be lost to an outage: queued, or kept for _resync()."""
        if self.healthy:
            self._enqueue(fill, wait=False)
        else:
            self._deferred.append((sid, fill))

    def session_opened(self, session: Session) -> None:
        session.unsynced = []
        if self.healthy:
            future = self._enqueue(lambda pipe: self._register(pipe, session), wait=True)
            assert future is not None
            self._registering[session.id] = future

    def session_ended(self, session: Session) -> None:
        self._registering.pop(session.id, None)
        self._dm_seen.pop(session.id, None)
        key = _skey(session.id)
        keys = [key, f"{key}:log", f"{key}:run", f"{key}:req", f"{key}:dm", f"wss:node:{self.node}:sessions"]
        script = self._scripts["end"]
        self._later(session.id, lambda pipe: _eval_in(pipe, script, keys, [self.node, session.id]))

    def save_subscriptions(self, session: Session) -> None:
        subs = orjson.dumps(sorted(session.subscriptions))
        self._later(session.id, lambda pipe: pipe.hset(_skey(session.id), "subs", subs))

    def script_later(self, sid: str, name: str, keys: list[str], args: list[Any]) -> None:
        script = self._scripts[name]
        self._later(sid, lambda pipe: _eval_in(pipe, script, keys, args))

    # ------------------------------------------------------------- channels

    def message_parts(self, channel: str, sender: str, data: bytes) -> tuple[bytes, bytes]:
        """A channel message around its offset (the script puts the offset between)."""
        head = b'{"type":"message","channel":' + orjson.dumps(channel) + b',"offset":'
        return head, b',"from":' + orjson.dumps(sender) + b',"data":' + data + b"}"

    def _channel_args(
        self, name: str, op: str, a6: Any = "", a7: Any = "", a8: Any = "", joined: str = ""
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the channel script (ARGV[6..8] depend on ``op``, see the script)."""
        hub = self.hub
        keys = [f"wss:c:{name}:e", f"wss:c:{name}:o", f"wss:c:{name}:h", f"wss:c:{name}:m"]
        epoch = secrets.token_hex(4)  # used only if the channel has none yet
        args = [op, hub.history_ttl, hub.history_size, f"wss:c:{name}", epoch, a6, a7, a8, name, joined]
        return keys, args

    def channel_op_nowait(self, name: str, op: str, a6: Any = "", a7: Any = "", *, sid: str | None = None) -> None:
        """A publication (dropped during an outage) or a presence leave (kept for _resync())."""
        keys, args = self._channel_args(name, op, a6, a7)
        script = self._scripts["channel"]
        if sid is not None:
            self._later(sid, lambda pipe: _eval_in(pipe, script, keys, args))
        elif self.healthy:
            self._enqueue(lambda pipe: _eval_in(pipe, script, keys, args), wait=False)

    async def call(self, session: Session, call: HubCall) -> None:
        try:
            if not self.healthy:
                raise ConnectionError("the Redis backplane is unreachable")
            await self._flush_pending()  # earlier writes of this node first (e.g. a leave)
            if call.kind == "subscribe":
                await self._subscribe(session, call.msg)
            elif call.kind == "publish":
                head, tail = self.message_parts(call.msg.channel, session.name, call.encoded or b"null")
                keys, args = self._channel_args(call.msg.channel, "pub", head, tail)
                offset = await self._scripts["channel"](keys=keys, args=args)
                session.published(call.msg, int(offset))
            elif call.kind == "send":
                head = orjson.dumps({"id": secrets.token_hex(8), "from": session.name})[:-1]
                payload = head + b',"data":' + (call.encoded or b"null") + b"}"
                found = await self._scripts["send"](keys=[f"wss:agent:{call.msg.to}"], args=[payload])
                session.sent(call.msg, bool(found))
        except BaseException as exc:  # answered, whatever happened: the connection goes on
            if isinstance(exc, DOWN) and not isinstance(exc, ConnectionError):
                self._down(exc)  # (a ConnectionError of ours: the flusher saw it already)
            elif not isinstance(exc, (*DOWN, asyncio.CancelledError)):
                logger.error("backplane %s failed: %r", call.kind, exc)
            if call.kind == "subscribe":
                channel = self.hub.channels.get(call.msg.channel)
                if channel is not None and call.msg.channel not in session.subscriptions:
                    channel.subscribers.pop(session, None)
            session.hub_failed(call, "the Redis backplane is unreachable; try again")
            if not isinstance(exc, Exception):
                raise

    async def _flush_pending(self) -> None:
        if self._queue:
            future = self._enqueue(lambda pipe: None, wait=True)
            assert future is not None
            await future

    async def _subscribe(self, session: Session, msg: Any) -> None:
        name = msg.channel
        await self._listen(f"wss:c:{name}")  # confirmed before the offset is read: nothing slips between
        channel = self.hub.channel(name)
        joined = session not in channel.subscribers
        channel.subscribers[session] = None
        keys, args = self._channel_args(
            name,
            "sub",
            session.name,
            "" if msg.since is None else str(msg.since),
            msg.epoch or "",
            "1" if joined else "0",
        )
        epoch, offset, recovered, missed, members = await self._scripts["channel"](keys=keys, args=args)
        session.subscribed(
            msg,
            epoch.decode(),
            int(offset),
            bool(recovered),
            sorted(m.decode() for m in members),
            list(missed),
        )
        self.save_subscriptions(session)

    # -------------------------------------------------------------- pub/sub

    async def _connect_pubsub(self) -> None:
        old, self._pubsub = self._pubsub, self.redis.pubsub()
        if self._listener is not None:
            self._listener.cancel()
        if old is not None:
            with _suppress_down():
                await old.aclose()
        # Everything this node listened to, or is about to (a _listen() waiting
        # on the old connection is confirmed by the new one).
        names = {f"wss:n:{self.node}".encode(), *self._confirmed}
        names |= {f"wss:c:{name}".encode() for name, ch in self.hub.channels.items() if ch.subscribers}
        names |= {f"wss:p:{tid}".encode() for tid in self.tunnels}
        for name in names:
            if name not in self._confirmed or self._confirmed[name].done():
                self._confirmed[name] = asyncio.get_running_loop().create_future()
        await self._pubsub.subscribe(*names)  # (connects; the listener reads the confirmations)
        self._listener = asyncio.get_running_loop().create_task(self._listen_loop(self._pubsub))
        await asyncio.wait_for(asyncio.shield(self._confirmed[f"wss:n:{self.node}".encode()]), 5.0)

    async def _listen(self, channel: str) -> None:
        """Subscribe this node to ``channel`` and wait until Redis confirmed it."""
        key = channel.encode()
        future = self._confirmed.get(key)
        if future is None:
            future = self._confirmed[key] = asyncio.get_running_loop().create_future()
            try:
                await self._pubsub.subscribe(channel)
            except BaseException:
                del self._confirmed[key]
                raise
        await asyncio.wait_for(asyncio.shield(future), 5.0)

    def unlisten_nowait(self, channel: str) -> None:
        if channel.encode() in self._confirmed:
            self._spawn(self._unlisten(channel))

    async def _unlisten(self, channel: str) -> None:
        if channel.startswith("wss:c:"):
            local = self.hub.channels.get(channel[6:])
            if local is not None and local.subscribers:
                return  # subscribed again meanwhile
        if self._confirmed.pop(channel.encode(), None) is not None and self.healthy:
            with _suppress_down():
                await self._pubsub.unsubscribe(channel)

    async def _listen_loop(self, pubsub: Any) -> None:
        try:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
                if msg is None:
                    continue
                kind, channel, data = msg["type"], msg["channel"], msg["data"]
                if kind == b"subscribe" or kind == "subscribe":
                    future = self._confirmed.get(channel)
                    if future is not None and not future.done():
                        future.set_result(None)
                elif kind == b"message" or kind == "message":
                    try:
                        self._dispatch(channel, data)
                    except Exception:  # one bad message must not stop the node's listener
                        logger.exception("backplane message on %r failed", channel)
        except asyncio.CancelledError:
            raise
        except DOWN as exc:
            self._down(exc)
        except Exception as exc:  # a deaf node is worse than a reconnect
            logger.exception("backplane listener failed")
            self._down(exc)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel.startswith(b"wss:c:"):
            offset, _, frame = data.partition(b" ")
            self.hub.deliver_remote(channel[6:].decode(), int(offset), frame)
        elif channel.startswith(b"wss:p:"):
            tunnel = self.tunnels.get(channel[6:].decode())
            if tunnel is not None:
                tunnel[1].put(data)
        else:
            self._control(orjson.loads(data))

    def _control(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        server = self.server
        if op == "dm":
            self._spawn(self._take_direct_messages(msg["sid"]))
        elif op == "open":
            server.tunnel_open(msg["tunnel"], msg["node"], msg["hello"], msg.get("token"), msg.get("ip", "?"))
        elif op == "in":
            server.tunnel_input(msg["tunnel"], b"" if msg.get("binary") else msg["text"])
        elif op == "close":
            server.tunnel_close(msg["tunnel"])
        else:
            logger.warning("unknown backplane control message %r", op)

    async def _take_direct_messages(self, sid: str) -> None:
        """Hand the session the direct messages waiting for it in Redis.

        They stay in its queue until the frames carrying them are in its log
        (the append script trims the queue), so an ``ok`` to a ``send`` is
        never lost to a crash in between; ids keep a second pass from
        delivering one twice. One pass at a time per session, in order.
        """
        if sid in self._dm_draining:
            self._dm_draining[sid] = True  # again after the running pass
            return
        self._dm_draining[sid] = False
        try:
            while True:
                live = self.server.sessions.get(sid)
                if live is None:
                    return  # not (or no longer) ours: the new owner takes them when it adopts
                items = await self.redis.lrange(f"{_skey(sid)}:dm", 0, 999)
                seen = self._dm_seen.setdefault(sid, set())
                messages = [orjson.loads(item) for item in items]
                seen.intersection_update(dm["id"] for dm in messages)  # trimmed ones are forgotten
                for dm in messages:
                    if dm["id"] not in seen:
                        seen.add(dm["id"])
                        live.session.deliver_direct(dm["from"], dm["data"])
                if not self._dm_draining.get(sid):
                    return
                self._dm_draining[sid] = False
        except DOWN as exc:
            self._down(exc)
        finally:
            self._dm_draining.pop(sid, None)

    # -------------------------------------------------------------- tunnels

    def send_to_node(self, node: str, msg: dict[str, Any]) -> None:
        """A control message to ``node``, in order with this node's other writes."""
        payload = orjson.dumps(msg)
        if self.healthy:
            self._enqueue(lambda pipe: pipe.publish(f"wss:n:{node}", payload), wait=False)

    def send_to_tunnel(self, tunnel: str, data: bytes) -> None:
        if self.healthy:
            self._enqueue(lambda pipe: pipe.publish(f"wss:p:{tunnel}", data), wait=False)

    async def open_tunnel(self, owner: str) -> tuple[str, TunnelInbox]:
        tunnel = secrets.token_hex(8)
        inbox = TunnelInbox()
        self.tunnels[tunnel] = (owner, inbox)
        try:
            await self._listen(f"wss:p:{tunnel}")
        except BaseException:
            del self.tunnels[tunnel]
            self._confirmed.pop(f"wss:p:{tunnel}".encode(), None)
            raise
        return tunnel, inbox

    async def close_tunnel(self, tunnel: str) -> None:
        if self.tunnels.pop(tunnel, None) is not None:
            await self._unlisten(f"wss:p:{tunnel}")

    # ---------------------------------------------------------------- nodes

    async def _heartbeat(self) -> tuple[bool, list[bytes]]:
        """Beat; returns (whether this node had been dropped from the set, the lost nodes)."""
        added, *lost = await self._scripts["heartbeat"](
            keys=["wss:nodes"], args=[self.node, int(self.node_timeout * 1000)]
        )
        return added == b"1", [n for n in lost if n.decode() != self.node]

    async def _watch_nodes(self) -> None:
        """Heartbeat, and adopt the sessions of nodes whose heartbeat stopped."""
        interval = max(0.1, self.node_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            if not self.healthy:
                continue
            try:
                dropped, lost = await self._heartbeat()
                if dropped:
                    # Another node may have declared this one lost (a pause
                    # longer than node_timeout) and adopted its sessions:
                    # those are not ours to write any more.
                    sids = list(self.server.sessions)
                    for sid, owner in (await self._owners(sids)).items():
                        if owner is not None and owner != self.node:
                            logger.error("session %s was adopted by node %s; dropping it here", sid, owner)
                            self.server.fence_session(sid)
                for node in lost:
                    await self.adopt_node(node.decode())
                # Tunnels to or from nodes gone meanwhile (another node adopted them).
                peers = {owner for owner, _ in self.tunnels.values()} | self.server.tunnel_peers()
                for node in peers:
                    if not await self.alive(node):
                        self.server.node_lost(node)
            except DOWN as exc:
                self._down(exc)
            except Exception:  # the watcher must outlive any one bad round
                logger.exception("backplane node watch failed")

    async def alive(self, node: str) -> bool:
        return bool(await self._scripts["alive"](keys=["wss:nodes"], args=[node, int(self.node_timeout * 1000)]))

    async def adopt_node(self, node: str) -> None:
        """Take over the sessions of a lost node (one node does it; others wait for it)."""
        task = self._adopting.get(node)
        if task is None:
            task = self._adopting[node] = asyncio.get_running_loop().create_task(self._adopt_node(node))
            task.add_done_callback(lambda _t: self._adopting.pop(node, None))
        await asyncio.shield(task)

    async def _adopt_node(self, node: str) -> None:
        self.server.node_lost(node)  # its tunnels here end; clients reconnect and resume
        if not await self.redis.set(f"wss:adopt:{node}", self.node, nx=True, ex=60):
            for _ in range(50):  # another node adopts: wait until it is done
                if not await self.redis.exists(f"wss:node:{node}:sessions"):
                    return
                await asyncio.sleep(0.1)
            return
        self.stats["lost_nodes"] += 1
        sids = [s.decode() for s in await self.redis.smembers(f"wss:node:{node}:sessions")]
        logger.warning("node %s was lost; adopting its %d sessions", node, len(sids))
        for sid in sids:
            await self.adopt_session(sid, node)
        await self.redis.delete(f"wss:node:{node}:sessions")
        await self.redis.zrem("wss:nodes", node)
        await self.redis.delete(f"wss:adopt:{node}")

    async def _adopt_previous(self) -> None:
        """Sessions a previous run of this node (same ``node_id``) left behind."""
        lock = f"wss:adopt:{self.node}"
        for _ in range(100):  # another node adopting them already: let it finish
            if await self.redis.set(lock, self.node, nx=True, ex=60):
                break
            await asyncio.sleep(0.1)
        sids = [s.decode() for s in await self.redis.smembers(f"wss:node:{self.node}:sessions")]
        if sids:
            logger.warning("adopting %d sessions left by this node's previous run", len(sids))
        for sid in sids:
            await self.adopt_session(sid, self.node)
        await self.redis.delete(lock)

    async def adopt_session(self, sid: str, lost: str) -> None:
        """Own session ``sid`` of node ``lost`` (if it is still that node's) and run it here."""
        key = _skey(sid)
        if sid in self.server.sessions or not await self._scripts["claim_session"](
            keys=[key, f"wss:node:{self.node}:sessions"], args=[lost, self.node, sid]
        ):
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.xrange(f"{key}:log")
        pipe.smembers(f"{key}:run")
        pipe.hgetall(f"{key}:req")
        fields, entries, running, requests = await pipe.execute()
        state = {k.decode(): v.decode() for k, v in fields.items()}
        log = [(int(entry_id.split(b"-")[0]), entry[b"f"]) for entry_id, entry in entries]
        streams = {r.decode(): orjson.loads(requests[r]) if r in requests else None for r in running}
        session = self.server.adopt(sid, state, log, streams)
        self.stats["adopted_sessions"] += 1
        self.write_log_nowait(session)  # the node_lost ends
        await self._take_direct_messages(sid)

    # ---------------------------------------------------------------- hello

    async def route(self, conn: Any, hello: dict[str, Any]) -> Route:
        """Find the session's owner: here, another live node (tunnel), or a lost one (adopt)."""
        if not self.healthy:
            return LOCAL
        sid = hello.get("session")
        try:
            if isinstance(sid, str) and sid not in self.server.sessions:
                for _ in range(3):
                    owner = await self.redis.hget(_skey(sid), "owner")
                    if owner is None or owner.decode() == self.node:
                        break
                    owner_name = owner.decode()
                    if await self.alive(owner_name):
                        return Route(owner_name)
                    await self.adopt_node(owner_name)
                    if sid in self.server.sessions:
                        break
            await self.claim_agent(conn, hello, sid)
        except DOWN as exc:
            self._down(exc)
        return LOCAL

    async def claim_agent(self, conn: Any, hello: dict[str, Any], sid: Any) -> None:
        """Claim ``hello.agent`` across nodes for the session ``conn`` will open
        (``conn.new_session_id``); ``conn.agent_taken`` says another session holds it."""
        agent = hello.get("agent")
        if not isinstance(agent, str) or not valid_name(agent):
            return  # (the hello is refused with bad_name later)
        live = self.server.sessions.get(sid) if isinstance(sid, str) else None
        if live is not None and live.session.agent == agent:
            return  # resuming the session that holds it
        conn.new_session_id = secrets.token_urlsafe(16)
        if not self.healthy:
            return  # degraded: only this node's names are checked (Server._open_session)
        try:
            claimed = await self._scripts["claim_agent"](keys=[f"wss:agent:{agent}"], args=[conn.new_session_id])
        except DOWN as exc:
            self._down(exc)
            return
        conn.agent_taken = not claimed


class _suppress_down:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, (*DOWN, asyncio.CancelledError))
