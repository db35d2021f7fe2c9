"""The Python client.

::

    async with wsserver.connect("ws://127.0.0.1:8765") as c:
        stream = await c.generate([{"role": "user", "content": "hi"}])
        async for text in stream:
            print(text, end="", flush=True)
        print(stream.result.reason, stream.result.usage)

One reader task per client dispatches frames: replies go to the request that
carries the matching ``id`` (``ref``), stream frames to their stream. Every
request sent by this client carries an ``id``, so each has exactly one answer.
Errors arrive as :class:`~wsserver.errors.ServerError` (with ``.code``) on the
call that caused them; a stream that ends with reason ``error`` raises
:class:`~wsserver.errors.StreamFailed` from its iterator.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from .errors import ConnectionLost, ServerError, StreamFailed, server_error
from .messages import PROTOCOL_VERSION, SUBPROTOCOL

__all__ = ["Client", "ClientStream", "StreamResult", "Usage", "connect"]

logger = logging.getLogger("wsserver.client")

_END = object()


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class StreamResult:
    """How a stream ended (``stream.end``)."""

    reason: str
    usage: Usage
    ttft_ms: float | None
    duration_ms: float
    text: str
    error_code: str | None = None
    error_message: str | None = None


class ClientStream:
    """One generation: an async iterator of text pieces.

    ``result`` is set once ``stream.end`` arrived. Iteration ends normally for
    every reason but ``error``, which raises :class:`StreamFailed`.
    """

    def __init__(self, client: Client, ref: str) -> None:
        self._client = client
        self.ref = ref
        self.id: str | None = None
        self.provider: str | None = None
        self.model: str | None = None
        self.result: StreamResult | None = None
        self._parts: list[str] = []
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._failure: BaseException | None = None

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self._parts)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # iterating again ends again
            if self._failure is not None:
                raise self._failure
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]

    async def wait(self) -> StreamResult:
        """Consume the rest of the stream and return its result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def cancel(self) -> None:
        """Stop the generation. Returns once the stream has ended (a no-op if it had)."""
        if self.result is not None or self.id is None:
            return
        try:
            await self._client.request({"type": "cancel", "stream": self.id})
        except ServerError as exc:
            if exc.code != "unknown_stream":  # ended meanwhile: nothing to do
                raise

    # called by the client's reader
    def _feed(self, text: str) -> None:
        self._parts.append(text)
        self._queue.put_nowait(text)

    def _end(self, frame: Mapping[str, Any]) -> None:
        usage = frame.get("usage") or {}
        error = frame.get("error") or {}
        self.result = StreamResult(
            reason=frame["reason"],
            usage=Usage(
                usage.get("input_tokens", 0),
                usage.get("output_tokens", 0),
                bool(usage.get("estimated", False)),
            ),
            ttft_ms=frame.get("ttft_ms"),
            duration_ms=frame.get("duration_ms", 0.0),
            text=self.text,
            error_code=error.get("code"),
            error_message=error.get("message"),
        )
        if frame["reason"] == "error":
            self._failure = StreamFailed(
                error.get("code", "internal"), error.get("message", ""), self.result
            )
        self._queue.put_nowait(_END)

    def _lost(self, exc: BaseException) -> None:
        if self.result is None:
            self._failure = exc
            self._queue.put_nowait(_END)


class Client:
    """A connection to a wsserver. Create it with :func:`connect`."""

    def __init__(self, url: str, *, request_timeout: float = 30.0, **ws_options: Any) -> None:
        self.url = url
        self.request_timeout = request_timeout
        self._ws_options = {"compression": None, "max_size": None, **ws_options}
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._by_ref: dict[str, ClientStream] = {}
        self._streams: dict[str, ClientStream] = {}
        self._reader: asyncio.Task[None] | None = None
        self.welcome: dict[str, Any] = {}
        #: Highest ``seq`` received (what a resume would send as ``last_seq``).
        self.last_seq = 0
        #: ``error`` frames that answered no request of ours (e.g. bad input).
        self.unsolicited_errors: list[ServerError] = []

    @property
    def session(self) -> str | None:
        return self.welcome.get("session")

    async def _open(self, hello: Mapping[str, Any] | None = None) -> Client:
        self._ws = await ws_connect(self.url, subprotocols=[SUBPROTOCOL], **self._ws_options)
        try:
            hello_msg = {"type": "hello", "protocol": PROTOCOL_VERSION, **(hello or {})}
            await self._ws.send(orjson.dumps(hello_msg), text=True)
            async with asyncio.timeout(self.request_timeout):
                frame = orjson.loads(await self._ws.recv())
            if frame.get("type") == "error":
                raise server_error(frame)
            if frame.get("type") != "welcome":
                raise ServerError("bad_message", f"expected welcome, got {frame.get('type')!r}")
        except BaseException:
            await self._ws.close()
            raise
        self.welcome = frame
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await self._reader

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -------------------------------------------------------------- requests

    def _next_id(self) -> str:
        return f"c{next(self._ids)}"

    async def send_raw(self, data: str | bytes) -> None:
        """Send a frame as is (tests and tools; bypasses every check)."""
        assert self._ws is not None
        await self._ws.send(data)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` with a fresh ``id`` and return its reply frame.

        Raises :class:`ServerError` when the reply is ``error``.
        """
        if self._ws is None or self._reader is None or self._reader.done():
            raise ConnectionLost(None, "not connected")
        request_id = message.setdefault("id", self._next_id())
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._ws.send(orjson.dumps(message), text=True)
            async with asyncio.timeout(self.request_timeout):
                return await future
        except ConnectionClosed as exc:
            raise self._lost_error(exc) from None
        finally:
            self._pending.pop(request_id, None)

    async def generate(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        stream: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> ClientStream:
        """Start a generation; returns once the server accepted it (``stream.start``)."""
        request_id = self._next_id()
        msg: dict[str, Any] = {"type": "generate", "id": request_id, "messages": list(messages)}
        options = {"stream": stream, "provider": provider, "model": model}
        msg.update({k: v for k, v in options.items() if v is not None})
        if params is not None:
            msg["params"] = dict(params)
        handle = ClientStream(self, request_id)
        self._by_ref[request_id] = handle
        try:
            start = await self.request(msg)
        finally:
            self._by_ref.pop(request_id, None)
        handle.provider, handle.model = start.get("provider"), start.get("model")
        return handle

    async def ping(self) -> float:
        """Round trip of an application-level ping, in seconds."""
        t0 = time.perf_counter()
        await self.request({"type": "ping"})
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- reader

    async def _read_loop(self) -> None:
        assert self._ws is not None
        exc: BaseException
        try:
            async for raw in self._ws:
                self._dispatch(orjson.loads(raw))
            exc = self._lost_error(None)
        except ConnectionClosed as closed:
            exc = self._lost_error(closed)
        except Exception as error:  # a bug or garbage from the server
            logger.exception("client reader failed")
            exc = ConnectionLost(None, f"client reader failed: {error!r}")
            await self._ws.close(1011)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        for handle in self._streams.values():
            handle._lost(exc)
        self._streams.clear()

    def _lost_error(self, closed: ConnectionClosed | None) -> ConnectionLost:
        if closed is not None and closed.rcvd is not None:
            return ConnectionLost(closed.rcvd.code, closed.rcvd.reason)
        ws = self._ws
        return ConnectionLost(ws.close_code, ws.close_reason or "") if ws else ConnectionLost(None)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        seq = frame.get("seq")
        if seq is not None:
            self.last_seq = seq
        kind = frame.get("type")
        if kind == "stream.delta":
            handle = self._streams.get(frame["stream"])
            if handle is not None:
                handle._feed(frame["text"])
            return
        if kind == "stream.start":
            handle = self._by_ref.get(frame.get("ref") or "")
            if handle is not None:
                handle.id = frame["stream"]
                self._streams[handle.id] = handle
        elif kind == "stream.end":
            handle = self._streams.pop(frame["stream"], None)
            if handle is not None:
                handle._end(frame)
        ref = frame.get("ref")
        if ref is not None:
            future = self._pending.get(ref)
            if future is not None and not future.done():
                if kind == "error":
                    future.set_exception(server_error(frame))
                else:
                    future.set_result(frame)
                return
        if kind == "error":
            error = server_error(frame)
            self.unsolicited_errors.append(error)
            logger.warning("server error: %s", error)


class _Connecting:
    """``await connect(...)`` or ``async with connect(...) as client``."""

    def __init__(self, client: Client, hello: Mapping[str, Any] | None) -> None:
        self._client = client
        self._hello = hello

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client._open(self._hello).__await__()

    async def __aenter__(self) -> Client:
        return await self._client._open(self._hello)

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()


def connect(
    url: str = "ws://127.0.0.1:8765",
    *,
    hello: Mapping[str, Any] | None = None,
    request_timeout: float = 30.0,
    **ws_options: Any,
) -> _Connecting:
    """Open a client: ``async with connect(url) as client: ...``.

    ``hello`` adds fields to the ``hello`` message; ``ws_options`` go to
    :func:`websockets.asyncio.client.connect`.
    """
    return _Connecting(Client(url, request_timeout=request_timeout, **ws_options), hello)
