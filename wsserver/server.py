"""The WebSocket transport: a thin pump around the sans-I/O protocol core.

Per connection there are two tasks and one task per running stream:

* the *reader* (the websockets handler) feeds text frames into
  :class:`~wsserver.protocol.ServerProtocol` and carries out the actions it
  returns (start or stop a generation, close the connection);
* the *writer* sleeps on an event, takes every pending frame from the
  protocol (sequenced and, when the socket lags, coalesced there) and sends
  them in order. A single writer is what keeps frames in ``seq`` order, since
  several stream tasks produce output concurrently;
* each generation runs :func:`~wsserver.streams.run_generation`.

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
from http import HTTPStatus
from importlib import resources
from typing import Any

from websockets.asyncio.server import Server as _WSServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import __version__
from .config import ServerConfig
from .errors import CloseCode
from .messages import SUBPROTOCOL, Hello
from .protocol import CloseConnection, ConnState, ServerProtocol
from .providers import Providers, SimulatedProvider
from .session import Session, StartGeneration, StopGeneration
from .streams import run_generation

__all__ = ["Server", "default_providers"]

logger = logging.getLogger("wsserver.server")

WS_PATHS = frozenset({"/", "/ws"})
#: Frames waiting for the writer beyond which the reader stops reading the
#: client's requests until the writer has caught up. A client that sends
#: requests but never reads the answers thus meets TCP backpressure instead
#: of growing the server's memory.
MAX_BACKLOG = 1024
#: How long a cancelled generation may take to clean up when its connection
#: closes (providers close their upstream response in that time).
STOP_GRACE_S = 5.0


def default_providers(config: ServerConfig) -> Providers:
    """The providers a server offers out of the box."""
    simulated = SimulatedProvider(
        tokens_per_s=config.sim_tokens_per_s,
        ttft_ms=config.sim_ttft_ms,
        default_model=config.model if config.provider == "simulated" and config.model else "sim-1",
    )
    return Providers([simulated], default=config.provider)


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
        self.welcome = {
            "heartbeat_ms": self.config.heartbeat_ms,
            "limits": {
                "max_streams": self.config.max_streams,
                "max_message_bytes": self.config.max_size,
                "max_id_length": 64,
            },
            "server": f"wsserver/{__version__}",
        }
        self._page = resources.files("wsserver").joinpath("static/index.html").read_bytes()

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
        self._ws_server.close()
        await self._ws_server.wait_closed()
        self._ws_server = None
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
        if path == "/":
            headers = Headers(
                [
                    ("Content-Type", "text/html; charset=utf-8"),
                    ("Content-Length", str(len(self._page))),
                    ("Cache-Control", "no-cache"),
                ]
            )
            return Response(200, "OK", headers, self._page)
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    # ------------------------------------------------------------ WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Connection(self, ws)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    def _new_session(self, hello: Hello, on_output: Any) -> tuple[Session, bool]:
        # Resume arrives with session persistence; until then every hello,
        # with or without `session`, opens a fresh session (resumed: false).
        session = Session(
            secrets.token_urlsafe(16),
            providers=self.providers,
            max_streams=self.config.max_streams,
            coalesce=self.config.coalesce,
            on_output=on_output,
        )
        return session, False


class _Connection:
    """The pump of one WebSocket connection."""

    def __init__(self, server: Server, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()  # set each time the writer finished a batch
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.close_with: CloseConnection | None = None
        self._writer: asyncio.Task[None] | None = None
        self.proto = ServerProtocol(
            open_session=lambda hello: server._new_session(hello, self.wake.set),
            welcome=server.welcome,
        )

    async def run(self) -> None:
        writer = self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            self._apply(self.proto.close())
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            await self._await_streams()
        if self.close_with is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._flush()
                await self.ws.close(self.close_with.code, self.close_with.reason)

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
            if actions:
                self._apply(actions)
            if proto.has_output:
                self.wake.set()
                while proto.backlog >= MAX_BACKLOG and not writer.done():
                    self.drained.clear()
                    await self.drained.wait()

    def _apply(self, actions: list[Any]) -> None:
        for action in actions:
            if type(action) is StartGeneration:
                stream = action.stream
                session = self.proto.session
                assert session is not None
                task = asyncio.get_running_loop().create_task(
                    run_generation(session, stream, self.server.providers[stream.provider]),
                    name=f"stream:{stream.id}",
                )
                self.tasks[stream.id] = task
                task.add_done_callback(lambda _t, sid=stream.id: self.tasks.pop(sid, None))
            elif type(action) is StopGeneration:
                task = self.tasks.get(action.stream_id)
                if task is not None:
                    task.cancel()
            elif type(action) is CloseConnection:
                self.close_with = action

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

    async def _await_streams(self) -> None:
        tasks = list(self.tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
        for task in pending:
            logger.warning("stream task %s did not stop within %.0f s", task.get_name(), STOP_GRACE_S)

    async def _flush(self) -> None:
        send = self.ws.send
        for frame in self.proto.data_to_send():
            await send(frame, text=True)
