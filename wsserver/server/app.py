"""The server: what wires the parts together and runs them.

A :class:`Server` owns the websockets listener, the backplane (memory or
Redis), the live sessions (:mod:`~wsserver.server.sessions`), the open
connections (:mod:`~wsserver.server.connection`), the fan-out of channel
traffic and the slow-consumer watch (:mod:`~wsserver.server.fanout`), plain
HTTP (:mod:`~wsserver.server.http`), the HTTP transport for networks that
refuse WebSockets (:mod:`~wsserver.server.front` routes every TCP connection,
:mod:`~wsserver.server.sse` serves ``/v1/``) and the relayed clients of
other nodes (:mod:`~wsserver.server.tunnelled`). It is also the backplane's
:class:`~wsserver.cluster.backplane.ClusterEvents`: what other nodes cause
here comes in through those methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping
from typing import Any

from websockets.asyncio.server import Server as _WSServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .. import __version__
from ..cluster.backplane import LOCAL, AdoptedSession, Backplane, Route
from ..cluster.memory import MemoryBackplane
from ..cluster.tunnel import TunnelEnd
from ..config import ServerConfig
from ..core.limits import ChannelRules
from ..core.protocol import Opened, ServerProtocol
from ..core.session import Session
from ..providers import Providers, SimulatedProvider
from ..wire.codec import encode
from ..wire.errors import CloseCode, ErrorCode, ProtocolError
from ..wire.messages import SUPPORTED_PROTOCOLS, Hello, Shutdown, decode_client
from .auth import Authenticator, Identity
from .connection import Connection, hello_of
from .fanout import Fanout
from .gcpace import GcPacer
from .http import ECHO_PATH, HttpFront
from .metrics import Telemetry
from .runtime import Attachable
from .sessions import Sessions
from .sse import HttpTransport, SseConnection
from .tunnelled import TunnelledConnections

__all__ = ["Server", "default_providers"]

logger = logging.getLogger("wsserver.server")
events = logging.getLogger("wsserver.events")

#: Connections the kernel may hold for accept() (it caps this at
#: net.core.somaxconn). asyncio's default, 100, overflowed under bursts of new
#: connections while the event loop was busy: each dropped SYN costs its
#: client a retransmission 1 s later.
LISTEN_BACKLOG = 1024

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
    from ..providers.setup import ProviderSettings, real_providers

    simulated = SimulatedProvider(
        tokens_per_s=config.sim_tokens_per_s,
        ttft_ms=config.sim_ttft_ms,
        default_model=config.model if config.provider == "simulated" and config.model else "sim-1",
    )
    real, unconfigured = real_providers(ProviderSettings.of(config), environ)
    providers = Providers([simulated, *real], default=config.provider, unconfigured=unconfigured)
    if config.provider not in providers.names:
        logger.warning(
            "default provider %r is not available (%s); generate requests without a provider will fail",
            config.provider,
            unconfigured.get(config.provider) or f"available: {', '.join(providers.names)}",
        )
    return providers


def create_backplane(config: ServerConfig) -> Backplane:
    """The backplane ``config`` asks for (Redis when ``redis_url`` is set)."""
    if config.redis_url:
        from ..cluster.redis import RedisBackplane

        return RedisBackplane(
            config.redis_url,
            node_id=config.node_id,
            node_timeout=config.node_timeout,
            history_size=config.channel_history,
            history_ttl=config.channel_history_ttl,
            history_bytes=config.channel_history_bytes,
            history_bytes_per_publisher=config.channel_history_bytes_per_identity,
            inbox_messages=config.inbox_messages,
            inbox_bytes=config.inbox_bytes,
        )
    return MemoryBackplane(
        history_size=config.channel_history,
        history_ttl=config.channel_history_ttl,
        history_bytes=config.channel_history_bytes,
        history_bytes_per_publisher=config.channel_history_bytes_per_identity,
    )


class Server:
    """A wsserver instance.

    Use as ``async with Server(config) as server: await server.serve_forever()``,
    or ``await server.start()`` / ``await server.close()``. ``server.port`` is
    the bound port (useful with ``port=0``).
    """

    def __init__(self, config: ServerConfig | None = None, *, providers: Providers | None = None) -> None:
        self.config = cfg = config or ServerConfig()
        self.providers = providers or default_providers(cfg)
        self._ws_server: _WSServer | None = None
        self.connections: set[Connection] = set()
        self.backplane = create_backplane(cfg)
        self.sessions = Sessions(self)
        self.tunnels = TunnelledConnections(self)
        self.fanout = Fanout(self)
        self.http = HttpFront(self)
        #: The HTTP transport's open streams (``GET /v1/events``).
        self.sse = HttpTransport(self)
        #: Counters for operators (also exported as metrics).
        self.stats = {"slow_consumer_disconnects": 0}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.auth = Authenticator(
            api_keys=cfg.api_keys,
            jwt_secret=cfg.jwt_secret,
            rules=ChannelRules(tuple(cfg.channel_subscribe), tuple(cfg.channel_publish)),
        )
        self.telemetry = Telemetry(log_content=cfg.log_content)
        self.telemetry.bind(self.sessions.counts)
        self.telemetry.bind_backplane(self.backplane)
        #: Runs the garbage collector from the event loop (``--gc paced``).
        self.gc_pacer = GcPacer(self.open_connections) if cfg.gc == "paced" else None
        self.telemetry.bind_gc(self.gc_pacer)
        self.draining = False
        self.welcome = {
            "heartbeat_ms": cfg.heartbeat_ms,
            "limits": {
                "max_streams": cfg.max_streams,
                "max_message_bytes": cfg.max_size,
                "max_id_length": 64,
                "max_subscriptions": cfg.max_subscriptions,
                "max_data_bytes": cfg.max_data_bytes,
                "max_stream_bytes": cfg.max_stream_bytes,
            },
            "server": f"wsserver/{__version__}",
        }

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task of the server's own, kept referenced until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        cfg = self.config
        await self.backplane.start(self)
        self._ws_server = await serve(
            self._handle,
            cfg.host,
            cfg.port,
            process_request=self.http.process_request,
            compression="deflate" if cfg.compression else None,
            max_size=cfg.max_size,
            max_queue=cfg.max_queue,
            write_limit=cfg.write_limit,
            ping_interval=cfg.ping_interval or None,
            ping_timeout=cfg.ping_timeout or None,
            close_timeout=cfg.close_timeout,
            open_timeout=cfg.open_timeout,
            server_header=f"wsserver/{__version__}",
            # every TCP connection starts at a Front: /v1/ is the HTTP transport, the rest websockets'
            create_connection=self.sse.front,  # type: ignore[arg-type]
            reuse_port=cfg.reuse_port or None,
            backlog=LISTEN_BACKLOG,
        )
        self.spawn(self.fanout.watch())
        self.telemetry.gc.install()
        if self.gc_pacer is not None:
            self.gc_pacer.start()
        logger.info("listening on ws://%s:%d/", cfg.host, self.port)

    @property
    def port(self) -> int:
        assert self._ws_server is not None, "server not started"
        return self._ws_server.sockets[0].getsockname()[1]  # type: ignore[no-any-return]

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/"

    def open_connections(self) -> int:
        """WebSocket connections and HTTP-transport streams open now."""
        return len(self.connections) + len(self.sse)

    @property
    def accepting(self) -> bool:
        """Started, and not draining."""
        return self._ws_server is not None and not self.draining

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
        self.sse.shutdown(notice)
        deadline = loop.time() + timeout
        while loop.time() < deadline and any(live.tasks for live in self.sessions.running()):
            await asyncio.sleep(0.05)  # (runs that wait for tool results need no time to finish)
        self._end_all()
        flushed = loop.time() + 1.0  # let the writers send those stream.end frames
        while loop.time() < flushed and any(c.proto.backlog or c.busy for c in self.connections):
            await asyncio.sleep(0.01)
        self.sse.close_all(CloseCode.GOING_AWAY, "server shutdown")
        closing = [
            loop.create_task(conn.ws.close(CloseCode.GOING_AWAY, "server shutdown")) for conn in list(self.connections)
        ]
        if closing:
            await asyncio.wait(closing, timeout=cfg.close_timeout + 1)
        await self.close()

    async def close(self) -> None:
        """Close every connection (1001) and stop listening."""
        if self._ws_server is None:
            return
        for task in list(self._tasks):
            task.cancel()
        self.sse.close_all(CloseCode.GOING_AWAY, "server shutdown")
        self.telemetry.gc.remove()
        if self.gc_pacer is not None:
            self.gc_pacer.stop()
        self._ws_server.close()
        await self._ws_server.wait_closed()
        self._ws_server = None
        tasks = [t for live in self.sessions.running() for t in live.tasks.values()]
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
        self.sessions.end_all(forget=not self.backplane.shared)

    async def serve_forever(self) -> None:
        assert self._ws_server is not None, "server not started"
        await self._ws_server.serve_forever()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        if self.config.conformance_echo and request is not None and request.path.split("?", 1)[0] == ECHO_PATH:
            await _echo(ws)
            return
        conn = Connection(self, ws, self.http.handshake_identity(ws))
        ip = conn.ip
        self.connections.add(conn)
        self.http.opened(ip)
        self.telemetry.connections_open.inc()
        events.info("connection open", extra={"event": "connection.open", "ip": ip})
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.fanout.lagging.discard(conn)
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
            self.http.closed(ip)

    def identify(self, hello: Hello, identity: Identity | None) -> Identity:
        """Who a ``hello`` speaks for: the handshake's identity, else its token's;
        without authentication everybody is anonymous."""
        if identity is not None:  # from the handshake (kept: a refused hello may be retried)
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

    async def route_hello(self, text: str, identity: Identity | None) -> Route | None:
        """Where a connection's first frame goes on a shared backplane, if it is
        a ``hello``: to another node (``connect``: relay it there), or here
        with what the backplane reserved for it (its agent name claimed only
        by a hello :meth:`hello_admitted` lets in). None: not a hello."""
        hello = hello_of(text)
        if hello is None:
            return None
        route = await self.backplane.route(hello)
        if route.connect is None and self.hello_admitted(text, identity):
            route = await self.backplane.reserve_agent(hello)
        return route

    def hello_admitted(self, text: str, identity: Identity | None) -> bool:
        """Whether a connection's first frame is a hello the protocol will let
        in: valid, of a supported protocol, authenticated. Only such a hello
        may claim its agent name on a shared backplane, so refused hellos
        lock no name out (the protocol answers them as usual)."""
        try:
            hello = decode_client(text)
        except ProtocolError:
            return False
        if not isinstance(hello, Hello) or hello.protocol not in SUPPORTED_PROTOCOLS:
            return False
        try:
            self.identify(hello, identity)
        except ProtocolError:
            return False
        return True

    def protocol_for(self, conn: Attachable) -> ServerProtocol:
        """The protocol state machine of a new connection (or tunnel) ``conn``."""
        cfg = self.config

        def open_session(hello: Hello) -> Opened:
            opened = self.sessions.open(hello, conn, conn.reserved)
            conn.reserved = LOCAL
            return opened

        return ServerProtocol(
            open_session=open_session,
            welcome=self.welcome,
            message_rate=cfg.message_rate,
            abuse_threshold=max(50, cfg.abuse_threshold) if cfg.abuse_threshold else 0,
        )

    # --------------------------------------- ClusterEvents (the backplane's)

    def local_session(self, session_id: str) -> Session | None:
        live = self.sessions.get(session_id)
        return live.session if live is not None else None

    def local_sessions(self) -> list[Session]:
        return [live.session for live in self.sessions.values()]  # (parked ones are woken)

    def local_session_ids(self) -> list[str]:
        return list(self.sessions)

    def adopt(self, adopted: AdoptedSession) -> Session:
        return self.sessions.adopt(adopted)

    def fence_session(self, session_id: str) -> None:
        """Another node adopted this session (this one was declared lost): drop
        it here without touching the backplane; its client gets 1012 and
        resumes on the adopting node."""
        conn = self.sessions.fence(session_id)
        if isinstance(conn, (Connection, SseConnection)):
            conn.close_lost()
        elif conn is not None:
            self.tunnels.close(conn.end.id, code=CloseCode.SERVICE_RESTART)  # type: ignore[attr-defined]

    def node_lost(self, node: str | None) -> None:
        """``node`` stopped (``None``: Redis is unreachable, so every node is out
        of reach): end the tunnels to it, whose clients reconnect and resume on
        the node that adopts its sessions, and those from it."""
        for conn in [*self.connections, *self.sse.connections.values()]:
            if conn.tunnel is not None and node in (None, conn.tunnel.owner):
                conn.close_lost()
        self.tunnels.node_lost(node)

    def tunnel_opened(self, end: TunnelEnd, hello: str, token: str | None, ip: str) -> None:
        self.tunnels.open(end, hello, token, ip)

    def tunnel_input(self, tunnel: str, data: str | bytes) -> None:
        self.tunnels.input(tunnel, data)

    def tunnel_closed(self, tunnel: str) -> None:
        self.tunnels.close(tunnel)

    def tunnel_peers(self) -> set[str]:
        return self.tunnels.peers()

    def deliveries_pending(self) -> None:
        self.fanout.pending()

    def call_result(self, session_id: str, stream_id: str, call_id: str, content: Any, sender: str) -> None:
        live = self.sessions.get(session_id)
        if live is not None:  # (ended meanwhile: the run is gone, the answer with it)
            live.session.routed_result(stream_id, call_id, content, sender)


async def _echo(ws: ServerConnection) -> None:
    """The ``conformance_echo`` route: send every message back as it came."""
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            await ws.send(message)
