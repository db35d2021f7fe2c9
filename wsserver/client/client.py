"""The Python client.

::

    async with wsserver.connect("ws://127.0.0.1:8765") as c:
        stream = await c.generate([{"role": "user", "content": "hi"}])
        async for text in stream:
            print(text, end="", flush=True)
        print(stream.result.reason, stream.result.usage)

``async for event in stream.events()`` gives reasoning and tool calls as
well (:class:`~wsserver.client.types.StreamEvent`); once ended,
``stream.message`` is the assistant message to send back and
``stream.tool_calls`` the calls to answer with ``tool`` messages.

Agent runs (``generate(..., max_steps=5)``) answer tool calls in the same
stream: handlers registered with ``client.tools.register(name, fn)`` answer
them by themselves (and the calls other agents' runs route to this client's
agent); ``await stream.wait_for_tools()`` returns what still needs the
caller (approvals, results of unregistered tools), answered with
``stream.tool_result(call, content)`` and ``stream.approve(call, ok)``.

One reader task per connection dispatches frames: replies go to the request
that carries the matching ``id`` (``ref``), stream frames to their stream.
Every request sent by this client carries an ``id``, so each has exactly one
answer. Errors arrive as :class:`~wsserver.wire.errors.ServerError` (with
``.code``) on the call that caused them; a stream that ends with reason
``error`` raises :class:`~wsserver.wire.errors.StreamFailed` from its iterator.

Reconnection: when the connection drops, the client reconnects by itself
with full-jitter exponential backoff (the first retry is jittered too, so a
server restart is not met by every client at once) and resumes its session
with ``hello {session, last_seq}``. The server replays what was missed, the
client drops anything it has already seen (``seq <= last_seq``), and
requests whose answers had not arrived are re-sent with the same ``id``
(the server never acts twice on an id), so a caller iterating a stream sees
no gap and no duplicate across any number of reconnects. If the session
cannot be resumed (expired, or its log fell short), running streams and
pending requests fail with :class:`~wsserver.wire.errors.ConnectionLost` and the
client carries on with a fresh session. It does not reconnect after close
codes that say retrying is pointless or harmful (4000 session taken over,
4001, 4400, 4401, 4403, 1008), nor after :meth:`Client.close`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from ..wire.errors import CloseCode, ConnectionLost, ServerError, server_error
from ..wire.messages import PROTOCOL_VERSION, SUBPROTOCOL
from .channels import Subscription
from .sse import SseSocket, sse_connect
from .streams import ClientStream
from .tools import Tools, content_of
from .types import Backoff, DirectMessage

__all__ = ["Client", "connect"]

logger = logging.getLogger("wsserver.client")

#: Frames of a running stream that its handle takes (``ClientStream._frame``).
_STREAM_FRAMES = frozenset({"stream.delta", "stream.tool_call", "stream.waiting", "stream.tool_result", "stream.step"})

#: Close codes after which reconnecting would be pointless or harmful.
NO_RECONNECT = frozenset(
    {
        CloseCode.SESSION_TAKEN_OVER,
        CloseCode.UNSUPPORTED_PROTOCOL,
        CloseCode.PROTOCOL_VIOLATION,
        CloseCode.UNAUTHORIZED,
        CloseCode.FORBIDDEN,
        CloseCode.POLICY,
    }
)


class Client:
    """A connection to a wsserver, reconnecting and resuming by itself.

    Create it with :func:`connect`. ``state`` is one of ``connecting``,
    ``open``, ``reconnecting`` and ``closed``; ``on_state(state, detail)`` is
    called on every change (``detail`` says ``resumed`` or ``new session``
    when a reconnect succeeds).
    """

    def __init__(
        self,
        url: str,
        *,
        request_timeout: float = 30.0,
        reconnect: bool = True,
        backoff: Backoff = Backoff(),
        ack_every: int = 256,
        hello: Mapping[str, Any] | None = None,
        on_state: Callable[[str, str], Any] | None = None,
        transport: str = "websocket",
        **ws_options: Any,
    ) -> None:
        if transport not in ("websocket", "sse"):
            raise ValueError(f"transport must be 'websocket' or 'sse', not {transport!r}")
        self.url = url
        #: ``websocket``, or ``sse``: the HTTP transport (GET /v1/events + POST /v1/send).
        self.transport = transport
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.backoff = backoff
        self.ack_every = ack_every
        self.on_state = on_state
        self._hello_extra = dict(hello or {})
        self._ws_options = {"compression": None, "max_size": None, **ws_options}
        self._ws: ClientConnection | SseSocket | None = None
        self._ids = itertools.count(1)
        # request id -> (future, encoded request), until answered
        self._pending: dict[str, tuple[asyncio.Future[dict[str, Any]], bytes]] = {}
        self._resent: set[str] = set()
        self._by_ref: dict[str, ClientStream] = {}
        self._subscriptions: dict[str, Subscription] = {}
        #: Direct messages (``send``) to this client's agent, in order.
        self.inbox: asyncio.Queue[DirectMessage] = asyncio.Queue()
        #: Tool handlers (agent runs' calls, and calls routed to this client's agent).
        self.tools = Tools(self)
        self._streams: dict[str, ClientStream] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._acks: set[asyncio.Task[None]] = set()  # acks being sent (kept referenced)
        self._connected = asyncio.Event()
        self._closing = False
        self._final_error: ConnectionLost | None = None
        self._acked = 0
        self._reconnect_hint: float | None = None
        self.state = "connecting"
        self.welcome: dict[str, Any] = {}
        #: Highest ``seq`` received (what a resume sends as ``last_seq``).
        self.last_seq = 0
        #: How many times the connection was re-established.
        self.reconnects = 0
        #: Requests re-sent after a resume because their answer had not come.
        self.resent_requests = 0
        #: ``error`` frames that answered no request of ours (e.g. bad input).
        self.unsolicited_errors: list[ServerError] = []

    @property
    def session(self) -> str | None:
        return self.welcome.get("session")

    def _set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state, detail)
            except Exception:  # a UI callback must not break the client
                logger.exception("on_state callback failed")

    # ------------------------------------------------------------ connecting

    async def _open(self) -> Client:
        await self._handshake(resume=False)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        return self

    async def _handshake(self, *, resume: bool) -> bool:
        """Connect and say hello; returns whether the session was resumed."""
        ws: Any
        if self.transport == "sse":
            ws = await sse_connect(self.url, open_timeout=self.request_timeout)
        else:
            ws = await ws_connect(self.url, subprotocols=[SUBPROTOCOL], **self._ws_options)
        try:
            hello: dict[str, Any] = {"type": "hello", "protocol": PROTOCOL_VERSION, **self._hello_extra}
            if resume and self.session:
                hello.update(session=self.session, last_seq=self.last_seq)
            await ws.send(orjson.dumps(hello), text=True)
            async with asyncio.timeout(self.request_timeout):
                while True:
                    frame = orjson.loads(await ws.recv())
                    kind = frame.get("type")
                    if kind == "welcome":
                        break
                    if kind == "error" and frame.get("code") == "resume_failed":
                        logger.info("resume failed: %s", frame.get("message"))
                        continue
                    if kind == "error":
                        raise server_error(frame)
                    raise ServerError("bad_message", f"expected welcome, got {kind!r}")
        except BaseException:
            await ws.close()
            raise
        resumed = bool(frame.get("resumed"))
        if not resumed:
            self._session_lost()
        self.welcome = frame
        self._ws = ws
        self._set_state("open", "resumed" if resumed else "new session")
        self._connected.set()
        for sub in self._subscriptions.values():  # recover every channel by offset
            resub = {**sub._request(), "id": self._next_id()}
            await ws.send(orjson.dumps(resub), text=True)
        if resumed:
            for request_id, (future, data) in list(self._pending.items()):
                if not future.done():  # its answer never came: ask again, same id
                    self._resent.add(request_id)
                    self.resent_requests += 1
                    await ws.send(data, text=True)
        return resumed

    def _session_lost(self) -> None:
        """A fresh session: what belonged to the old one cannot complete."""
        if not self.welcome:
            return  # the first connection
        lost = ConnectionLost(None, "the session was lost (expired or not resumable)")
        self._fail_all(lost)
        self.last_seq = self._acked = 0

    def _fail_all(self, exc: ConnectionLost) -> None:
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
        for handle in [*self._streams.values(), *self._by_ref.values()]:
            handle._lost(exc)
        self._streams.clear()

    async def _supervise(self) -> None:
        """Read until the connection drops, then reconnect and resume."""
        while True:
            closed = await self._read_loop()
            self._connected.clear()
            code = closed.code
            if self._closing or not self.reconnect or code in NO_RECONNECT:
                break
            self._set_state("reconnecting", closed.reason)
            if not await self._reconnect():
                break
        self._final_error = closed
        self._fail_all(closed)
        for sub in self._subscriptions.values():
            sub._lost(closed)
        self._set_state("closed", closed.reason)
        self._connected.set()  # wake waiting requests: they see the final error

    async def _reconnect(self) -> bool:
        started = time.monotonic()
        for attempt in itertools.count():
            give_up = self.backoff.give_up_after
            if give_up is not None and time.monotonic() - started > give_up:
                return False
            hint, self._reconnect_hint = self._reconnect_hint, None
            if hint is not None:  # after a drain: when the server asked, jittered
                await asyncio.sleep(random.uniform(0.5 * hint, 1.5 * hint))
            else:
                await asyncio.sleep(self.backoff.delay(attempt))
            if self._closing:
                return False
            try:
                await self._handshake(resume=True)
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                logger.debug("reconnect attempt %d failed: %r", attempt + 1, exc)
                continue
            except ServerError as exc:  # refused after hello: retrying will not help
                logger.warning("reconnect refused: %s", exc)
                return False
            self.reconnects += 1
            return True
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._supervisor is not None:
            await self._supervisor

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

        Waits while the client is reconnecting; raises :class:`ServerError`
        when the reply is ``error`` and :class:`ConnectionLost` when the
        client has given up.
        """
        if self.state == "closed":
            raise self._final_error or ConnectionLost(None, "closed")
        request_id = message.setdefault("id", self._next_id())
        data = orjson.dumps(message)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, data)
        try:
            async with asyncio.timeout(self.request_timeout):
                await self._connected.wait()
                if self.state == "open" and self._ws is not None:
                    try:
                        await self._ws.send(data, text=True)
                    except ConnectionClosed:
                        pass  # re-sent with the same id once resumed
                return await future
        finally:
            self._pending.pop(request_id, None)

    async def _start_stream(self, message: dict[str, Any]) -> ClientStream:
        request_id = message.setdefault("id", self._next_id())
        handle = ClientStream(self, request_id)
        self._by_ref[request_id] = handle
        try:
            start = await self.request(message)
        finally:
            self._by_ref.pop(request_id, None)
        handle.provider, handle.model = start.get("provider"), start.get("model")
        handle.steered_from = start.get("steered_from")
        return handle

    async def generate(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        stream: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
        channel: str | None = None,
        tools: Iterable[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        max_steps: int | None = None,
        thread: str | None = None,
        on_busy: str | None = None,
    ) -> ClientStream:
        """Start a generation; returns once the server accepted it (``stream.start``).

        With ``channel``, the stream's frames are also published to that channel.
        ``tools`` (``{"name", "description"?, "parameters"?}``) and
        ``tool_choice`` (``"auto"``, ``"none"``, ``"required"`` or ``{"name"}``)
        let the model call tools: the stream then ends with reason
        ``tool_calls``, ``stream.tool_calls`` lists them, and the next
        generate carries ``stream.message`` and one ``{"role": "tool",
        "tool_call_id", "content"}`` message per call. With ``max_steps`` > 1
        the stream is an agent run that does that loop itself (tools may
        then have ``agent``, ``approval``, ``timeout_ms``). ``thread`` and
        ``on_busy`` (``"parallel"``, ``"queue"``, ``"interrupt"``,
        ``"reject"``) say what happens while a stream of the thread is going.
        """
        msg: dict[str, Any] = {"type": "generate", "messages": list(messages)}
        if tools is not None:
            msg["tools"] = [dict(t) for t in tools]
        options = dict(stream=stream, provider=provider, model=model, channel=channel, tool_choice=tool_choice)
        options.update(max_steps=max_steps, thread=thread, on_busy=on_busy)
        msg.update({k: v for k, v in options.items() if v is not None})
        if params is not None:
            msg["params"] = dict(params)
        return await self._start_stream(msg)

    async def subscribe(
        self, channel: str, *, since: int | None = None, epoch: str | None = None
    ) -> Subscription:
        """Subscribe to ``channel``; with ``since`` (and ``epoch``), first get what was missed."""
        sub = Subscription(self, channel, since, epoch)
        self._subscriptions[channel] = sub
        try:
            await self.request(sub._request())
        except BaseException:
            self._subscriptions.pop(channel, None)
            raise
        return sub

    async def publish(self, channel: str, data: Any) -> int:
        """Publish ``data`` (any JSON) on ``channel``; returns its offset."""
        reply = await self.request({"type": "publish", "channel": channel, "data": data})
        return int(reply["offset"])

    async def send(self, to: str, data: Any) -> None:
        """Send ``data`` straight to the agent named ``to``."""
        await self.request({"type": "send", "to": to, "data": data})

    async def tool_result(self, call: str, content: Any, *, stream: str | None = None) -> None:
        """Send the result of a call: of this session's run ``stream``, or
        (no ``stream``) of a call routed to this client's agent. ``content``: a
        string, a list of parts, or anything else (sent as JSON text)."""
        if not isinstance(content, (str, list)):
            content = content_of(content)
        message: dict[str, Any] = {"type": "tool_result", "call": call, "content": content}
        if stream is not None:
            message["stream"] = stream
        await self.request(message)

    async def ping(self) -> float:
        """Round trip of an application-level ping, in seconds."""
        t0 = time.perf_counter()
        await self.request({"type": "ping"})
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- reader

    async def _read_loop(self) -> ConnectionLost:
        ws = self._ws
        assert ws is not None
        try:
            async for raw in ws:
                self._dispatch(orjson.loads(raw))
        except ConnectionClosed:
            pass
        except Exception as error:  # a bug or garbage from the server
            logger.exception("client reader failed")
            await ws.close(1011)
            return ConnectionLost(1011, f"client reader failed: {error!r}")
        # close_code is the code the server sent, or 1006 if the TCP connection dropped
        return ConnectionLost(ws.close_code, ws.close_reason or "")

    def _dispatch(self, frame: dict[str, Any]) -> None:
        seq = frame.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                return  # already seen (a replay overlapping what arrived)
            self.last_seq = seq
            if seq - self._acked >= self.ack_every and self._ws is not None:
                self._acked = seq
                task = asyncio.get_running_loop().create_task(self._send_ack(seq))
                self._acks.add(task)
                task.add_done_callback(self._acks.discard)
        kind = frame.get("type")
        channel = frame.get("channel")
        if channel is not None and kind in ("message", "presence"):
            sub = self._subscriptions.get(channel)
            if sub is not None:
                sub._deliver(frame)
            return
        if kind == "shutdown":  # the server drains: reconnect after reconnect_ms
            self._reconnect_hint = frame.get("reconnect_ms", 0) / 1000
            return
        if kind == "message":
            self.inbox.put_nowait(DirectMessage(frame.get("from", ""), frame.get("data")))
            return
        if kind == "subscribed":
            sub = self._subscriptions.get(frame.get("channel", ""))
            if sub is not None:
                sub._subscribed(frame)
        if kind in _STREAM_FRAMES:  # deltas, tool calls, an agent run's waits, results, steps
            handle = self._streams.get(frame["stream"])
            if handle is not None:
                handle._frame(kind, frame)
            return
        if kind == "tool_call":  # a call routed to this client's agent
            self.tools.routed(frame)
            return
        if kind == "stream.start":
            handle = self._by_ref.get(frame.get("ref") or "")
            if handle is not None:
                handle.id = frame["stream"]
                self._streams[handle.id] = handle
        elif kind == "stream.snapshot":
            handle = self._streams.get(frame["stream"])
            if handle is not None:
                handle._snapshot(frame)
        elif kind == "stream.end":
            handle = self._streams.pop(frame["stream"], None)
            if handle is not None:
                handle._end(frame)
        ref = frame.get("ref")
        if ref is not None:
            entry = self._pending.get(ref)
            if entry is not None and not entry[0].done():
                if kind == "error":
                    entry[0].set_exception(server_error(frame))
                else:
                    entry[0].set_result(frame)
                return
            if kind == "error" and frame.get("code") == "duplicate_request" and ref in self._resent:
                self._resent.discard(ref)  # our re-send after a resume: answered already
                return
        if kind == "error":
            error = server_error(frame)
            self.unsolicited_errors.append(error)
            logger.warning("server error: %s", error)

    async def _send_ack(self, seq: int) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            await ws.send(orjson.dumps({"type": "ack", "seq": seq}), text=True)
        except ConnectionClosed:
            pass


class _Connecting:
    """``await connect(...)`` or ``async with connect(...) as client``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._client._open().__await__()

    async def __aenter__(self) -> Client:
        return await self._client._open()

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()


def connect(
    url: str = "ws://127.0.0.1:8765",
    *,
    hello: Mapping[str, Any] | None = None,
    request_timeout: float = 30.0,
    reconnect: bool = True,
    backoff: Backoff = Backoff(),
    ack_every: int = 256,
    on_state: Callable[[str, str], Any] | None = None,
    transport: str = "websocket",
    **ws_options: Any,
) -> _Connecting:
    """Open a client: ``async with connect(url) as client: ...``.

    ``hello`` adds fields to the ``hello`` message; ``reconnect=False`` turns
    automatic reconnection off; ``transport="sse"`` uses the HTTP transport
    (``GET /v1/events`` + ``POST /v1/send``) instead of a WebSocket, for
    networks that refuse the upgrade; ``ws_options`` go to
    :func:`websockets.asyncio.client.connect`.
    """
    return _Connecting(
        Client(
            url,
            request_timeout=request_timeout,
            reconnect=reconnect,
            backoff=backoff,
            ack_every=ack_every,
            hello=hello,
            on_state=on_state,
            transport=transport,
            **ws_options,
        )
    )
