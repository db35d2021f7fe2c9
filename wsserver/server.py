"""The WebSocket transport: a thin pump around the sans-I/O protocol core.

Per connection there are two tasks and one task per running stream:

* the *reader* (the websockets handler) feeds text frames into
  :class:`~wsserver.protocol.ServerProtocol` and carries out the actions it
  returns (start or stop a generation, close the connection);
* pending output is written at the end of the event loop's turn in which it
  appeared (one ``call_soon`` callback, no task switch), by
  ``broadcast()``, while no batch is in flight and the socket takes data
  without waiting. Otherwise the *writer* task (created on first need) is
  woken and sends, awaiting the socket. Either way every pending frame is
  taken from the protocol at once (sequenced and, when the socket lags or
  a provider hands over a burst, coalesced there) and only one batch is in
  flight, which keeps frames in ``seq`` order although several stream
  tasks produce output concurrently;
* each generation runs :func:`~wsserver.streams.run_generation` in a task
  that belongs to the session (:class:`_LiveSession`), not to the
  connection: a dropped socket detaches the session and its streams go on
  until ``session_ttl`` passes with nothing attached.

Where this layer leaks: ``await ws.send()`` does not yield to the event loop
until the write buffer passes ``write_limit``, so a stream task that never
awaits would starve everything else; providers yield between tokens (the
simulated one does ``await asyncio.sleep(0)`` when unpaced).

Plain HTTP on the same port goes through ``process_request``: ``GET /healthz``
answers 200 and ``GET /`` a small page; websockets closes the TCP connection
after each plain-HTTP reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
from websockets.asyncio.server import Server as _WSServer
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from . import __version__
from .config import ServerConfig
from .auth import ANONYMOUS, Authenticator, ChannelRules, Identity, origin_allowed, token_from_request
from .backplane import create as create_backplane
from .errors import CloseCode, ErrorCode, ProtocolError
from .hub import NAME_RULE, valid_name
from .messages import SUBPROTOCOL, ChatMessage, Error, GenerateParams, Hello, Shutdown, encode
from .protocol import CloseConnection, ConnState, Opened, ServerProtocol
from .providers import Providers, SimulatedProvider
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Telemetry
from .session import (
    HubCall,
    MessagingLimits,
    Session,
    StartGeneration,
    StopGeneration,
    Stream,
    TokenBucket,
    TokenBudget,
)
from .static import StaticFiles
from .streams import run_generation

__all__ = ["Server", "default_providers"]

logger = logging.getLogger("wsserver.server")
events = logging.getLogger("wsserver.events")

WS_PATHS = frozenset({"/", "/ws"})
#: With ``conformance_echo`` on: a WebSocket path that echoes every message,
#: for RFC 6455 conformance suites (Autobahn cases via kosoku), which need an
#: echo peer and know nothing of ``hello``. Same ``serve()`` settings as
#: ``/``; off by default.
ECHO_PATH = "/_echo"
#: Frames waiting for the writer beyond which the reader stops reading the
#: client's requests until the writer has caught up. A client that sends
#: requests but never reads the answers thus meets TCP backpressure instead
#: of growing the server's memory.
MAX_BACKLOG = 1024
#: How long cancelled generations may take to clean up at shutdown
#: (providers close their upstream response in that time).
STOP_GRACE_S = 5.0


def default_providers(config: ServerConfig, environ: Mapping[str, str] | None = None) -> Providers:
    """The providers a server offers out of the box.

    ``simulated`` always; ``openai`` and ``anthropic`` when a key or a base URL
    is set in ``config`` or in the SDKs' own variables in ``environ``
    (``os.environ`` by default), see :mod:`wsserver.providers.setup`. Their
    SDKs are imported only then. Known providers that are not configured
    answer ``provider_unavailable`` with what to set; the server starts anyway,
    also when the default provider is one of them (logged as a warning).
    """
    from .providers.setup import real_providers

    simulated = SimulatedProvider(
        tokens_per_s=config.sim_tokens_per_s,
        ttft_ms=config.sim_ttft_ms,
        default_model=config.model if config.provider == "simulated" and config.model else "sim-1",
    )
    real, unconfigured = real_providers(config, environ)
    providers = Providers([simulated, *real], default=config.provider, unconfigured=unconfigured)
    if config.provider not in providers.names:
        logger.warning(
            "default provider %r is not available (%s); generate requests without a provider will fail",
            config.provider,
            unconfigured.get(config.provider) or f"available: {', '.join(providers.names)}",
        )
    return providers


def _client_ip(connection: ServerConnection) -> str:
    address = getattr(connection, "remote_address", None)
    return str(address[0]) if address else "?"


def _select_subprotocol(connection: ServerConnection, offered: Any) -> str | None:
    # Accept clients that offer no subprotocol (unlike websockets' default).
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


class Server:
    """A wsserver instance.

    Use as ``async with Server(config) as server: await server.serve_forever()``,
    or ``await server.start()`` / ``await server.close()``. ``server.port`` is
    the bound port (useful with ``port=0``).
    """

    def __init__(
        self, config: ServerConfig | None = None, *, providers: Providers | None = None
    ) -> None:
        self.config = config or ServerConfig()
        self.providers = providers or default_providers(self.config)
        self._ws_server: _WSServer | None = None
        self.connections: set[_Connection] = set()
        #: Connections whose output may be backing up (the writer was needed,
        #: or the socket's buffer passed write_limit): all the monitor checks.
        self._lagging: set[_Connection] = set()
        #: Frames and bytes written inline since the counters were last
        #: updated (a prometheus Counter.inc takes a lock: ~1 us per frame).
        self._out_frames = 0
        self._out_bytes = 0
        #: Live sessions by id, attached or not.
        self.sessions: dict[str, _LiveSession] = {}
        cfg = self.config
        self.backplane = create_backplane(self)
        self.hub = self.backplane.hub
        #: Connections tunnelled here from other nodes (Redis backplane), by tunnel id.
        self.tunnelled: dict[str, _Tunnelled] = {}
        self.limits = MessagingLimits(
            max_subscriptions=cfg.max_subscriptions,
            max_data_bytes=cfg.max_data_bytes,
            publish_rate=cfg.publish_rate,
            publish_burst=cfg.publish_rate * 2,
        )
        #: Counters for operators (also exported as metrics).
        self.stats = {"slow_consumer_disconnects": 0}
        self._monitor: asyncio.Task[None] | None = None
        self.auth = Authenticator(
            api_keys=cfg.api_keys,
            jwt_secret=cfg.jwt_secret,
            rules=ChannelRules(tuple(cfg.channel_subscribe), tuple(cfg.channel_publish)),
        )
        self.telemetry = Telemetry(log_content=cfg.log_content)
        self.telemetry.bind(self._session_counts)
        self.telemetry.bind_backplane(self.backplane)
        self.draining = False
        self._identities: weakref.WeakKeyDictionary[ServerConnection, Identity] = weakref.WeakKeyDictionary()
        self._per_ip: dict[str, int] = {}
        self._generate_buckets: dict[str, TokenBucket] = {}
        self._token_budgets: dict[str, TokenBudget] = {}
        self.welcome = {
            "heartbeat_ms": self.config.heartbeat_ms,
            "limits": {
                "max_streams": self.config.max_streams,
                "max_message_bytes": self.config.max_size,
                "max_id_length": 64,
                "max_subscriptions": self.config.max_subscriptions,
                "max_data_bytes": self.config.max_data_bytes,
            },
            "server": f"wsserver/{__version__}",
        }
        self._static = StaticFiles()

    def _session_counts(self) -> tuple[int, int, int]:
        attached = sum(1 for live in self.sessions.values() if live.conn is not None)
        streams = sum(len(live.session.streams) for live in self.sessions.values())
        return attached, len(self.sessions) - attached, streams

    async def start(self) -> None:
        cfg = self.config
        await self.backplane.start()
        self._ws_server = await serve(
            self._handle,
            cfg.host,
            cfg.port,
            select_subprotocol=_select_subprotocol,
            process_request=self._process_request,
            compression="deflate" if cfg.compression else None,
            max_size=cfg.max_size,
            max_queue=cfg.max_queue,
            write_limit=cfg.write_limit,
            ping_interval=cfg.ping_interval or None,
            ping_timeout=cfg.ping_timeout or None,
            close_timeout=cfg.close_timeout,
            open_timeout=cfg.open_timeout,
            server_header=f"wsserver/{__version__}",
        )
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        logger.info("listening on ws://%s:%d/", cfg.host, self.port)

    @property
    def port(self) -> int:
        assert self._ws_server is not None, "server not started"
        return self._ws_server.sockets[0].getsockname()[1]  # type: ignore[no-any-return]

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/"

    async def drain(self, timeout: float | None = None) -> None:
        """Graceful shutdown: stop accepting (``/readyz`` answers 503), send every
        client ``shutdown {reconnect_ms, drain_ms}``, let running streams finish
        for up to ``timeout`` (``drain_timeout``), end the rest with ``error
        shutdown``, close every socket with 1001 and stop."""
        if self._ws_server is None:
            return
        cfg = self.config
        timeout = cfg.drain_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        # Keep listening: /readyz answers 503 to take the node out of the load
        # balancer, and new WebSocket handshakes are refused with 503.
        self.draining = True
        notice = encode(Shutdown(reconnect_ms=cfg.reconnect_ms, drain_ms=int(timeout * 1000)))
        for conn in list(self.connections):
            conn.proto.send_unsequenced(notice)
            conn.send_soon()
        deadline = loop.time() + timeout
        while loop.time() < deadline and any(live.session.streams for live in self.sessions.values()):
            await asyncio.sleep(0.05)
        self._end_all()
        flushed = loop.time() + 1.0  # let the writers send those stream.end frames
        while loop.time() < flushed and any(c.proto.backlog or c.busy for c in self.connections):
            await asyncio.sleep(0.01)
        closing = [
            loop.create_task(conn.ws.close(CloseCode.GOING_AWAY, "server shutdown"))
            for conn in list(self.connections)
        ]
        if closing:
            await asyncio.wait(closing, timeout=cfg.close_timeout + 1)
        await self.close()

    async def close(self) -> None:
        """Close every connection (1001) and stop listening."""
        if self._ws_server is None:
            return
        if self._monitor is not None:
            self._monitor.cancel()
        self._ws_server.close()
        await self._ws_server.wait_closed()
        self._ws_server = None
        tasks = [t for live in self.sessions.values() for t in live.tasks.values()]
        self._end_all()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            for task in stuck:
                logger.warning("stream task %s did not stop in %.0f s", task.get_name(), STOP_GRACE_S)
        await self.backplane.close()
        await self.providers.aclose()

    def _end_all(self) -> None:
        """Stop every stream with ``error shutdown``. Alone, the sessions end too;
        on a shared backplane they stay there for another node to adopt, so a
        client of a node that is restarted resumes elsewhere."""
        forget = not self.backplane.shared
        for live in list(self.sessions.values()):
            live.end("error", (ErrorCode.SHUTDOWN.value, "the server is shutting down"), forget=forget)

    async def serve_forever(self) -> None:
        assert self._ws_server is not None, "server not started"
        await self._ws_server.serve_forever()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------- plain HTTP

    def _refuse(self, connection: ServerConnection, status: HTTPStatus, text: str, reason: str) -> Response:
        self.telemetry.connections_refused.labels(reason).inc()
        response = connection.respond(status, text)
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            response.headers["Retry-After"] = "1"
        return response

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        headers = request.headers
        if headers.get("Upgrade", "").lower() == "websocket":
            if path == ECHO_PATH and self.config.conformance_echo:
                return None
            if path not in WS_PATHS:
                return self._refuse(connection, HTTPStatus.NOT_FOUND, "no WebSocket endpoint here; use /\n", "path")
            return self._admit(connection, request)
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if path == "/readyz":
            if self.draining:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            degraded = self.backplane.status()
            return connection.respond(HTTPStatus.OK, f"{degraded}\n" if degraded else "ready\n")
        if path == "/metrics" and self.config.metrics:
            token = self.config.metrics_token
            if token and headers.get("Authorization", "") != f"Bearer {token}":
                return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            self._count_output()
            body = self.telemetry.render()
            return Response(
                200, "OK", Headers([("Content-Type", METRICS_CONTENT_TYPE), ("Content-Length", str(len(body)))]), body
            )
        found = self._static.get(path)
        if found is not None:
            content_type, body = found
            headers = Headers(
                [
                    ("Content-Type", content_type),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-cache"),
                ]
            )
            return Response(200, "OK", headers, body)
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """The checks before an upgrade: drain, Origin, connection limits, credential."""
        cfg, headers = self.config, request.headers
        if self.draining:
            return self._refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "draining\n", "draining")
        if not origin_allowed(headers.get("Origin"), headers.get("Host"), cfg.allowed_origins):
            return self._refuse(connection, HTTPStatus.FORBIDDEN, "origin not allowed\n", "origin")
        if len(self.connections) >= cfg.max_connections:
            return self._refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n", "limit")
        ip = _client_ip(connection)
        if cfg.max_connections_per_ip and self._per_ip.get(ip, 0) >= cfg.max_connections_per_ip:
            return self._refuse(connection, HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n", "ip_limit")
        if self.auth.enabled:
            token = token_from_request(request.path, headers.get("Authorization"))
            if token is not None:
                identity = self.auth.verify(token)
                if identity is None:
                    return self._refuse(connection, HTTPStatus.UNAUTHORIZED, "unauthorized\n", "unauthorized")
                self._identities[connection] = identity
        return None

    # ------------------------------------------------------------ WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        if self.config.conformance_echo and request is not None and request.path.split("?", 1)[0] == ECHO_PATH:
            await _echo(ws)
            return
        conn = _Connection(self, ws)
        ip = conn.ip
        self.connections.add(conn)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self.telemetry.connections_open.inc()
        events.info("connection open", extra={"event": "connection.open", "ip": ip})
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self._lagging.discard(conn)
            self.telemetry.connections_open.dec()
            session = conn.proto.session or (conn.live.session if conn.live else None)
            events.info(
                "connection closed",
                extra={
                    "event": "connection.close",
                    "ip": ip,
                    "session": session.id if session is not None else None,
                    "code": ws.close_code,
                },
            )
            left = self._per_ip.get(ip, 1) - 1
            if left:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)

    def _identify(self, hello: Hello, conn: _Connection | _Tunnelled) -> Identity:
        identity = conn.identity  # from the handshake (kept: a refused hello may be retried)
        if identity is not None:
            return identity
        if not self.auth.enabled:
            return self.auth.anonymous()
        if hello.token is not None:
            identity = self.auth.verify(hello.token)
            if identity is not None:
                return identity
        raise ProtocolError(
            ErrorCode.UNAUTHORIZED, "a valid credential is required", ref=hello.id, close=CloseCode.UNAUTHORIZED
        )

    def _budgets(self, key: str) -> tuple[TokenBucket | None, TokenBudget | None]:
        """Generation and token limits are per identity (per client IP when anonymous)."""
        cfg = self.config
        bucket = budget = None
        if cfg.generate_rate > 0:
            bucket = self._generate_buckets.get(key)
            if bucket is None:
                bucket = self._generate_buckets[key] = TokenBucket(cfg.generate_rate / 60, cfg.generate_rate)
        if cfg.token_rate > 0:
            budget = self._token_budgets.get(key)
            if budget is None:
                budget = self._token_budgets[key] = TokenBudget(cfg.token_rate)
        return bucket, budget

    def _protocol_for(self, conn: _Connection | _Tunnelled) -> ServerProtocol:
        """The protocol state machine of a new connection (or tunnel) ``conn``."""
        cfg = self.config
        return ServerProtocol(
            open_session=lambda hello: self._open_session(hello, conn),
            welcome=self.welcome,
            message_rate=cfg.message_rate,
            abuse_threshold=max(50, cfg.abuse_threshold) if cfg.abuse_threshold else 0,
        )

    def _open_session(self, hello: Hello, conn: _Connection | _Tunnelled) -> Opened:
        """Resume the session ``hello`` names if possible, else open a fresh one."""
        before: list[bytes] = []
        if hello.agent is not None and not valid_name(hello.agent):
            raise ProtocolError(
                ErrorCode.BAD_NAME,
                f"an agent name {NAME_RULE}",
                field="agent",
                ref=hello.id,
            )
        identity = self._identify(hello, conn)
        live = self.sessions.get(hello.session) if hello.session else None
        if live is not None and live.session.identity != identity.id:
            live = None  # another identity's session: as if unknown (no hint that it exists)
        if live is not None:
            live.attach(conn)  # takes the session over from another connection
            session = live.session
            session.take_output()  # sequence what is pending: the replay covers it
            if hello.snapshot:
                session.snapshot()
                self.telemetry.resumes.labels("ok").inc()
                return Opened(session, True)
            replay = session.replay_after(hello.last_seq or 0)
            if replay is not None:
                self.telemetry.resumes.labels("ok").inc()
                return Opened(session, True, after=replay)
            before.append(
                encode(
                    Error(
                        code=ErrorCode.RESUME_FAILED.value,
                        message=(
                            f"cannot resume after seq {hello.last_seq or 0}: the session's "
                            "replay log no longer reaches back that far; a new session was opened"
                        ),
                    )
                )
            )
            self.telemetry.resumes.labels("failed").inc()
            live.detach(conn)
            live.end("cancelled")
        # (with a shared backplane, Backplane.route() settled it across nodes too)
        if conn.agent_taken or (hello.agent is not None and hello.agent in self.hub.agents):
            raise ProtocolError(
                ErrorCode.AGENT_NAME_TAKEN,
                f"agent name {hello.agent!r} is held by another session; resume that "
                "session or choose another name",
                ref=hello.id,
            )
        session = self._new_session(
            conn.new_session_id or secrets.token_urlsafe(16),  # 128 bits: unguessable
            identity.id,
            identity.rules,
            hello.agent,
            "ip:" + conn.ip,
        )
        conn.new_session_id = None
        live = _LiveSession(self, session)
        self.sessions[session.id] = live
        self.backplane.session_opened(session)
        live.attach(conn)
        return Opened(session, False, before=before)

    def _new_session(
        self, session_id: str, identity: str, rules: ChannelRules | None, agent: str | None, anonymous_key: str
    ) -> Session:
        generate_bucket, token_budget = self._budgets(identity if identity != ANONYMOUS else anonymous_key)
        session = Session(
            session_id,
            providers=self.providers,
            max_streams=self.config.max_streams,
            max_log_messages=self.config.replay_max_messages,
            max_log_bytes=self.config.replay_max_bytes,
            coalesce=self.config.coalesce,
            hub=self.hub,
            agent=agent,
            limits=self.limits,
            identity=identity,
            rules=rules,
            observer=self.telemetry,
            generate_bucket=generate_bucket,
            token_budget=token_budget,
        )
        if agent is not None:
            self.hub.claim_agent(agent, session)
        return session

    # ------------------------------------------------- several nodes (Redis)

    def adopt(
        self,
        sid: str,
        state: dict[str, str],
        log: list[tuple[int, bytes]],
        running: dict[str, dict[str, Any] | None],
    ) -> Session:
        """Take over a session of a lost node from what the backplane kept.

        Its replay log and seq continue where the lost node's writes ended;
        streams that ran there end with ``error node_lost``; the session is
        detached until its client resumes (or it expires).
        """
        rules = None
        if state.get("rules"):
            raw = orjson.loads(state["rules"])
            rules = ChannelRules(tuple(raw["subscribe"]), tuple(raw["publish"]))
        session = self._new_session(sid, state.get("identity", ANONYMOUS), rules, state.get("agent") or None, "ip:?")
        session.public_id = state.get("public_id") or session.public_id
        session.unsynced = []
        seq = max(int(state.get("seq") or 0), log[-1][0] if log else 0)
        texts = session.restore_log(
            seq, int(state.get("acked") or 0), log[0][0] if log else seq + 1, [f for _, f in log]
        )
        for name in orjson.loads(state.get("subs") or "[]"):
            session.subscriptions.add(name)
            session.paused.add(name)
            self.hub.channel(name).subscribers[session] = None
        live = _LiveSession(self, session)
        self.sessions[sid] = live
        now = session.clock()
        lost = (ErrorCode.NODE_LOST.value, "the node running this stream was lost")
        for stream_id, request in sorted(running.items()):
            request = request or {}
            stream = Stream(
                id=stream_id,
                ref=None,
                provider=request.get("provider", "?"),
                model=request.get("model", "?"),
                messages=tuple(ChatMessage(**m) for m in request.get("messages", ())),
                params=GenerateParams(**request.get("params", {})),
                started_at=now,
                channel=request.get("channel"),
            )
            session.end_lost(stream, texts.get(stream_id, []), lost)
        live.start_detached()
        return session

    def node_lost(self, node: str | None) -> None:
        """``node`` stopped (``None``: Redis is unreachable, so every node is out
        of reach): end the tunnels to it, whose clients reconnect and resume on
        the node that adopts its sessions, and those from it."""
        for conn in list(self.connections):
            if conn.tunnel_owner is not None and node in (None, conn.tunnel_owner):
                conn.close_lost()
        for tunnel in [t for t, rc in self.tunnelled.items() if node in (None, rc.node)]:
            self.tunnel_close(tunnel)

    def fence_session(self, sid: str) -> None:
        """Another node adopted this session (this one was declared lost): drop
        it here without touching the backplane; its client gets 1012 and
        resumes on the adopting node."""
        live = self.sessions.pop(sid, None)
        if live is None:
            return
        conn, live.conn = live.conn, None
        if conn is not None:  # nothing more reaches the client from here
            conn.proto.release()
            conn.live = None
        live.end("error", (ErrorCode.NODE_LOST.value, "this node was declared lost"), forget=False, write=False)
        if isinstance(conn, _Connection):
            conn.close_lost()
        elif conn is not None:
            self.tunnel_close(conn.tunnel, code=CloseCode.SERVICE_RESTART)

    def tunnel_peers(self) -> set[str]:
        """Nodes whose clients are tunnelled here."""
        return {conn.node for conn in self.tunnelled.values()}

    def tunnel_open(self, tunnel: str, node: str, hello: str, token: str | None, ip: str) -> None:
        """A client reached ``node`` with a hello for a session of ours: serve it through a tunnel."""
        if self.draining or self._ws_server is None:  # (this node is going away: resume elsewhere)
            reason = {"code": CloseCode.SERVICE_RESTART, "reason": "node draining; resume again"}
            self.backplane.send_to_tunnel(tunnel, b"C" + orjson.dumps(reason))
            return
        identity = self.auth.verify(token) if token is not None and self.auth.enabled else None
        conn = self.tunnelled[tunnel] = _Tunnelled(self, tunnel, node, ip, identity)
        conn.feed(hello)

    def tunnel_input(self, tunnel: str, text: str | bytes) -> None:
        """A client message relayed from the client's node (``bytes``: a binary frame)."""
        conn = self.tunnelled.get(tunnel)
        if conn is not None:
            conn.feed(text)

    def tunnel_close(self, tunnel: str, *, code: int | None = None) -> None:
        """The client's node closed the tunnel (or is gone); with ``code``, tell it to close the client."""
        conn = self.tunnelled.pop(tunnel, None)
        if conn is not None:
            if code is not None:
                conn.send_close(code, "session node lost; resume")
            conn.stop()

    def _deliver(self, channel: str, frame: bytes, sessions: list[Session], offset: int = 0) -> None:
        """Send one encoded channel frame to the attached ones among ``sessions``.

        A connection whose writer is idle gets it through ``broadcast()`` (no
        per-subscriber encoding, no per-subscriber task); one with frames
        still queued gets it queued behind them, so nothing overtakes. A
        detached session gets nothing, and neither does a resumed one until it
        subscribes again: it recovers by offset then, and live traffic that
        arrived before its recovery would otherwise overtake the recovered
        messages.
        """
        direct = []
        lives = self.sessions
        if not offset:  # one node: the fan-out hot path, per subscriber as little as possible
            for session in sessions:
                live = lives.get(session.id)
                conn = live.conn if live is not None else None
                if conn is None or channel in session.paused:
                    continue
                if conn.busy or session._pending or conn.ws.paused:  # (_pending: has_output, inlined)
                    session.emit_unsequenced(frame)  # a paused socket: through the writer (drain)
                else:
                    direct.append(conn.ws)
            if direct:
                broadcast(direct, frame, text=True)
            return
        for session in sessions:
            live = lives.get(session.id)
            conn = live.conn if live is not None else None
            if session.held:  # a subscribe or publish of its own on the backplane is under way
                held = session.held.get(channel)
                if held is not None:
                    held.append((offset, frame))
                    continue
            if conn is None or channel in session.paused:
                continue
            offsets = session.channel_offsets  # each offset once, in order (a late copy is dropped)
            if offset <= offsets.get(channel, 0):
                continue
            offsets[channel] = offset
            if conn.busy or session.has_output or conn.ws.paused:
                session.emit_unsequenced(frame)  # a paused socket: through the writer (drain)
            else:
                direct.append(conn.ws)
        if direct:
            broadcast(direct, frame, text=True)

    async def _watch(self) -> None:
        """Every 0.25 s: close slow consumers (1013) and forget idle channels.

        Only lagging connections are looked at: output backs up only behind
        a busy writer or a paused socket, and both put the connection there.
        """
        limit = self.config.slow_consumer_bytes
        lagging = self._lagging
        while True:
            await asyncio.sleep(0.25)
            for conn in list(lagging):
                if conn.pending_bytes() > limit and conn.close_with is None:
                    self.stats["slow_consumer_disconnects"] += 1
                    self.telemetry.slow_consumers.inc()
                    logger.warning("closing a slow consumer (1013): %d bytes waiting", conn.pending_bytes())
                    conn.close_slow()
                if conn.close_with is not None or not (
                    conn.busy or conn.ws.paused or conn.proto.has_output or conn.tunnel_inbox is not None
                ):
                    lagging.discard(conn)
            self.hub.sweep()
            self._prune_budgets()
            self._count_output()

    def _count_output(self) -> None:
        if self._out_frames:
            self.telemetry.frames_out.inc(self._out_frames)
            self.telemetry.bytes_out.inc(self._out_bytes)
            self._out_frames = self._out_bytes = 0

    def _prune_budgets(self) -> None:
        """Forget rate-limit state of identities idle long enough to be full again."""
        now = time.monotonic()
        for buckets in (self._generate_buckets, self._token_budgets):
            for key, bucket in list(buckets.items()):
                rate = bucket.rate or 1.0
                full_after = (bucket.burst if isinstance(bucket, TokenBucket) else bucket.capacity) / rate
                if bucket.stamp is not None and now - bucket.stamp > full_after + 60:
                    del buckets[key]


async def _carry_out(conn: _Connection | _Tunnelled, actions: list[Any]) -> CloseConnection | None:
    """Carry out what the protocol asked for after one client message; returns a close, if asked."""
    close = None
    for action in actions:
        if type(action) is CloseConnection:
            close = action
        elif type(action) is HubCall:
            session = conn.proto.session
            if session is not None:  # (awaited: replies leave in request order)
                await conn.server.backplane.call(session, action)
        elif conn.live is not None:
            conn.live.apply([action])
    return close


def _hello_of(text: str) -> dict[str, Any] | None:
    """The fields of a ``hello`` (for routing before the protocol reads it), or None."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None  # refused by the protocol
    return msg if isinstance(msg, dict) and msg.get("type") == "hello" else None


async def _echo(ws: ServerConnection) -> None:
    """The ``conformance_echo`` route: send every message back as it came."""
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            await ws.send(message)


class _LiveSession:
    """A session at run time: its generation tasks, its connection, its expiry.

    The session outlives its connection: while detached its streams go on and
    their frames are sequenced straight into the replay log; ``session_ttl``
    after the last detach the session ends (streams stopped with
    ``error expired``, upstreams closed) and its memory is released.
    """

    __slots__ = ("_drain_scheduled", "_expiry", "conn", "server", "session", "tasks")

    def __init__(self, server: Server, session: Session) -> None:
        self.server = server
        self.session = session
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.conn: _Connection | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._drain_scheduled = False
        session.on_output = self.wake

    def wake(self) -> None:
        """Output is pending: the writer sends it, or (detached) the log takes it."""
        conn = self.conn
        if conn is not None:
            conn.send_soon()
        elif not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain_detached)

    def _drain_detached(self) -> None:
        self._drain_scheduled = False
        if self.conn is None:
            self.session.take_output()  # sequenced into the replay log only
            self.server.backplane.write_log_nowait(self.session)

    def attach(self, conn: _Connection) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        old, self.conn = self.conn, conn
        conn.live = self
        if old is not None and old is not conn:
            old.take_over()

    def detach(self, conn: _Connection) -> None:
        conn.live = None
        if self.conn is not conn:
            return  # taken over already
        self.conn = None
        self.start_detached()

    def start_detached(self) -> None:
        """No connection: subscriptions pause, the expiry clock runs, output goes to the log."""
        self.session.paused.update(self.session.subscriptions)
        if self.server.sessions.get(self.session.id) is self:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(self.server.config.session_ttl, self.expire)
        if self.session.has_output:
            self.wake()

    def expire(self) -> None:
        self._expiry = None
        self.end("error", (ErrorCode.EXPIRED.value, "the session expired with no connection attached"))

    def end(
        self, reason: str, error: tuple[str, str] | None = None, *, forget: bool = True, write: bool = True
    ) -> None:
        """Stop every stream and forget the session (``forget=False``: on a
        shared backplane, leave it there for another node to adopt; ``write=False``:
        and write nothing more there, it is another node's now)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.server.sessions.get(self.session.id) is self:
            del self.server.sessions[self.session.id]
        self.apply(self.session.close(reason, error))
        backplane = self.server.backplane
        if forget:
            self.server.hub.leave_all(self.session)
            backplane.session_ended(self.session)
        elif not write:
            self.session.unsynced = None
        elif self.conn is None:  # (an attached session's writer writes them)
            self.session.take_output()
            backplane.write_log_nowait(self.session)
        self.session.on_output = None

    def apply(self, actions: list[Any]) -> None:
        for action in actions:
            if type(action) is StartGeneration:
                stream = action.stream
                task = asyncio.get_running_loop().create_task(
                    run_generation(self.session, stream, self.server.providers[stream.provider]),
                    name=f"stream:{stream.id}",
                )
                self.tasks[stream.id] = task
                task.add_done_callback(lambda _t, sid=stream.id: self.tasks.pop(sid, None))
            elif type(action) is StopGeneration:
                task = self.tasks.get(action.stream_id)
                if task is not None:
                    task.cancel()


class _Connection:
    """The pump of one WebSocket connection."""

    __slots__ = (
        "_flush_on_close", "_send_scheduled", "_writer", "agent_taken", "busy", "close_with", "drained",
        "identity", "ip", "live", "new_session_id", "proto", "server", "tunnel_inbox", "tunnel_owner",
        "wake", "ws",
    )

    def __init__(self, server: Server, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        # made with the writer task, on first need (most connections never need it)
        self.wake: asyncio.Event | None = None
        self.drained: asyncio.Event | None = None  # set each time the writer finished a batch
        self.close_with: CloseConnection | None = None
        self.live: _LiveSession | None = None
        self.busy = False  # the writer is sending a batch
        self._send_scheduled = False
        self._flush_on_close = False
        self._writer: asyncio.Task[None] | None = None
        self.ip = _client_ip(ws)
        self.identity: Identity | None = server._identities.get(ws)
        #: Set by Backplane.route(): the id the next session gets, and whether
        #: the hello's agent name is held by another session on any node.
        self.new_session_id: str | None = None
        self.agent_taken = False
        #: The node this connection is tunnelled to (its session lives there),
        #: and what came from there that the socket has not taken yet.
        self.tunnel_owner: str | None = None
        self.tunnel_inbox: Any = None
        self.proto = server._protocol_for(self)

    async def run(self) -> None:
        try:
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            writer = self._writer
            if self._flush_on_close:  # a violation: send the error first
                with contextlib.suppress(ConnectionClosed):
                    if writer is not None:
                        writer.cancel()
                    await self._flush()
            self.proto.release()
            if self.live is not None:
                self.live.detach(self)  # a dropped socket never cancels anything
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        if self.close_with is not None:
            # Keep reading (and discarding) while the closing handshake runs:
            # unread messages would pause the transport and hide the peer's
            # close frame until close_timeout.
            discard = asyncio.get_running_loop().create_task(self._discard_incoming())
            with contextlib.suppress(ConnectionClosed):
                await self.ws.close(self.close_with.code, self.close_with.reason)
            discard.cancel()

    async def _discard_incoming(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in self.ws:
                pass

    def take_over(self) -> None:
        """Another connection resumed this one's session: close with 4000."""
        self.proto.release()
        self.live = None
        self._close_or_abort(CloseCode.SESSION_TAKEN_OVER, "session taken over")

    async def _read_loop(self) -> None:
        ws, proto = self.ws, self.proto
        telemetry = self.server.telemetry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.server.config.hello_timeout
        while self.close_with is None:
            if proto.state is ConnState.AWAITING_HELLO:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await ws.recv()
                except TimeoutError:
                    self.close_with = CloseConnection(CloseCode.HELLO_TIMEOUT, "no hello in time")
                    return
                if self.server.backplane.shared and isinstance(data, str):
                    owner = await self._route(data)
                    if owner is not None:
                        await self._tunnel(owner, data)
                        return
            else:
                data = await ws.recv()
            telemetry.bytes_in.inc(len(data))
            if isinstance(data, str):
                actions = proto.receive_text(data)
                telemetry.messages_in.labels(proto.last_type).inc()
            else:
                actions = proto.receive_binary(data)
                telemetry.messages_in.labels("binary").inc()
            close = await _carry_out(self, actions)
            if close is not None:
                self.close_with = close
                self._flush_on_close = True  # the error goes out before the close
            if proto.has_output:
                self.send_soon()
                if proto.backlog >= MAX_BACKLOG:
                    self.send_now()
                writer, drained = self._writer, self.drained
                while proto.backlog >= MAX_BACKLOG and writer is not None and not writer.done():
                    assert drained is not None
                    drained.clear()
                    await drained.wait()

    def send_soon(self) -> None:
        """Output is pending: send it at the end of this turn of the event
        loop, together with whatever else is produced in the same turn."""
        if not self._send_scheduled:
            self._send_scheduled = True
            asyncio.get_running_loop().call_soon(self.send_now)

    def send_now(self) -> None:
        """Write what is pending now if no batch is in flight and the socket
        takes it without waiting (the write buffer is below ``write_limit``),
        through ``broadcast()``; else wake the writer, which awaits the socket."""
        self._send_scheduled = False
        ws = self.ws
        session = self.proto.session
        # (a shared backplane: the writer writes the frames to Redis before it sends them)
        shared = session is not None and session.unsynced is not None
        if self.busy or ws.paused or ws.protocol.state is not State.OPEN or shared:
            self.server._lagging.add(self)
            if self._writer is None:
                self.wake, self.drained = asyncio.Event(), asyncio.Event()
                self._writer = asyncio.get_running_loop().create_task(self._write_loop())
            assert self.wake is not None
            self.wake.set()
            return
        frames = self.proto.data_to_send()
        if not frames:
            return
        target = (ws,)
        for frame in frames:
            broadcast(target, frame, text=True)
        if ws.paused:  # past write_limit now: watched until it drains
            self.server._lagging.add(self)
        server = self.server  # (no delivery_seconds sample: an inline write does not wait)
        server._out_frames += len(frames)
        server._out_bytes += sum(map(len, frames))

    async def _write_loop(self) -> None:
        wake, drained = self.wake, self.drained
        assert wake is not None and drained is not None
        observe = self.server.telemetry.delivery.observe
        clock = asyncio.get_running_loop().time
        try:
            while True:
                await wake.wait()
                woke = clock()
                wake.clear()
                await self._flush()
                observe(clock() - woke)
                drained.set()
        except ConnectionClosed:
            pass
        finally:
            drained.set()  # wake a waiting reader: it sees the writer is done

    async def _flush(self) -> None:
        send = self.ws.send
        self.busy = True
        frames = self.proto.data_to_send()
        try:
            await self.server.backplane.write_log(self.proto.session)  # before the client sees a seq
            for frame in frames:
                await send(frame, text=True)
        finally:
            self.busy = False
            telemetry = self.server.telemetry
            telemetry.frames_out.inc(len(frames))
            telemetry.bytes_out.inc(sum(map(len, frames)))

    async def _route(self, text: str) -> str | None:
        """A hello on a shared backplane: the node that owns its session, if not this one."""
        hello = _hello_of(text)
        return None if hello is None else (await self.server.backplane.route(self, hello)).owner

    async def _tunnel(self, owner: str, hello: str) -> None:
        """Relay this connection to the node that owns its session, until either side ends."""
        backplane = self.server.backplane
        self.tunnel_owner = owner
        try:
            tunnel, inbox = await backplane.open_tunnel(owner)
        except Exception as exc:  # Redis went away right now: the client tries again
            logger.warning("could not open a tunnel to node %s: %r", owner, exc)
            self.close_with = CloseConnection(CloseCode.TRY_AGAIN_LATER, "try again")
            return
        self.tunnel_inbox = inbox
        self.server._lagging.add(self)  # watched for the slow-consumer limit while relayed
        token = token_from_request(self.ws.request.path, self.ws.request.headers.get("Authorization")) if (
            self.ws.request is not None
        ) else None
        backplane.send_to_node(
            owner, {"op": "open", "tunnel": tunnel, "node": backplane.node, "hello": hello, "token": token, "ip": self.ip}
        )
        relay = asyncio.get_running_loop().create_task(self._relay(inbox))
        try:
            while self.close_with is None and not relay.done():
                data = await self.ws.recv()
                if isinstance(data, str):
                    backplane.send_to_node(owner, {"op": "in", "tunnel": tunnel, "text": data})
                else:  # refused there as here (binary_frame); its bytes do not matter
                    backplane.send_to_node(owner, {"op": "in", "tunnel": tunnel, "binary": True})
        finally:
            relay.cancel()
            backplane.send_to_node(owner, {"op": "close", "tunnel": tunnel})
            await backplane.close_tunnel(tunnel)

    def tunnel_backlog(self) -> int:
        """Bytes relayed from the session's node that the client's socket has not taken yet."""
        return self.tunnel_inbox.bytes if self.tunnel_inbox is not None else 0

    async def _relay(self, inbox: Any) -> None:
        """Frames from the owner to the client; a close from the owner closes the connection."""
        while True:
            data = await inbox.get()
            if data[:1] == b"C":
                close = orjson.loads(data[1:])
                self.close_with = CloseConnection(close["code"], close["reason"])
                with contextlib.suppress(ConnectionClosed):
                    await self.ws.close(close["code"], close["reason"])
                return
            for frame in data[1:].split(b"\n"):
                await self.ws.send(frame, text=True)

    def close_lost(self) -> None:
        """The tunnel's owner (or Redis) was lost: close with 1012; the client resumes."""
        self._close_or_abort(CloseCode.SERVICE_RESTART, "session node lost; resume")

    def pending_bytes(self) -> int:
        """Output waiting for this client: the transport's write buffer, the
        encoded frames queued in its session, and ~64 bytes per other frame."""
        transport = self.ws.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        session = self.proto.session
        queued = session.pending_raw_bytes if session is not None else 0
        return buffered + queued + self.tunnel_backlog() + 64 * self.proto.backlog

    def close_slow(self) -> None:
        """A slow consumer: close with 1013 (aborted after close_timeout)."""
        self._close_or_abort(CloseCode.TRY_AGAIN_LATER, "slow consumer")

    def _close_or_abort(self, code: int, reason: str) -> None:
        """Unless closing already: start the closing handshake, and abort the
        transport after close_timeout.

        Where websockets leaks: ``ws.close()`` first waits for the write
        buffer to drain, and only then starts its own close_timeout, so
        against a peer that has stopped reading it never returns and the
        connection (with everything queued for it) stays forever.
        """
        if self.close_with is not None:
            return
        self.close_with = CloseConnection(code, reason)
        loop = asyncio.get_running_loop()
        loop.create_task(self.ws.close(code, reason))
        loop.call_later(self.server.config.close_timeout, self.ws.transport.abort)


class _Tunnelled:
    """A client connected to another node, whose session lives here (Redis backplane).

    The other node relays the client's messages (:meth:`feed`) and the
    frames this side publishes; everything else is what a :class:`_Connection`
    does: one protocol state machine, one writer, the log written before a
    frame leaves.
    """

    busy = True  # channel traffic is queued with the session's frames, never broadcast here
    ws = None

    def __init__(self, server: Server, tunnel: str, node: str, ip: str, identity: Identity | None) -> None:
        self.server = server
        self.tunnel = tunnel
        self.node = node
        self.ip = ip
        self.identity = identity
        self.new_session_id: str | None = None
        self.agent_taken = False
        self.live: _LiveSession | None = None
        self.wake = asyncio.Event()
        self.close_with: CloseConnection | None = None
        self._inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.proto = server._protocol_for(self)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._write_loop())]

    def feed(self, text: str | bytes) -> None:
        self._inbox.put_nowait(text)

    def send_soon(self) -> None:
        self.wake.set()

    async def _read_loop(self) -> None:
        proto, backplane = self.proto, self.server.backplane
        while self.close_with is None:
            text = await self._inbox.get()
            if text is None:
                return
            if isinstance(text, bytes):
                self.close_with = await _carry_out(self, proto.receive_binary(text))
            else:
                hello = _hello_of(text) if proto.state is ConnState.AWAITING_HELLO else None
                if hello is not None:
                    await backplane.claim_agent(self, hello, hello.get("session"))
                self.close_with = await _carry_out(self, proto.receive_text(text))
            if proto.has_output or self.close_with is not None:
                self.wake.set()

    async def _write_loop(self) -> None:
        backplane, proto = self.server.backplane, self.proto
        while True:
            await self.wake.wait()
            self.wake.clear()
            frames = proto.data_to_send()
            await backplane.write_log(proto.session)
            if frames:
                backplane.send_to_tunnel(self.tunnel, b"F" + b"\n".join(frames))
            if self.close_with is not None:
                self._close(self.close_with.code, self.close_with.reason)
                return

    def send_close(self, code: int, reason: str) -> None:
        """Tell the client's node to close the client's connection with ``code``."""
        self.server.backplane.send_to_tunnel(self.tunnel, b"C" + orjson.dumps({"code": code, "reason": reason}))

    def _close(self, code: int, reason: str) -> None:
        self.send_close(code, reason)
        self.server.tunnelled.pop(self.tunnel, None)
        self.stop()

    def take_over(self) -> None:
        """Another connection resumed the session: the client's node closes with 4000."""
        self.proto.release()
        self.live = None
        self._close(CloseCode.SESSION_TAKEN_OVER, "session taken over")

    def stop(self) -> None:
        """The client left (or its node was lost): detach, as a dropped socket does.

        The reader finishes the request it is on (a backplane call cut in the
        middle would leave channel traffic held back) and then stops.
        """
        self.close_with = self.close_with or CloseConnection(CloseCode.GOING_AWAY, "tunnel closed")
        self.proto.release()
        if self.live is not None:
            self.live.detach(self)  # type: ignore[arg-type]
        self._inbox.put_nowait(None)
        self._tasks[1].cancel()  # the writer
