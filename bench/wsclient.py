"""A minimal WebSocket client for load generation (asyncio Protocol, uvloop).

It does the HTTP upgrade by hand and then only walks frame headers: each
complete frame is handed to ``conn.on_frame(data, start, end, opcode)``
without copying, with ``conn.now`` (``time.monotonic()`` of the read) set
once per read. Client frames are masked with a zero key (legal, and the
payload needs no XOR). Pings are answered; nothing is validated beyond what
counting needs. This keeps the client's cost per frame at about a
microsecond of Python so that the server is what gets measured.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10
_MASK = b"\x00\x00\x00\x00"

FrameHandler = Callable[[bytes, int, int, int], Any]


def encode_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _MASK + payload


class Conn(asyncio.Protocol):
    """One client WebSocket. ``await conn.opened`` before sending."""

    def __init__(self, host: str, port: int, path: str = "/", subprotocol: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            + (f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else "")
            + "\r\n"
        ).encode()
        self._buf = b""
        self._upgraded = False
        self.now = 0.0
        #: Called for every complete frame; default: queue it for ``recv()``.
        self.on_frame: FrameHandler = self._enqueue
        self._queue: deque[tuple[int, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.state: Any = None  # for the load generator's bookkeeping

    # ---------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.now = time.monotonic()
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self._upgraded:
            head_end = data.find(b"\r\n\r\n")
            if head_end < 0:
                self._buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(data[: data.find(b"\r\n")].decode()))
                self.transport.close()  # type: ignore[union-attr]
                return
            self._upgraded = True
            self.opened.set_result(None)
            data = data[head_end + 4 :]
        size = len(data)
        pos = 0
        on_frame = self.on_frame
        while size - pos >= 2:
            length = data[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                start = pos + 4
            else:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            opcode = data[pos] & 0x0F
            if opcode == OP_TEXT or opcode == 0:
                on_frame(data, start, end, opcode)
            elif opcode == OP_PING:
                self.transport.write(encode_frame(data[start:end], OP_PONG))  # type: ignore[union-attr]
            elif opcode == OP_CLOSE:
                self.transport.close()  # type: ignore[union-attr]
                return
            else:
                on_frame(data, start, end, opcode)
            pos = end
        if pos < size:
            self._buf = data[pos:]

    # ------------------------------------------------------------------- API

    def send(self, payload: bytes) -> None:
        self.transport.write(encode_frame(payload))  # type: ignore[union-attr]

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"\x88\x82" + _MASK + b"\x03\xe8")  # close 1000
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _enqueue(self, data: bytes, start: int, end: int, opcode: int) -> None:
        self._queue.append((opcode, data[start:end]))
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self, timeout: float = 30.0) -> bytes:
        """The next frame's payload (only while ``on_frame`` is the default)."""
        async with asyncio.timeout(timeout):
            while not self._queue:
                if self.closed.done():
                    raise ConnectionError("connection closed")
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
        return self._queue.popleft()[1]

    async def recv_until(self, prefix: bytes, timeout: float = 30.0) -> bytes:
        """Frames up to and including the first whose payload starts with ``prefix``."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame.startswith(prefix):
                    return frame


async def connect(
    host: str, port: int, path: str = "/", subprotocol: str | None = None, timeout: float = 30.0
) -> Conn:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, conn = await loop.create_connection(lambda: Conn(host, port, path, subprotocol), host, port)
        await conn.opened
    return conn
