"""A scripted fake LLM upstream (OpenAI and Anthropic wire formats) on 127.0.0.1.

Plain asyncio, HTTP/1.1 keep-alive. Each request takes the next item of the
script (:class:`SSE`, :class:`Reply` or :class:`Drop`) and is recorded in
``upstream.requests`` with its JSON body, the time it arrived, how many events
were sent and when the client hung up (``eof_at``, on the same monotonic clock
as the tests), which is how the cancel tests measure the time from a cancel to
the upstream connection closing.

Hang-up detection: right after the response headers a ``reader.read(1)`` is
started; the client sends nothing while it reads a response, so when that
read completes with ``b""`` (or fails) the client has closed the connection.
A done-callback stamps the time at once, so the figure does not depend on the
delay between events.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from tests.providers.vendor_streams import anthropic_start, chat_deltas, response_object, responses_usage

__all__ = [
    "SSE",
    "calls_of",
    "Drop",
    "FakeUpstream",
    "Recorded",
    "Reply",
    "anthropic_error",
    "anthropic_events",
    "chat_events",
    "collect",
    "responses_events",
    "cancel_to_eof",
    "text_of",
]


@dataclass
class SSE:
    """A 200 ``text/event-stream`` answer, one chunk per event.

    ``events``: ``(event name or None, data)`` pairs; data that is not a str
    is JSON-encoded. ``delay``: seconds before each event after the first.
    ``abort_after``: reset the TCP connection (RST) after that many events.
    ``hold``: after the events, wait this long for the client to hang up
    before ending the body. ``end``: end the chunked body (``0\\r\\n\\r\\n``).
    """

    events: Sequence[tuple[str | None, Any]]
    delay: float = 0.0
    abort_after: int | None = None
    hold: float = 0.0
    end: bool = True
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    """A plain JSON answer (errors: 401, 429 with ``retry-after``, 500…)."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Drop:
    """Read the request, then reset the connection without answering."""


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float
    events_sent: int = 0
    eof_at: float | None = None  # when the client hung up mid-answer
    finished: bool = False  # the whole answer was written


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = {529: "Overloaded"}.get(status, "Unknown")
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


def _encode_event(name: str | None, data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    lines = [f"event: {name}"] if name else []
    lines += [f"data: {line}" for line in text.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FakeUpstream:
    """``async with FakeUpstream([SSE(...), Reply(429, ...)]) as up: up.url``"""

    def __init__(self, script: Iterable[SSE | Reply | Drop] = (), *, default: SSE | Reply | Drop | None = None) -> None:
        self.script: list[SSE | Reply | Drop] = list(script)
        self.default = default
        self.requests: list[Recorded] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]  # type: ignore[no-any-return]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FakeUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def wait_closed(self, index: int = -1, timeout: float = 5.0) -> float:
        """Wait until the client hung up on request ``index``; returns ``eof_at``."""
        async with asyncio.timeout(timeout):
            while True:
                if self.requests:
                    rec = self.requests[index]
                    if rec.eof_at is not None:
                        return rec.eof_at
                await asyncio.sleep(0.002)

    def _next(self) -> SSE | Reply | Drop:
        if self.script:
            return self.script.pop(0)
        if self.default is not None:
            return self.default
        return Reply(500, {"error": {"message": "fake upstream: script exhausted"}})

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        prefix = b""
        try:
            while True:
                try:
                    head = prefix + await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                rec = Recorded(method, path, headers, body, time.monotonic())
                self.requests.append(rec)
                item = self._next()
                if isinstance(item, Drop):
                    _rst(writer)
                    return
                if isinstance(item, Reply):
                    await self._reply(item, writer)
                    rec.finished = True
                    prefix = b""
                    continue
                keep, prefix = await self._stream(item, rec, reader, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError):
            # Swallowing the cancel of __aexit__: on 3.11 asyncio logs a
            # cancelled client_connected_cb task as an error.
            return
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            if not writer.transport.is_closing():
                writer.close()

    async def _reply(self, item: Reply, writer: asyncio.StreamWriter) -> None:
        payload = b"" if item.body is None else json.dumps(item.body).encode()
        headers = {"content-type": "application/json", "content-length": str(len(payload)), **item.headers}
        writer.write(
            _status_line(item.status)
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
            + b"\r\n"
            + payload
        )
        await writer.drain()

    async def _stream(
        self, item: SSE, rec: Recorded, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[bool, bytes]:
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "transfer-encoding": "chunked",
            "cache-control": "no-cache",
            **item.headers,
        }
        writer.write(
            _status_line(200) + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n"
        )
        probe: asyncio.Future[bytes] = asyncio.ensure_future(reader.read(1))

        def on_probe(fut: asyncio.Future[bytes]) -> None:
            if fut.cancelled():
                return
            if fut.exception() is not None or fut.result() == b"":
                if rec.eof_at is None:
                    rec.eof_at = time.monotonic()

        probe.add_done_callback(on_probe)
        try:
            await writer.drain()
            for i, (name, data) in enumerate(item.events):
                if i and item.delay:
                    await asyncio.wait({probe}, timeout=item.delay)
                if probe.done():
                    return False, b""
                chunk = _encode_event(name, data)
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                rec.events_sent += 1
                if item.abort_after is not None and rec.events_sent >= item.abort_after:
                    await asyncio.sleep(0.05)  # let the client read what was sent
                    _rst(writer)
                    return False, b""
            if item.hold:
                await asyncio.wait({probe}, timeout=item.hold)
                if probe.done():
                    return False, b""
            if not item.end:
                _rst(writer)
                return False, b""
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            rec.finished = True
            try:
                first = await probe  # the next request's first byte, or EOF
            except ConnectionError:
                return False, b""
            return (first != b""), first
        except ConnectionError:
            if rec.eof_at is None:
                rec.eof_at = time.monotonic()
            return False, b""
        finally:
            if not probe.done():
                probe.cancel()


# ----------------------------------------------------------- event builders


def chat_events(
    texts: Sequence[str],
    *,
    finish: str | None = "stop",
    usage: tuple[int, int] | None = (5, 6),
    done: bool = True,
) -> list[tuple[str | None, Any]]:
    """OpenAI Chat Completions chunks: role-only first chunk, content, finish,
    usage-only last chunk (``choices: []``), ``[DONE]``."""
    return chat_deltas([{"content": t} for t in texts], finish=finish, usage=usage, done=done)


def anthropic_events(
    texts: Sequence[str],
    *,
    stop_reason: str | None = "end_turn",
    input_tokens: int = 7,
    output_tokens: int | None = None,
    ping: bool = True,
    stop: bool = True,
) -> list[tuple[str | None, Any]]:
    """Anthropic Messages stream events (``event:`` lines included)."""
    events: list[tuple[str | None, Any]] = [
        anthropic_start(input_tokens),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
    ]
    if ping:
        events.append(("ping", {"type": "ping"}))
    events += [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
        )
        for t in texts
    ]
    if stop:
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens if output_tokens is not None else len(texts)},
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
    return events


def anthropic_error(kind: str = "overloaded_error", message: str = "Overloaded") -> tuple[str, Any]:
    return "error", {"type": "error", "error": {"type": kind, "message": message}}


def responses_events(
    texts: Sequence[str],
    *,
    usage: tuple[int, int] = (9, 4),
    incomplete: str | None = None,
) -> list[tuple[str | None, Any]]:
    """OpenAI Responses API stream events (data-only, each with a ``type``)."""

    events: list[tuple[str | None, Any]] = [
        (None, {"type": "response.created", "sequence_number": 0, "response": response_object("in_progress")})
    ]
    for i, t in enumerate(texts):
        events.append(
            (
                None,
                {
                    "type": "response.output_text.delta",
                    "sequence_number": i + 1,
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": t,
                    "logprobs": [],
                },
            )
        )
    u = responses_usage(usage)
    if incomplete is None:
        final = {"type": "response.completed", "response": response_object("completed", usage=u)}
    else:
        final = {
            "type": "response.incomplete",
            "response": response_object("incomplete", usage=u, incomplete_details={"reason": incomplete}),
        }
    final["sequence_number"] = len(texts) + 1
    events.append((None, final))
    return events


# ------------------------------------------------------------ test helpers


async def collect(provider: Any, request: Any, timeout: float = 10.0) -> tuple[list[Any], Any]:
    """Run ``provider.stream(request)`` the way the stream runner does; returns
    ``(events, ProviderFailure or None)``."""
    from wsserver.providers import ProviderFailure

    events: list[Any] = []
    stream = provider.stream(request)
    try:
        async with asyncio.timeout(timeout):
            async for event in stream:
                events.append(event)
    except ProviderFailure as exc:
        return events, exc
    finally:
        await stream.aclose()
    return events, None


def text_of(events: Sequence[Any]) -> str:
    from wsserver.providers import TextDelta

    return "".join(e.text for e in events if isinstance(e, TextDelta))


def calls_of(events: Sequence[Any]) -> dict[str, tuple[str, str]]:
    """call id -> (tool name, its arguments' text joined)."""
    from wsserver.providers import ToolCallDelta, ToolCallStart

    out: dict[str, tuple[str, str]] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            out[e.call] = (e.name, "")
        elif isinstance(e, ToolCallDelta):
            name, text = out[e.call]
            out[e.call] = (name, text + e.text)
    return out


async def cancel_to_eof(
    upstream: FakeUpstream, provider: Any, request: Any, at: Callable[[Any], bool] | None = None
) -> float:
    """Stream ``request`` from ``provider``, cancel the consuming task at the
    first event ``at`` accepts (default: the first text), and return the
    seconds until the upstream saw the hang-up."""
    from wsserver.providers import TextDelta

    first = asyncio.Event()
    at = at or (lambda e: isinstance(e, TextDelta))

    async def consume() -> None:
        stream = provider.stream(request)
        try:
            async for event in stream:
                if at(event):
                    first.set()
        finally:
            await stream.aclose()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(5):
        await first.wait()
    t0 = time.monotonic()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:  # pragma: no cover - the task must have been cancelled
        raise AssertionError("the stream ended before it was cancelled")
    return await upstream.wait_closed(timeout=5) - t0
