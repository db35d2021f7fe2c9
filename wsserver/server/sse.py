"""The HTTP transport: the WebSocket protocol over Server-Sent Events and POST.

For networks whose proxies refuse the WebSocket upgrade (PROTOCOL.md
section "HTTP transport"):

* ``GET /v1/events`` answers ``text/event-stream``. Its first event is
  ``event: connection`` with ``{"connection": TOKEN}``; every later event is
  one server frame, byte for byte the WebSocket's text frame, with ``id:`` =
  its ``seq`` when it has one. A close is an ``event: close`` with
  ``{"code", "reason"}`` (the WebSocket close code), then the response ends.
  Heartbeats are SSE comments. ``?session=S`` with a ``Last-Event-ID``
  header says ``hello {session: S, last_seq: Last-Event-ID}`` itself.
* ``POST /v1/send?connection=TOKEN`` carries client frames (one JSON object
  or an array of them) to that stream's connection and answers at once
  (202); what they cause goes out on the stream, in ``seq`` order.

:class:`SseConnection` is a connection kind beside
:class:`~wsserver.server.connection.Connection` (a WebSocket) and
:class:`~wsserver.server.tunnelled.TunnelledConnection`: the same
:class:`~wsserver.core.protocol.ServerProtocol`, attached to sessions by
:mod:`~wsserver.server.sessions`, so resume, snapshot, replay, cancel,
steer, channels, direct messages and takeover behave as on a socket. A
``hello`` for a session another node owns is relayed through a tunnel, as a
WebSocket's is. The same admission (:meth:`HttpFront.admission`), the same
per-connection rate limits (in the protocol) and the same slow-consumer
limit (the stream closes with ``event: close`` 1013; the client resumes).

Where this layer leaks: POSTs are answered on enqueue, so a client must not
have two POSTs of one connection in flight at once if their order matters
(the clients send one at a time and batch what waits). A connection token
is valid while its stream is open, on the node that holds the stream: a
load balancer must send a connection's POSTs where its GET went.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING

import orjson

from ..cluster.backplane import LOCAL, Route
from ..core.actions import CloseConnection
from ..core.protocol import ConnState
from ..wire.codec import TunnelClose, encode, seq_of
from ..wire.errors import CloseCode, ErrorCode
from ..wire.messages import Error
from .auth import origin_allowed, token_from_request
from .connection import WebSocket
from .front import Front, HttpError, HttpRequest, response_head
from .http import Refusal
from .runtime import SessionRuntime, carry_out

if TYPE_CHECKING:
    from websockets.server import ServerProtocol as WsProtocol

    from ..cluster.tunnel import Tunnel
    from .app import Server
    from .auth import Identity

__all__ = ["EVENTS_PATH", "SEND_PATH", "HttpTransport", "SseConnection", "sse_chunk"]

logger = logging.getLogger("wsserver.server")

EVENTS_PATH = "/v1/events"
SEND_PATH = "/v1/send"
#: Client frames posted but not yet read by the connection beyond which a POST waits.
MAX_INBOX = 256
_HEARTBEAT = b"3\r\n:\n\n\r\n"  # an SSE comment, as one chunk
_END = b"0\r\n\r\n"
_STATUS_CODES = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN, 503: ErrorCode.UNAVAILABLE}


def sse_chunk(frames: list[bytes]) -> bytes:
    """Frames as SSE events (``id:`` = seq where there is one), in one HTTP chunk."""
    parts = []
    for frame in frames:
        seq = seq_of(frame)
        parts.append(b"data: " if seq is None else b"id: %d\ndata: " % seq)
        parts.append(frame)
        parts.append(b"\n\n")
    body = b"".join(parts)
    return b"%x\r\n%b\r\n" % (len(body), body)


def _event(name: str, data: dict[str, object]) -> bytes:
    body = b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(body), body)


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    """A refused request's JSON body: an ``error`` frame without ``seq``."""
    return encode(Error(code=code, message=message, field=field))


class SseConnection:
    """One ``GET /v1/events`` stream and the POSTs that feed it."""

    busy = True  # channel traffic is queued with the session's frames (fanout), never broadcast
    ws = None

    def __init__(
        self, server: Server, front: Front, identity: Identity | None, origin: str | None, credential: str | None
    ) -> None:
        self.server = server
        self.front = front
        self.token = secrets.token_urlsafe(16)  # 128 bits: unguessable
        self.ip = front.ip
        #: Who the stream's credential proved to be (None: the hello's token decides).
        self.identity = identity
        self.origin = origin
        self.credential = credential
        self.reserved: Route = LOCAL
        self.live: SessionRuntime | None = None
        self.tunnel: Tunnel | None = None
        self.close_with: CloseConnection | None = None
        self.wake = asyncio.Event()
        self._scheduled = False
        self._inbox: deque[str] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._done = False
        self._written = True
        self._beat: asyncio.TimerHandle | None = None
        self._relay: asyncio.Task[None] | None = None
        self.proto = server.protocol_for(self)
        front.on_writable = self.wake.set
        front.on_lost = self.wake.set

    # ------------------------------------------------------------------ input

    async def accept(self, texts: list[str]) -> bool:
        """Frames from a POST, in order; waits while too many are unread. False once closed."""
        while len(self._inbox) >= MAX_INBOX and not self._done:
            self._room.clear()
            await self._room.wait()
        if self._done or self.close_with is not None:
            return False
        self._inbox.extend(texts)
        self._arrived.set()
        return True

    async def _next(self, deadline: float | None) -> str | None:
        while not self._inbox:
            if self._done:
                return None
            self._arrived.clear()
            if deadline is None:
                await self._arrived.wait()
            else:
                async with asyncio.timeout_at(deadline):
                    await self._arrived.wait()
        text = self._inbox.popleft()
        if len(self._inbox) < MAX_INBOX // 2:
            self._room.set()
        return text

    async def _read_loop(self) -> None:
        proto, server = self.proto, self.server
        telemetry = server.telemetry
        deadline = asyncio.get_running_loop().time() + server.config.hello_timeout
        while self.close_with is None:
            awaiting = proto.state is ConnState.AWAITING_HELLO and self.tunnel is None
            try:
                text = await self._next(deadline if awaiting else None)
            except TimeoutError:
                self.close(CloseCode.HELLO_TIMEOUT, "no hello in time")
                return
            if text is None:
                return
            if self.tunnel is not None:
                self.tunnel.send_text(text)
                continue
            telemetry.bytes_in.inc(len(text))
            if awaiting and server.backplane.shared:
                route = await server.route_hello(text, self.identity)
                if route is not None:
                    if route.connect is not None:
                        await self._open_tunnel(route, text)
                        continue
                    self.reserved = route
            actions = proto.receive_text(text)
            telemetry.messages_in.labels(proto.last_type).inc()
            close = await carry_out(self, actions)
            if close is not None:
                self.close_with = close
                self.wake.set()  # the writer sends what is queued, then the close
            elif proto.has_output:
                self.send_soon()

    # ----------------------------------------------------------------- output

    def send_soon(self) -> None:
        """Output is pending: write it at the end of this loop turn (as
        :meth:`Connection.send_soon`), with whatever else the turn produces."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_now)

    def _send_now(self) -> None:
        """Write inline when the transport takes data and nothing must be
        written to the backplane first; else the writer task does it."""
        self._scheduled = False
        session = self.proto.session
        front = self.front
        if (
            self.close_with is not None or front.closed or not front.writable.is_set()
            or (session is not None and session.out.journal is not None)
        ):
            self.wake.set()
            return
        frames = self.proto.data_to_send()
        if frames:
            front.write(sse_chunk(frames))
            self._written = True
            self.server.fanout.count(frames)

    async def run(self) -> None:
        """Serve the stream until it closes (either side)."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read_loop())
        self._schedule_beat()
        try:
            await self._write_loop()
        finally:
            self._done = True
            self._arrived.set()
            self._room.set()
            if self._beat is not None:
                self._beat.cancel()
            self.proto.release()
            if self.live is not None:
                self.live.detach(self)  # a dropped stream never cancels anything
            if self._relay is not None:
                self._relay.cancel()
            if self.tunnel is not None:
                await self.tunnel.close()
            await asyncio.wait([reader])  # it finishes the request it is on, then stops

    async def _write_loop(self) -> None:
        front, proto = self.front, self.proto
        backplane = self.server.backplane
        telemetry = self.server.telemetry
        while True:
            await self.wake.wait()
            self.wake.clear()
            if front.closed:
                return
            if not front.writable.is_set():
                self.server.fanout.lagging.add(self)  # watched for the slow-consumer limit
                if self.close_with is None:
                    continue  # resume_writing wakes this loop again
            frames = proto.data_to_send()
            if frames:
                await backplane.write_log(proto.session)  # before the client sees a seq
                front.write(sse_chunk(frames))
                self._written = True
                telemetry.frames_out.inc(len(frames))
            if self.close_with is not None:
                self._finish(self.close_with.code, self.close_with.reason)
                return

    def _finish(self, code: int, reason: str) -> None:
        """Tell the client how the connection closed, end the response, close."""
        front = self.front
        front.write(_event("close", {"code": code, "reason": reason}) + _END)
        front.close()
        asyncio.get_running_loop().call_later(self.server.config.close_timeout, front.abort)

    def _schedule_beat(self) -> None:
        interval = self.server.config.ping_interval
        if interval > 0:
            self._beat = asyncio.get_running_loop().call_later(interval, self._heartbeat)

    def _heartbeat(self) -> None:
        """An SSE comment when nothing else was written for a heartbeat interval."""
        if not self._written and not self.front.closed:
            self.front.write(_HEARTBEAT)
        self._written = False
        self._schedule_beat()

    # ---------------------------------------------------------------- closing

    def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (an ``event: close``) once what is queued is written."""
        if self.close_with is None:
            self.close_with = CloseConnection(code, reason)
        self.wake.set()

    def take_over(self) -> None:
        """Another connection resumed this one's session: close with 4000."""
        self.proto.release()
        self.live = None
        self.close(CloseCode.SESSION_TAKEN_OVER, "session taken over")

    def close_lost(self) -> None:
        """The session's node was lost: close with 1012; the client resumes."""
        self.close(CloseCode.SERVICE_RESTART, "session node lost; resume")

    def close_slow(self) -> None:
        """A slow consumer: close with 1013 (aborted after close_timeout)."""
        self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer")

    def shutdown(self, notice: bytes) -> None:
        """The server drains: ``shutdown`` in order with the rest."""
        self.proto.send_unsequenced(notice)
        self.wake.set()

    # -------------------------------------------------------- slow consumers

    def pending_bytes(self) -> int:
        """Output waiting for this client (as :meth:`Connection.pending_bytes`)."""
        session = self.proto.session
        queued = session.out.pending_raw_bytes if session is not None else 0
        relayed = self.tunnel.backlog if self.tunnel is not None else 0
        return self.front.write_buffer_size() + queued + relayed + 64 * self.proto.backlog

    def lagging(self) -> bool:
        return self.close_with is None and (
            not self.front.writable.is_set() or self.proto.has_output or self.tunnel is not None
        )

    # ------------------------------------------------------------- relayed

    async def _open_tunnel(self, route: Route, hello: str) -> None:
        """Relay this connection to the node that owns its session."""
        assert route.connect is not None
        try:
            tunnel = await route.connect()
        except Exception as exc:  # Redis went away right now: the client tries again
            logger.warning("could not open a tunnel to node %s: %r", route.owner, exc)
            self.close(CloseCode.TRY_AGAIN_LATER, "try again")
            return
        self.tunnel = tunnel
        self.server.fanout.lagging.add(self)
        tunnel.open(hello, self.credential, self.ip)
        self._relay = asyncio.get_running_loop().create_task(self._relay_loop(tunnel))

    async def _relay_loop(self, tunnel: Tunnel) -> None:
        front = self.front
        while True:
            received = await tunnel.receive()
            if isinstance(received, TunnelClose):
                self.close(received.code, received.reason)
                return
            await front.drain()
            front.write(sse_chunk(received))
            self._written = True


class HttpTransport:
    """Serves ``/v1/…`` (the :class:`~wsserver.server.front.Routes` of every Front)."""

    def __init__(self, server: Server) -> None:
        self._server = server
        cfg = server.config
        self.open_timeout = cfg.open_timeout
        self.max_body = cfg.max_size
        self.write_limit = cfg.write_limit
        #: Open streams by connection token.
        self.connections: dict[str, SseConnection] = {}

    def __len__(self) -> int:
        return len(self.connections)

    def front(self, protocol: WsProtocol, ws_server: object, **kwargs: object) -> Front:
        """``serve(create_connection=…)``: a Front that makes websockets' connection
        (a :class:`~wsserver.server.connection.WebSocket`, which picks the
        subprotocol itself) only if it needs one."""
        return Front(self, lambda: WebSocket(protocol, ws_server, **kwargs))  # type: ignore[arg-type]

    # ---------------------------------------------------------------- answers

    def _cors(self, request: HttpRequest) -> list[tuple[str, str]]:
        """An allowed page of another origin may read the answer."""
        headers = request.headers
        origin = headers.get("Origin")
        if origin is None or not origin_allowed(origin, headers.get("Host"), self._server.config.allowed_origins):
            return []
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]

    def _answer(self, front: Front, request: HttpRequest | None, status: int, body: bytes, *, close: bool) -> None:
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        if request is not None:
            headers += self._cors(request)
        if close:
            headers.append(("Connection", "close"))
        front.write(response_head(status, headers) + body)

    def _error(self, front: Front, request: HttpRequest | None, status: int, code: str, message: str,
               field: str | None = None, *, close: bool = False) -> bool:
        self._answer(front, request, status, error_body(code, message, field), close=close)
        return not close

    def refused(self, front: Front, error: HttpError) -> None:
        self._error(front, None, error.status, error.code, error.message, close=True)

    async def handle(self, front: Front, request: HttpRequest, body: bytes) -> bool:
        path, method = request.path, request.method
        if path not in (EVENTS_PATH, SEND_PATH):
            return self._error(front, request, 404, ErrorCode.BAD_REQUEST, f"no such endpoint: {path}")
        if method == "OPTIONS":
            return self._preflight(front, request)
        if path == EVENTS_PATH and method == "GET":
            await self._events(front, request)
            return False
        if path == SEND_PATH and method == "POST":
            return await self._send(front, request, body)
        allowed = "GET" if path == EVENTS_PATH else "POST"
        front.write(response_head(405, [("Allow", f"{allowed}, OPTIONS"), ("Content-Length", "0")]))
        return True

    def _preflight(self, front: Front, request: HttpRequest) -> bool:
        cfg = self._server.config
        headers = request.headers
        if not origin_allowed(headers.get("Origin"), headers.get("Host"), cfg.allowed_origins):
            return self._error(front, request, 403, ErrorCode.FORBIDDEN, "origin not allowed")
        answer = [
            ("Access-Control-Allow-Methods", "GET, POST"),
            ("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID"),
            ("Access-Control-Max-Age", "600"),
            ("Content-Length", "0"),
            *self._cors(request),
        ]
        front.write(response_head(204, answer))
        return True

    # ---------------------------------------------------------------- streams

    async def _events(self, front: Front, request: HttpRequest) -> None:
        server = self._server
        headers = request.headers
        verdict = server.http.admission(request.target, headers, front.ip)
        if isinstance(verdict, Refusal):
            server.http.count_refusal(verdict.reason)
            code = _STATUS_CODES.get(verdict.status, ErrorCode.UNAVAILABLE)
            self._error(front, request, verdict.status, code, verdict.text.strip(), close=True)
            return
        resume = self._resume_hello(front, request)
        if resume is False:
            return
        conn = SseConnection(
            server, front, verdict, headers.get("Origin"), token_from_request(request.target, headers.get("Authorization"))
        )
        stream_headers = [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-store"),
            ("X-Accel-Buffering", "no"),  # nginx: do not buffer the stream
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close"),
            *self._cors(request),
        ]
        front.write(response_head(200, stream_headers) + _event("connection", {"connection": conn.token}))
        self.connections[conn.token] = conn
        server.http.opened(conn.ip)
        server.telemetry.connections_open.inc()
        try:
            if resume is not None:
                await conn.accept([resume])
            await conn.run()
        finally:
            del self.connections[conn.token]
            server.fanout.lagging.discard(conn)  # type: ignore[arg-type]
            server.telemetry.connections_open.dec()
            server.http.closed(conn.ip)

    def _resume_hello(self, front: Front, request: HttpRequest) -> str | None | bool:
        """The ``hello`` a stream with ``?session=`` and ``Last-Event-ID`` says
        itself (None: none; False: refused, 400 sent)."""
        session = request.query("session")
        last = request.headers.get("Last-Event-ID")
        if session is None:
            if last is not None:
                self._error(front, request, 400, ErrorCode.BAD_MESSAGE,
                            "Last-Event-ID resumes the session named by ?session=", "session", close=True)
                return False
            return None
        last = (last or "0").strip()
        if not last.isdigit() or len(last) > 18:
            self._error(front, request, 400, ErrorCode.BAD_MESSAGE,
                        "Last-Event-ID must be the seq of the last event received", "Last-Event-ID", close=True)
            return False
        hello: dict[str, object] = {"type": "hello", "protocol": 1, "session": session, "last_seq": int(last)}
        if request.query("snapshot") in ("1", "true"):
            hello["snapshot"] = True
        agent = request.query("agent")
        if agent is not None:
            hello["agent"] = agent
        return orjson.dumps(hello).decode()

    async def _send(self, front: Front, request: HttpRequest, body: bytes) -> bool:
        server = self._server
        headers = request.headers
        token = request.query("connection")
        if not token:
            return self._error(front, request, 400, ErrorCode.BAD_MESSAGE, "?connection= is required", "connection")
        conn = self.connections.get(token)
        if conn is None:
            return self._error(front, request, 404, ErrorCode.UNKNOWN_CONNECTION,
                               "no open stream has this connection token; open GET /v1/events again")
        origin = headers.get("Origin")
        if not origin_allowed(origin, headers.get("Host"), server.config.allowed_origins) or (
            origin is not None and conn.origin is not None and origin != conn.origin
        ):
            return self._error(front, request, 403, ErrorCode.FORBIDDEN, "origin not allowed for this connection")
        credential = token_from_request(request.target, headers.get("Authorization"))
        if credential is not None and server.auth.enabled:
            identity = server.auth.verify(credential)
            if identity is None:
                return self._error(front, request, 401, ErrorCode.UNAUTHORIZED, "unauthorized")
            session = conn.proto.session
            owner = conn.identity.id if conn.identity is not None else (session.identity if session else None)
            if owner is not None and identity.id != owner:
                return self._error(front, request, 403, ErrorCode.FORBIDDEN, "this connection is another identity's")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._error(front, request, 400, ErrorCode.BAD_JSON, "the body is not JSON")
        if isinstance(data, list):
            texts = [orjson.dumps(item).decode() for item in data]
        else:
            texts = [body.decode()]
        if not await conn.accept(texts):
            return self._error(front, request, 404, ErrorCode.UNKNOWN_CONNECTION, "the connection has closed")
        self._answer(front, request, 202, orjson.dumps({"accepted": len(texts)}), close=False)
        return True

    # -------------------------------------------------------------- the server

    def shutdown(self, notice: bytes) -> None:
        for conn in list(self.connections.values()):
            conn.shutdown(notice)

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self.connections.values()):
            conn.close(code, reason)
