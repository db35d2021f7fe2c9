"""The WebSocket transport: a thin pump around the sans-I/O protocol core.

Per connection there are two tasks and one task per running stream:

* the *reader* (the websockets handler) feeds text frames into
  :class:`~wsserver.protocol.ServerProtocol` and carries out the actions it
  returns (start or stop a generation, close the connection);
* the *writer* sleeps on an event, takes every pending frame from the
  protocol (sequenced and, when the socket lags, coalesced there) and sends
  them in order. A single writer is what keeps frames in ``seq`` order, since
  several stream tasks produce output concurrently;
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
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server as _WSServer
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import __version__
from .config import ServerConfig
from .errors import CloseCode, ErrorCode, ProtocolError
from .hub import Hub, valid_name
from .messages import SUBPROTOCOL, Error, Hello, encode
from .protocol import CloseConnection, ConnState, Opened, ServerProtocol
from .providers import Providers, SimulatedProvider
from .session import MessagingLimits, Session, StartGeneration, StopGeneration
from .static import StaticFiles
from .streams import run_generation

__all__ = ["Server", "default_providers"]

logger = logging.getLogger("wsserver.server")

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
        #: Counters for operators (exported as metrics by the hardening work).
        self.stats = {"slow_consumer_disconnects": 0}
        self._monitor: asyncio.Task[None] | None = None
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

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if path in WS_PATHS:
                return None
            return connection.respond(HTTPStatus.NOT_FOUND, "no WebSocket endpoint here; use /\n")
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
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

    # ------------------------------------------------------------ WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Connection(self, ws)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    def _open_session(self, hello: Hello, conn: _Connection) -> Opened:
        """Resume the session ``hello`` names if possible, else open a fresh one."""
        before: list[bytes] = []
        if hello.agent is not None and not valid_name(hello.agent):
            raise ProtocolError(
                ErrorCode.BAD_NAME,
                "an agent name is 1 to 128 characters of A-Z a-z 0-9 _ . : -",
                field="agent",
                ref=hello.id,
            )
        live = self.sessions.get(hello.session) if hello.session else None
        if live is not None:
            live.attach(conn)  # takes the session over from another connection
            session = live.session
            session.take_output()  # sequence what is pending: the replay covers it
            if hello.snapshot:
                session.snapshot()
                return Opened(session, True)
            replay = session.replay_after(hello.last_seq or 0)
            if replay is not None:
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
            live.detach(conn)
            live.end("cancelled")
        if hello.agent is not None and hello.agent in self.hub.agents:
            raise ProtocolError(
                ErrorCode.AGENT_NAME_TAKEN,
                f"agent name {hello.agent!r} is held by another session; resume that "
                "session or choose another name",
                ref=hello.id,
            )
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
            if conn.busy or session.has_output:
                session.emit_unsequenced(frame)
            else:
                direct.append(conn.ws)
        if direct:
            broadcast(direct, frame, text=True)

    async def _watch(self) -> None:
        """Every 0.25 s: close slow consumers (1013) and forget idle channels."""
        limit = self.config.slow_consumer_bytes
        while True:
            await asyncio.sleep(0.25)
            for conn in list(self.connections):
                if conn.pending_bytes() > limit:
                    self.stats["slow_consumer_disconnects"] += 1
                    logger.warning("closing a slow consumer (1013): %d bytes waiting", conn.pending_bytes())
                    conn.close_slow()
            self.hub.sweep()


class _LiveSession:
    """A session at run time: its generation tasks, its connection, its expiry.

    The session outlives its connection: while detached its streams go on and
    their frames are sequenced straight into the replay log; ``session_ttl``
    after the last detach the session ends (streams stopped with
    ``error expired``, upstreams closed) and its memory is released.
    """

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
            conn.wake.set()
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

    def __init__(self, server: Server, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()  # set each time the writer finished a batch
        self.close_with: CloseConnection | None = None
        self.live: _LiveSession | None = None
        self.busy = False  # the writer is sending a batch
        self._flush_on_close = False
        self._writer: asyncio.Task[None] | None = None
        self.proto = ServerProtocol(
            open_session=lambda hello: server._open_session(hello, self),
            welcome=server.welcome,
        )

    async def run(self) -> None:
        writer = self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            if self._flush_on_close:  # a violation: send the error first
                with contextlib.suppress(ConnectionClosed):
                    writer.cancel()
                    await self._flush()
            self.proto.release()
            if self.live is not None:
                self.live.detach(self)  # a dropped socket never cancels anything
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if self.close_with is not None:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.close(self.close_with.code, self.close_with.reason)

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
        ws, proto, writer = self.ws, self.proto, self._writer
        assert writer is not None
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
            if isinstance(data, str):
                actions = proto.receive_text(data)
            else:
                actions = proto.receive_binary(data)
            for action in actions:
                if type(action) is CloseConnection:
                    self.close_with = action
                    self._flush_on_close = True
                elif self.live is not None:
                    self.live.apply([action])
            if proto.has_output:
                self.wake.set()
                while proto.backlog >= MAX_BACKLOG and not writer.done():
                    self.drained.clear()
                    await self.drained.wait()

    async def _write_loop(self) -> None:
        wake, drained = self.wake, self.drained
        try:
            while True:
                await wake.wait()
                wake.clear()
                await self._flush()
                drained.set()
        except ConnectionClosed:
            pass
        finally:
            drained.set()  # wake a waiting reader: it sees the writer is done

    async def _flush(self) -> None:
        send = self.ws.send
        self.busy = True
        try:
            for frame in self.proto.data_to_send():
                await send(frame, text=True)
        finally:
            self.busy = False

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
