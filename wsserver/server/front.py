"""The first protocol of every TCP connection: the WebSocket (websockets) or the HTTP transport (ours).

websockets' ``process_request`` can only answer a request with a complete
``Response``, and its HTTP parser refuses any request body, so it can
neither stream ``text/event-stream`` nor read a ``POST``. So every accepted
TCP connection starts with a :class:`Front`, a small asyncio protocol that
reads the request line and routes on it:

* a request for ``/v1/…`` (the HTTP transport, :mod:`wsserver.server.sse`)
  is read and served here, HTTP/1.1 with keep-alive;
* anything else (a WebSocket upgrade, ``/healthz``, the demo page) is
  handed to websockets at once with the bytes read so far: the
  ``ServerConnection`` that websockets' ``serve()`` would have made is made
  now, the transport is given to it (``transport.set_protocol``) and it
  proceeds as if it had been there from the start. A keep-alive connection
  that served ``/v1/…`` and then asks for something else (a browser reuses
  its pooled connections) is handed over at that request's boundary.

Robustness: a request head must arrive whole within ``open_timeout`` (no
slowloris), lines are at most websockets' ``MAX_LINE_LENGTH`` and headers at
most ``MAX_NUM_HEADERS`` (431 beyond), and they are parsed by websockets'
own ``parse_headers``. Against request smuggling a body is read only by a
single ``Content-Length`` (several that differ: 400; any
``Transfer-Encoding``: 411), every refused request closes the connection,
and a body over ``max_size`` is refused (413) before it is read. Reading is
paused while more than ``READ_LIMIT`` bytes wait (TCP backpressure).

Where it leaks: ``serve(create_connection=…)`` is documented as a
``ServerConnection`` subclass or wrapper; ours returns a :class:`Front`,
which is an asyncio protocol but no ``ServerConnection``, so websockets'
``Server`` knows a connection only once it is handed over: its
``close()`` does not see the HTTP transport's streams (the app closes them
itself), and no ``select_subprotocol`` is given to ``serve()`` (its wrapper
would check the connection it made, the Front): the
:class:`~wsserver.server.connection.WebSocket` made at the hand-over picks
the subprotocol. A request line that is slow to come counts against
``open_timeout`` here and then, once handed over, websockets' handshake has
its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import SecurityError
from websockets.http11 import MAX_LINE_LENGTH, parse_headers
from websockets.streams import StreamReader

from .http import duplicated_header

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

__all__ = ["PREFIX", "Front", "HttpError", "HttpRequest", "Routes"]

logger = logging.getLogger("wsserver.server")

#: Requests for paths under this prefix are served by the HTTP transport.
PREFIX = b"/v1/"
#: A request head (request line and headers) larger than this is refused (431).
MAX_HEAD = 64 * 1024
#: Bytes read ahead before reading is paused (TCP backpressure).
READ_LIMIT = 256 * 1024

_REASONS = {
    100: "Continue", 200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
}


class HttpError(Exception):
    """A request refused before it reached its handler; the connection closes after the answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True)
class HttpRequest:
    method: str
    target: str
    version: str
    headers: Headers
    ip: str

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def query(self, name: str) -> str | None:
        values = parse_qs(urlsplit(self.target).query).get(name)
        return values[0] if values else None

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("Connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def parse_head(head: bytes, ip: str) -> HttpRequest:
    """The request line and headers of ``head`` (which ends with an empty line).

    Raises :class:`HttpError` (400, 431) when they are not valid HTTP/1.1.
    """
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].startswith(b"/"):
        raise HttpError(400, "bad_request", "invalid HTTP request line")
    method, target, version = (part.decode("ascii", "replace") for part in parts)
    reader = StreamReader()
    reader.feed_data(rest)
    reader.feed_eof()
    parser = parse_headers(reader.read_line)
    try:
        next(parser)
    except StopIteration as done:
        headers: Headers = done.value
    except EOFError:
        raise HttpError(400, "bad_request", "invalid HTTP header line") from None
    except SecurityError:  # a line too long, too many headers
        raise HttpError(431, "bad_request", "HTTP headers too large") from None
    except ValueError:  # an invalid name or value
        raise HttpError(400, "bad_request", "invalid HTTP headers") from None
    else:  # pragma: no cover - fed to EOF, the parser cannot ask for more
        raise HttpError(400, "bad_request", "incomplete HTTP headers")
    duplicated = duplicated_header(headers)  # (read as one value by the handlers: never guessed)
    if duplicated is not None:
        raise HttpError(400, "bad_request", f"duplicated {duplicated} header")
    return HttpRequest(method, target, version, headers, ip)


def content_length(request: HttpRequest) -> int:
    """The body's length by its one ``Content-Length`` (refusing what could smuggle a request)."""
    headers = request.headers
    if "Transfer-Encoding" in headers:
        raise HttpError(411, "bad_request", "send the body with a Content-Length, not a Transfer-Encoding")
    values = {value.strip() for value in headers.get_all("Content-Length")}
    if not values:
        return 0
    if len(values) > 1:
        raise HttpError(400, "bad_request", "conflicting Content-Length headers")
    value = values.pop()
    if not value.isdigit() or len(value) > 18:
        raise HttpError(400, "bad_request", "invalid Content-Length")
    return int(value)


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Routes(Protocol):
    """What serves the HTTP transport's requests (:class:`wsserver.server.sse.HttpTransport`)."""

    open_timeout: float
    max_body: int
    write_limit: int

    async def handle(self, front: Front, request: HttpRequest, body: bytes) -> bool:
        """Answer ``request``; True to keep the connection for another request."""
        ...

    def refused(self, front: Front, error: HttpError) -> None:
        """Answer a request refused before its handler (the connection closes next)."""
        ...


class Front(asyncio.Protocol):
    """Routes one TCP connection by its request line (see the module docstring)."""

    def __init__(self, routes: Routes, make_ws: Callable[[], ServerConnection]) -> None:
        self._routes = routes
        self._make_ws = make_ws
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._reading_paused = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Set while the transport takes writes without passing its high-water mark.
        self.writable = asyncio.Event()
        self.writable.set()
        #: Called when the transport's write buffer drains below its low-water mark.
        self.on_writable: Callable[[], None] | None = None
        #: Called once when the connection is lost (the client left).
        self.on_lost: Callable[[], None] | None = None
        self.closed = False

    # ------------------------------------------------------- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport subclass)
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        transport.set_write_buffer_limits(self._routes.write_limit)
        self._timer = asyncio.get_running_loop().call_later(self._routes.open_timeout, self._idle)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._task is None:
            end = buffer.find(b"\n")
            if end < 0 and len(buffer) <= MAX_LINE_LENGTH:
                return  # the request line is not whole yet
            if self._ours(bytes(buffer[: max(end, 0)])):
                self._task = asyncio.get_running_loop().create_task(self._serve())
            else:
                self._hand_over()
                return
        if len(buffer) > READ_LIMIT and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # close the transport: the client is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        if self._timer is not None:
            self._timer.cancel()
        self._wake()
        self.writable.set()
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()
        if self.on_writable is not None:
            self.on_writable()

    # ----------------------------------------------------------------- routing

    @staticmethod
    def _ours(line: bytes) -> bool:
        parts = line.split(b" ", 2)
        return len(parts) == 3 and parts[1].startswith(PREFIX)

    def _hand_over(self) -> None:
        """Give the connection and what was read of it to websockets."""
        transport = self.transport
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
        data, self._buffer = bytes(self._buffer), bytearray()
        ws = self._make_ws()
        transport.set_protocol(ws)
        ws.connection_made(transport)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if data:
            ws.data_received(data)
        if self._eof:
            ws.eof_received()

    def _idle(self) -> None:
        """No whole request in time (or an idle keep-alive connection): close."""
        self._timer = None
        if self.transport is not None and not self.closed:
            self.transport.abort() if self._task is None else self.transport.close()

    # ----------------------------------------------------------------- reading

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _more(self) -> bool:
        """Wait for more data; False at EOF."""
        if self._eof:
            return False
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        return True

    async def _read_head(self) -> bytes | None:
        """The next request head, or None (EOF, or a head over MAX_HEAD: 431 sent)."""
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self._buffer[: end + 4])
                del self._buffer[: end + 4]
                return head
            if len(self._buffer) > MAX_HEAD:
                self._routes.refused(self, HttpError(431, "bad_request", "request head too large"))
                return None
            if not await self._more():
                return None

    async def read_body(self, length: int) -> bytes | None:
        """Exactly ``length`` bytes of body, or None at EOF."""
        while len(self._buffer) < length:
            if not await self._more():
                return None
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return body

    async def _serve(self) -> None:
        """Serve requests until the connection closes or asks for another route."""
        loop = asyncio.get_running_loop()
        routes = self._routes
        try:
            while not self.closed:
                head = await self._read_head()
                if head is None:
                    break
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if not self._ours(head[: head.find(b"\r\n")]):
                    self._buffer[:0] = head  # a later request for websockets
                    self._hand_over()
                    return
                try:
                    request = parse_head(head, self.ip)
                    length = content_length(request)
                except HttpError as error:
                    routes.refused(self, error)
                    break
                if length > routes.max_body:
                    routes.refused(self, HttpError(413, "message_too_large", f"the body is over {routes.max_body} bytes"))
                    break
                if length and request.headers.get("Expect", "").lower() == "100-continue":
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = b""
                if length:
                    async with asyncio.timeout(routes.open_timeout):
                        read = await self.read_body(length)
                    if read is None:
                        break
                    body = read
                if not await routes.handle(self, request, body) or not request.keep_alive:
                    break
                self._timer = loop.call_later(routes.open_timeout, self._idle)  # the next request's head
        except TimeoutError:
            routes.refused(self, HttpError(408, "bad_request", "the request body did not arrive in time"))
        except Exception:  # a bug: this connection ends, nothing else does
            logger.exception("HTTP transport request failed")
            if not self.closed:
                routes.refused(self, HttpError(500, "internal", "internal error"))
        finally:
            if self.transport is not None and self.transport.get_protocol() is self:
                self.transport.close()

    # ----------------------------------------------------------------- writing

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_buffer_size(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None and not self.closed else 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        await self.writable.wait()
