"""The Redis backplane: several nodes share sessions, channels, presence and agent names.

Each node has a random name and a heartbeat in the sorted set ``wss:nodes``.
A session is *owned* by the node that runs it (its seq, streams and provider
calls live there); its replay log is written through to Redis before frames
are sent. A client that reconnects to another node is *tunnelled* to the
owner (:mod:`~wsserver.cluster.tunnel`): the node it reached relays its
frames both ways over Redis pub/sub, so ``cancel``, ``interrupt`` and
``ack`` reach the node that runs the generation. When a node's heartbeat is
older than ``node_timeout``, the first node to notice *adopts* its sessions
(:mod:`~wsserver.cluster.adoption`).

Keys (``{sid}`` a session id, ``{c}`` a channel, ``{n}`` a node)::

    wss:nodes                 ZSET node -> last heartbeat (Redis clock, ms)
    wss:node:{n}:sessions     SET  sessions the node owns
    wss:s:{sid}               HASH owner identity agent public_id seq acked subs rules
    wss:s:{sid}:log           STREAM the replay log, entry id "{seq}-0", field f = frame
    wss:s:{sid}:run           SET  ids of the session's running streams
    wss:s:{sid}:req           HASH running stream id -> its request (for an adopting node)
    wss:s:{sid}:dm            LIST direct messages and routed calls not yet in the session's log
    wss:s:{sid}:dmb           their bytes (direct messages are bounded while the session is away)
    wss:s:{sid}:res           HASH "{stream} {call}" -> an agent's result for a run, until it is in the log
    wss:call:{route}          HASH a call routed to an agent: requester stream call agent answered
    wss:claim:{sid}           a new session's agent claim, until it is registered (10 s)
    wss:agent:{name}          STRING the session holding the agent name; expires
                              AGENT_TTL_BEATS x node_timeout after its node last refreshed it
    wss:c:{c}:e / :o / :h / :m  epoch, offset counter, history STREAM, members HASH
    wss:hist:idx, :bytes      every channel's history entries in bytes, oldest first
    wss:hist:p:{p}, :pb:{p}   those of one publisher
    pub/sub  wss:c:{c}        "{offset} {frame}" of every channel publication
    pub/sub  wss:n:{n}        control messages to a node (tunnels, direct messages)
    pub/sub  wss:p:{tunnel}   frames from the owner back to the tunnelling node

Costs: a batch of frames of one session (a writer's flush) is one EVALSHA
(the owner check, one XADD per frame, HSET, XTRIM inside Redis); everything
queued in one loop turn goes in one pipeline, a single round trip
(:mod:`~wsserver.cluster.redis_writes`). A publication is one EVALSHA
(INCR, XADD, PUBLISH inside Redis); a direct message one EVALSHA.
Redis Cluster is not supported (scripts touch keys they are not given).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis

from ..core.channels import Delivery
from ..wire.messages import Publish, Send, Subscribe
from ..wire.names import valid_name
from . import redis_scripts as lua
from .adoption import NodeWatch
from .backplane import LOCAL, Backplane, ClusterEvents, Route
from .redis_channels import RedisChannels
from .redis_calls import RoutedCalls
from .redis_log import SessionLogs
from .redis_pubsub import PubSub
from .redis_util import DOWN, eval_in, redacted, skey, suppress_down
from .redis_writes import Fill, WriteQueue
from .tunnel import Tunnel

if TYPE_CHECKING:
    from ..core.actions import AnswerCall, MessagingCall, RouteCall
    from ..core.session import Session

__all__ = ["AGENT_TTL_BEATS", "RedisBackplane"]

logger = logging.getLogger("wsserver.backplane")

#: An agent name's key expires this many ``node_timeout`` after its node last
#: refreshed it (every ``node_timeout``, for its live sessions): a name
#: outlives neither its session nor its node by much, and nothing claimed is
#: left behind for good.
AGENT_TTL_BEATS = 20


class RedisBackplane(Backplane):
    """Sessions, channels, presence and agent names shared through Redis.

    Args:
        url: ``redis://host:port/db`` (may hold a password; never logged).
        node_id: this node's name (default random); a node restarted under
            the same name takes its sessions back.
        node_timeout: seconds without a heartbeat before a node is lost.
        history_size, history_ttl: what each channel keeps for recovery.
        history_bytes, history_bytes_per_publisher: what the histories of
            all channels may hold together, and of one publisher's messages.
        inbox_messages, inbox_bytes: the direct messages Redis holds for an
            agent that is away (``inbox_full`` beyond).
    """

    shared = True

    def __init__(
        self,
        url: str,
        *,
        node_id: str | None = None,
        node_timeout: float = 3.0,
        history_size: int = 1000,
        history_ttl: float = 300.0,
        history_bytes: int = 128 << 20,
        history_bytes_per_publisher: int = 16 << 20,
        inbox_messages: int = 100,
        inbox_bytes: int = 1 << 20,
    ) -> None:
        super().__init__()
        self.url = url
        self.node = node_id or "n-" + secrets.token_hex(4)
        self.redis = aioredis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        register = self.redis.register_script
        self.scripts = {
            "channel": register(lua.CHANNEL),
            "send": register(lua.SEND),
            "claim_agent": register(lua.CLAIM_AGENT),
            "release_agent": register(lua.RELEASE_AGENT),
            "heartbeat": register(lua.HEARTBEAT),
            "append": register(lua.APPEND),
            "claim_session": register(lua.CLAIM_SESSION),
            "end": register(lua.END),
            "alive": register(lua.ALIVE),
            "route_call": register(lua.ROUTE_CALL),
            "answer_call": register(lua.ANSWER_CALL),
            "refresh_agents": register(lua.REFRESH_AGENTS),
        }
        self.inbox = (inbox_messages, inbox_bytes)
        #: Expiry of an agent name's key, in ms (refreshed every node_timeout).
        self.agent_ttl_ms = int(AGENT_TTL_BEATS * node_timeout * 1000)
        #: What this node's server is told (set by :meth:`start`).
        self.events: ClusterEvents
        self.writes = WriteQueue(self)
        self.channels = RedisChannels(
            self,
            history_size=history_size,
            history_ttl=history_ttl,
            history_bytes=history_bytes,
            history_bytes_per_publisher=history_bytes_per_publisher,
        )
        self.watch = NodeWatch(self, node_timeout)
        self.logs = SessionLogs(self)
        self.pubsub = PubSub(self)
        self.calls = RoutedCalls(self)
        #: This node's sessions by agent name (uniqueness across nodes is Redis's).
        self._agents: dict[str, Session] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._recovering: asyncio.Task[None] | None = None
        self.healthy = False
        #: Tunnels from this node to owners elsewhere, by id.
        self.tunnels: dict[str, Tunnel] = {}
        self.stats.update(adopted_sessions=0, lost_nodes=0, outages=0)

    # ------------------------------------------------------------ lifecycle

    async def start(self, events: ClusterEvents) -> None:
        self.events = events
        await self.redis.ping()  # fail fast at startup: a wrong URL is a configuration error
        await self.load_scripts()
        await self.pubsub.connect()
        self.healthy = True
        await self.watch.heartbeat()
        await self.watch.adopt_previous()
        self._watcher = asyncio.get_running_loop().create_task(self.watch.run())
        logger.info("redis backplane %s: node %s", redacted(self.url), self.node)

    async def close(self) -> None:
        for task in (self._watcher, self._recovering):
            if task is not None:
                task.cancel()
        self.watch.cancel()
        if self.healthy:
            with suppress_down():
                if self.writes:
                    await asyncio.wait_for(self.writes.flush_once(), 2.0)
                # Declared lost at once: another node adopts this node's sessions
                # (their streams ended with error shutdown) at its next heartbeat.
                await self.redis.zadd("wss:nodes", {self.node: 0})
        await self.pubsub.close()
        with suppress_down():
            await self.redis.aclose()

    def status(self) -> str | None:
        if self.healthy:
            return None
        return "degraded: the Redis backplane is unreachable; serving local sessions only"

    def tunnel_count(self) -> int:
        return len(self.tunnels)

    def tunnel_owners(self) -> set[str]:
        return {tunnel.owner for tunnel in self.tunnels.values()}

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A task of the backplane's own (kept referenced until it is done)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def enqueue(self, fill: Fill, wait: bool) -> asyncio.Future[Any] | None:
        return self.writes.enqueue(fill, wait)

    def later(self, sid: str, fill: Fill) -> None:
        self.writes.later(sid, fill)

    # ------------------------------------------------------------- outages

    def down(self, exc: BaseException) -> None:
        """Redis stopped answering: serve local sessions only, and recover in the background."""
        if self.healthy:
            self.healthy = False
            self.stats["outages"] += 1
            logger.warning("redis backplane unreachable (%s); serving local sessions only", exc)
            self.events.node_lost(None)  # every tunnel goes through Redis
        if self._recovering is None or self._recovering.done():
            self._recovering = self.spawn(self._recover())

    async def _recover(self) -> None:
        """Reconnect with full-jitter backoff, then write this node's state back."""
        delay = 0.1
        while True:
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 5.0)
            try:
                await self.redis.ping()
                await self.pubsub.connect()
                await self._resync()
            except DOWN as exc:
                logger.debug("redis still unreachable: %s", exc)
                continue
            except Exception:  # never give up on recovering: log it and try again
                logger.exception("writing this node's state back to Redis failed; retrying")
                continue
            logger.warning("redis backplane reachable again; state written back")
            return

    async def load_scripts(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for script in self.scripts.values():
            pipe.script_load(script.script)
        await pipe.execute()

    async def owners(self, sids: list[str]) -> dict[str, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hget(skey(sid), "owner")
        return {sid: None if o is None else o.decode() for sid, o in zip(sids, await pipe.execute())}

    async def _resync(self) -> None:
        """After an outage: make Redis know what this node holds, then serve again.

        Sessions another node adopted meanwhile (this node was declared lost)
        are dropped here. The others get their memory log written again (the
        append script skips what Redis has); one whose hash is gone (Redis
        restarted empty) is registered again with its agent name and presence.
        What ended or left during the outage is written last.
        """
        await self.load_scripts()  # (a restarted Redis has none)
        await self.watch.heartbeat()
        events = self.events
        sessions = events.local_sessions()
        deferred = self.writes.deferred()  # (kept until the writes are queued: this may fail)
        owners = await self.owners([s.id for s in sessions] + [sid for sid, _ in deferred])
        for session in sessions:
            owner = owners[session.id]
            if owner is not None and owner != self.node:
                events.fence_session(session.id)
        # No await from here on: these go first in the write queue, before
        # anything the sessions produce from now on.
        for session in sessions:
            if events.local_session(session.id) is not session:
                continue
            session.out.journal = []
            if owners[session.id] is None:
                self.enqueue(lambda pipe, s=session: self.logs.reregister(pipe, s), wait=False)
            self.logs.write(session, session.log, wait=False)
        for sid, fill in deferred:
            if owners[sid] in (None, self.node):
                self.enqueue(fill, wait=False)
        self.writes.drop_deferred(len(deferred))
        self.healthy = True
        await self.writes.flush_pending()

    # ------------------------------------------------------------- sessions

    async def write_log(self, session: Session | None) -> None:
        if session is not None:
            await self.logs.write_log(session)

    def write_log_nowait(self, session: Session) -> None:
        self.logs.write_log_nowait(session)

    def session_opened(self, session: Session) -> None:
        self.logs.opened(session)

    def session_ended(self, session: Session) -> None:
        self.channels.leave_all(session)
        self._release_agent(session)
        self.calls.forget(session.id)
        self.logs.ended(session)

    def session_resumed(self, session: Session, *, rights_changed: bool = False) -> None:
        if rights_changed:  # an adopting node must know the narrower rights too
            self.later(session.id, lambda pipe: self.logs.save_rules(pipe, session))
        if self.healthy:  # what waited in its queue while it was away
            self.spawn(self.take_direct_messages(session.id))

    # ----------------------------------------------------------- agent names

    def agent_held(self, name: str) -> bool:
        return name in self._agents

    def claim_agent(self, name: str, session: Session) -> None:
        self._agents[name] = session  # shared uniqueness was settled by reserve_agent()

    async def refresh_agents(self) -> None:
        """Keep the agent names of this node's live sessions from expiring."""
        if not self._agents:
            return
        keys = [f"wss:agent:{name}" for name in self._agents]
        args = [self.agent_ttl_ms, *(session.id for session in self._agents.values())]
        await self.scripts["refresh_agents"](keys=keys, args=args)

    def _release_agent(self, session: Session) -> None:
        agent = session.agent
        if agent is not None and self._agents.get(agent) is session:
            del self._agents[agent]
            script = self.scripts["release_agent"]
            keys, args = [f"wss:agent:{agent}"], [session.id]
            self.later(session.id, lambda pipe: eval_in(pipe, script, keys, args))

    async def route(self, hello: dict[str, Any]) -> Route:
        """Find the session's owner: here, another live node (tunnel), or a lost one (adopt).

        Served here, the hello's agent name is not claimed yet: that waits
        until the hello is known to be valid and authenticated (the server
        calls :meth:`reserve_agent` then), so a refused hello locks no name."""
        if not self.healthy:
            return LOCAL
        sid = hello.get("session")
        local = self.events.local_session
        try:
            if isinstance(sid, str) and local(sid) is None:
                for _ in range(3):
                    owner = await self.redis.hget(skey(sid), "owner")
                    if owner is None or owner.decode() == self.node:
                        break
                    owner_name = owner.decode()
                    if await self.watch.alive(owner_name):
                        return Route(owner_name, connect=lambda owner=owner_name: self._open_tunnel(owner))
                    await self.watch.adopt_node(owner_name)
                    if local(sid) is not None:
                        break
            return LOCAL
        except DOWN as exc:
            self.down(exc)
        return LOCAL

    async def reserve_agent(self, hello: dict[str, Any]) -> Route:
        """Claim ``hello.agent`` across nodes for the session the hello will
        open (``Route.session_id``); ``Route.agent_taken``: another session holds it."""
        agent = hello.get("agent")
        if not isinstance(agent, str) or not valid_name(agent):
            return LOCAL  # (the hello is refused with bad_name later)
        sid = hello.get("session")
        resumed = self.events.local_session(sid) if isinstance(sid, str) else None
        if resumed is not None and resumed.agent == agent:
            return LOCAL  # resuming the session that holds it
        new_id = secrets.token_urlsafe(16)
        if not self.healthy:
            return Route(session_id=new_id)  # degraded: only this node's names are checked
        try:
            claimed = await self.scripts["claim_agent"](keys=[f"wss:agent:{agent}"], args=[new_id, self.agent_ttl_ms])
        except DOWN as exc:
            self.down(exc)
            return Route(session_id=new_id)
        return Route(session_id=new_id, agent_taken=not claimed)

    # ------------------------------------------------------------ messaging

    def call(self, session: Session, call: MessagingCall) -> Awaitable[None] | None:
        if call.kind == "unsubscribe":
            self.channels.unsubscribe(call.msg.channel, session)  # type: ignore[union-attr]
            return None
        return self._call(session, call)

    async def _call(self, session: Session, call: MessagingCall) -> None:
        msg = call.msg
        try:
            if not self.healthy:
                raise ConnectionError("the Redis backplane is unreachable")
            await self.writes.flush_pending()  # earlier writes of this node first (e.g. a leave)
            if isinstance(msg, Subscribe):
                await self.channels.subscribe(session, msg)
            elif isinstance(msg, Publish):
                await self.channels.publish(session, msg, call.encoded or b"null")
            elif isinstance(msg, Send):
                head = orjson.dumps({"id": secrets.token_hex(8), "from": session.name})[:-1]
                payload = head + b',"data":' + (call.encoded or b"null") + b"}"
                found = await self.scripts["send"](keys=[f"wss:agent:{msg.to}"], args=[payload, *self.inbox])
                session.members.sent(msg, bool(found), full=found == 2)
        except BaseException as exc:  # answered, whatever happened: the connection goes on
            if isinstance(exc, DOWN) and not isinstance(exc, ConnectionError):
                self.down(exc)  # (a ConnectionError of ours: the flusher saw it already)
            elif not isinstance(exc, (*DOWN, asyncio.CancelledError)):
                logger.error("backplane %s failed: %r", call.kind, exc)
            if isinstance(msg, Subscribe):
                self.channels.subscribe_failed(session, msg.channel)
            session.members.failed(call, "the Redis backplane is unreachable; try again")
            if not isinstance(exc, Exception):
                raise

    def publish_nowait(self, channel: str, sender: str, data: bytes, publisher: str = "") -> None:
        self.channels.publish_nowait(channel, sender, data, publisher)

    def take_deliveries(self) -> list[Delivery]:
        return self.channels.take_deliveries()

    def sweep(self) -> None:
        self.channels.sweep()

    async def take_direct_messages(self, sid: str) -> None:
        """Hand the session the direct messages and routed calls queued for it (:meth:`RoutedCalls.take_queued`)."""
        await self.calls.take_queued(sid)

    # ---------------------------------------------------------- routed calls

    async def route_call(self, session: Session, call: RouteCall) -> bool:
        return await self.calls.route(session, call)

    async def answer_call(self, session: Session, answer: AnswerCall) -> str:
        return await self.calls.answer(session, answer)

    async def take_results(self, sid: str) -> None:
        await self.calls.take_results(sid)

    # -------------------------------------------------------------- pub/sub

    async def listen(self, channel: str) -> None:
        await self.pubsub.listen(channel)

    def unlisten_nowait(self, channel: str) -> None:
        self.pubsub.unlisten_nowait(channel)

    # -------------------------------------------------------------- tunnels

    def send_to_node(self, node: str, msg: dict[str, Any]) -> None:
        """A control message to ``node``, in order with this node's other writes."""
        payload = orjson.dumps(msg)
        if self.healthy:
            self.enqueue(lambda pipe: pipe.publish(f"wss:n:{node}", payload), wait=False)

    def send_to_tunnel(self, tunnel: str, data: bytes) -> None:
        if self.healthy:
            self.enqueue(lambda pipe: pipe.publish(f"wss:p:{tunnel}", data), wait=False)

    async def _open_tunnel(self, owner: str) -> Tunnel:
        tunnel = Tunnel(self, secrets.token_hex(8), owner)
        self.tunnels[tunnel.id] = tunnel
        try:
            await self.listen(f"wss:p:{tunnel.id}")
        except BaseException:
            del self.tunnels[tunnel.id]
            self.pubsub.forget(f"wss:p:{tunnel.id}")
            raise
        return tunnel

    async def close_tunnel(self, tunnel: str) -> None:
        if self.tunnels.pop(tunnel, None) is not None:
            await self.pubsub.unlisten(f"wss:p:{tunnel}")

