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

from websockets.asyncio.server import Server as _WSServer
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from . import __version__
from .config import ServerConfig
from .auth import ANONYMOUS, Authenticator, ChannelRules, Identity, origin_allowed, token_from_request
from .errors import CloseCode, ErrorCode, ProtocolError
from .hub import NAME_RULE, Hub, valid_name
from .messages import SUBPROTOCOL, Error, Hello, Shutdown, encode
from .protocol import CloseConnection, ConnState, Opened, ServerProtocol
from .providers import Providers, SimulatedProvider
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Telemetry
from .session import (
    MessagingLimits,
    Session,
    StartGeneration,
    StopGeneration,
    TokenBucket,
    TokenBudget,
)
from .static import StaticFiles
from .streams import run_generation

__all__ = ["Server", "default_providers"]

logger = logging.getLogger("wsserver.server")
events = logging.getLogger("wsserver.events")

WS_PATHS = frozenset({"/", "/ws"})
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
        self.hub = Hub(
            deliver=self._deliver,
            history_size=cfg.channel_history,
            history_ttl=cfg.channel_history_ttl,
        )
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
        for live in list(self.sessions.values()):
            live.end("error", (ErrorCode.SHUTDOWN.value, "the server is shutting down"))
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
        for live in list(self.sessions.values()):
            live.end("error", (ErrorCode.SHUTDOWN.value, "the server is shutting down"))
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            for task in stuck:
                logger.warning("stream task %s did not stop in %.0f s", task.get_name(), STOP_GRACE_S)
        await self.providers.aclose()

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
            if path not in WS_PATHS:
                return self._refuse(connection, HTTPStatus.NOT_FOUND, "no WebSocket endpoint here; use /\n", "path")
            return self._admit(connection, request)
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if path == "/readyz":
            if self.draining:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return connection.respond(HTTPStatus.OK, "ready\n")
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

    def _identify(self, hello: Hello, conn: _Connection) -> Identity:
        identity = self._identities.get(conn.ws)  # (kept: a refused hello may be retried)
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

    def _open_session(self, hello: Hello, conn: _Connection) -> Opened:
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
        if hello.agent is not None and hello.agent in self.hub.agents:
            raise ProtocolError(
                ErrorCode.AGENT_NAME_TAKEN,
                f"agent name {hello.agent!r} is held by another session; resume that "
                "session or choose another name",
                ref=hello.id,
            )
        key = identity.id if identity.id != ANONYMOUS else "ip:" + conn.ip
        generate_bucket, token_budget = self._budgets(key)
        session = Session(
            secrets.token_urlsafe(16),  # 128 bits: unguessable
            providers=self.providers,
            max_streams=self.config.max_streams,
            max_log_messages=self.config.replay_max_messages,
            max_log_bytes=self.config.replay_max_bytes,
            coalesce=self.config.coalesce,
            hub=self.hub,
            agent=hello.agent,
            limits=self.limits,
            identity=identity.id,
            rules=identity.rules,
            observer=self.telemetry,
            generate_bucket=generate_bucket,
            token_budget=token_budget,
        )
        if hello.agent is not None:
            self.hub.claim_agent(hello.agent, session)
        live = _LiveSession(self, session)
        self.sessions[session.id] = live
        live.attach(conn)
        return Opened(session, False, before=before)


    def _deliver(self, channel: str, frame: bytes, sessions: list[Session]) -> None:
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
        for session in sessions:
            live = lives.get(session.id)
            conn = live.conn if live is not None else None
            if conn is None or channel in session.paused:
                continue
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
                if conn.close_with is not None or not (conn.busy or conn.ws.paused or conn.proto.has_output):
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
        self.session.paused.update(self.session.subscriptions)
        if self.server.sessions.get(self.session.id) is self:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(self.server.config.session_ttl, self.expire)
        if self.session.has_output:
            self.wake()

    def expire(self) -> None:
        self._expiry = None
        self.end("error", (ErrorCode.EXPIRED.value, "the session expired with no connection attached"))

    def end(self, reason: str, error: tuple[str, str] | None = None) -> None:
        """Stop every stream and forget the session."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.server.sessions.get(self.session.id) is self:
            del self.server.sessions[self.session.id]
        self.apply(self.session.close(reason, error))
        self.server.hub.leave_all(self.session)
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
        "_flush_on_close", "_send_scheduled", "_writer", "busy", "close_with", "drained",
        "ip", "live", "proto", "server", "wake", "ws",
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
        cfg = server.config
        self.proto = ServerProtocol(
            open_session=lambda hello: server._open_session(hello, self),
            welcome=server.welcome,
            message_rate=cfg.message_rate,
            abuse_threshold=max(50, cfg.abuse_threshold) if cfg.abuse_threshold else 0,
        )

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
        if self.close_with is None:
            self.close_with = CloseConnection(CloseCode.SESSION_TAKEN_OVER, "session taken over")
            asyncio.get_running_loop().create_task(
                self.ws.close(CloseCode.SESSION_TAKEN_OVER, "session taken over")
            )

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
            else:
                data = await ws.recv()
            telemetry.bytes_in.inc(len(data))
            if isinstance(data, str):
                actions = proto.receive_text(data)
                telemetry.messages_in.labels(proto.last_type).inc()
            else:
                actions = proto.receive_binary(data)
                telemetry.messages_in.labels("binary").inc()
            for action in actions:
                if type(action) is CloseConnection:
                    self.close_with = action
                    self._flush_on_close = True
                elif self.live is not None:
                    self.live.apply([action])
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
        if self.busy or ws.paused or ws.protocol.state is not State.OPEN:
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
        server = self.server
        server.telemetry.delivery.observe(0.0)
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
            for frame in frames:
                await send(frame, text=True)
        finally:
            self.busy = False
            telemetry = self.server.telemetry
            telemetry.frames_out.inc(len(frames))
            telemetry.bytes_out.inc(sum(map(len, frames)))

    def pending_bytes(self) -> int:
        """Output waiting for this client: the transport's write buffer, the
        encoded frames queued in its session, and ~64 bytes per other frame."""
        transport = self.ws.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        session = self.proto.session
        queued = session.pending_raw_bytes if session is not None else 0
        return buffered + queued + 64 * self.proto.backlog

    def close_slow(self) -> None:
        """A slow consumer: close with 1013 (aborted after close_timeout)."""
        if self.close_with is None:
            self.close_with = CloseConnection(CloseCode.TRY_AGAIN_LATER, "slow consumer")
            asyncio.get_running_loop().create_task(
                self.ws.close(CloseCode.TRY_AGAIN_LATER, "slow consumer")
            )
