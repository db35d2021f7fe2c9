"""One WebSocket connection: a thin pump around the sans-I/O protocol core.

Per connection there is the *reader* (the websockets handler), which feeds
text frames into :class:`~wsserver.core.protocol.ServerProtocol` and carries
out the actions it returns; and output, which is written at the end of the
event loop's turn in which it appeared (one ``call_soon`` callback, no task
switch) by ``broadcast()``, while no batch is in flight and the socket takes
data without waiting. Otherwise the *writer* task (created on first need) is
woken and sends, awaiting the socket. Either way every pending frame is
taken from the protocol at once (sequenced and, when the socket lags or a
provider hands over a burst, coalesced there) and only one batch is in
flight, which keeps frames in ``seq`` order although several stream tasks
produce output concurrently.

Where this layer leaks: ``await ws.send()`` does not yield to the event loop
until the write buffer passes ``write_limit``, so a stream task that never
awaits would starve everything else; providers yield between tokens (the
simulated one does ``await asyncio.sleep(0)`` when unpaced).

On a shared backplane, a ``hello`` for a session another node owns turns the
connection into a relay (:meth:`Connection._tunnel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import orjson
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ..cluster.backplane import LOCAL, Route
from ..core.actions import CloseConnection
from ..core.protocol import ConnState
from ..wire.codec import TunnelClose
from ..wire.errors import CloseCode
from ..wire.messages import SUBPROTOCOL
from .auth import token_from_request
from .runtime import SessionRuntime, carry_out

if TYPE_CHECKING:
    from ..cluster.tunnel import Tunnel
    from .app import Server
    from .auth import Identity

__all__ = ["MAX_BACKLOG", "Connection", "WebSocket", "hello_of"]

logger = logging.getLogger("wsserver.server")

#: Frames waiting for the writer beyond which the reader stops reading the
#: client's requests until the writer has caught up. A client that sends
#: requests but never reads the answers thus meets TCP backpressure instead
#: of growing the server's memory.
MAX_BACKLOG = 1024


class WebSocket(ServerConnection):
    """websockets' server connection, without the reference cycles it leaves
    behind when it closes.

    A closed ``ServerConnection`` is kept alive by cycles: the protocol and
    its parser generator, the connection and its transport (through the
    pause and resume callbacks of the incoming-message queue), the protocol
    and the subprotocol callback ``serve()`` binds to it, and, when the
    connection was dropped, the tracebacks of the errors it keeps. Without
    them refcounting frees a closed connection at once (about 60 objects);
    with them only a full collection of the cyclic garbage collector does,
    after they have piled up in its oldest generation, and under connection
    churn those collections took 100-300 ms each while the event loop, and
    every stream, waited. (websockets itself breaks its keepalive task's
    cycle in ``connection_lost`` for the same reason.)
    """

    def __init__(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, *args, **kwargs)
        # A plain function, not a method bound to the protocol: no cycle.
        protocol.select_subprotocol = select_subprotocol

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        protocol = self.protocol
        protocol.parser = None  # its generator's frame holds the protocol (EOF is seen already)
        self.recv_messages.pause = self.recv_messages.resume = _nothing  # bound to the transport
        # A dropped connection's errors (kept as the cause of ConnectionClosed)
        # hold, through their tracebacks, the frames of the parser and the
        # transport: the message is kept, the frames are let go.
        for error in (protocol.parser_exc, self.connection_exc):
            if error is not None:
                error.__traceback__ = None


def select_subprotocol(offered: Any) -> str | None:
    """``wsserver.v1`` if the client offers it; clients that offer no
    subprotocol are accepted too (websockets' default refuses them)."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def _nothing() -> None:
    return None


def client_ip(connection: ServerConnection) -> str:
    address = getattr(connection, "remote_address", None)
    return str(address[0]) if address else "?"


def hello_of(text: str) -> dict[str, Any] | None:
    """The fields of a ``hello`` (for routing before the protocol reads it), or None."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None  # refused by the protocol
    return msg if isinstance(msg, dict) and msg.get("type") == "hello" else None


class Connection:
    """The pump of one WebSocket connection."""

    __slots__ = (
        "_carry", "_done", "_flush_on_close", "_unsent", "_send_scheduled", "_writer", "busy", "close_with", "drained",
        "identity", "ip", "live", "proto", "reserved", "server", "tunnel", "wake", "ws",
    )

    def __init__(self, server: Server, ws: ServerConnection, identity: Identity | None) -> None:
        self.server = server
        self.ws = ws
        # made with the writer task, on first need (most connections never need it)
        self.wake: asyncio.Event | None = None
        self.drained: asyncio.Event | None = None  # set each time the writer finished a batch
        self.close_with: CloseConnection | None = None
        self.live: SessionRuntime | None = None
        self.busy = False  # the writer is sending a batch
        self._send_scheduled = False
        self._flush_on_close = False
        self._writer: asyncio.Task[None] | None = None
        self._done = False  # the reader finished: no writer is made any more
        #: Frames taken for an inline write that the socket would not take
        #: without waiting: the writer sends them first (a resume's replay).
        self._carry: list[bytes] = []
        #: Bytes of the frames taken from the protocol and not yet handed to
        #: the transport (the carry, the writer's batch): they count as waiting.
        self._unsent = 0
        self.ip = client_ip(ws)
        #: Who the handshake authenticated (None: the hello's token decides).
        self.identity = identity
        #: What the backplane settled for the next hello (Backplane.route()).
        self.reserved: Route = LOCAL
        #: The tunnel to the node that owns this connection's session, if it is relayed.
        self.tunnel: Tunnel | None = None
        self.proto = server.protocol_for(self)

    async def run(self) -> None:
        try:
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            if self._flush_on_close:  # a violation: send the error first
                with contextlib.suppress(ConnectionClosed):
                    if self._writer is not None:
                        self._writer.cancel()
                    await self._flush()
            self.proto.release()
            if self.live is not None:
                self.live.detach(self)  # a dropped socket never cancels anything
            # No writer from now on, and the one there is ends here: a send
            # scheduled before (or during the flush above, which may have made
            # one) must not leave a task pending forever ("Task was destroyed
            # but it is pending!" once the connection is collected).
            self._done = True
            writer = self._writer
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
        self._close_or_abort(CloseCode.SESSION_TAKEN_OVER, "session taken over")

    async def _read_loop(self) -> None:
        ws, proto, server = self.ws, self.proto, self.server
        telemetry = server.telemetry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + server.config.hello_timeout
        while self.close_with is None:
            if proto.state is ConnState.AWAITING_HELLO:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await ws.recv()
                except TimeoutError:
                    self.close_with = CloseConnection(CloseCode.HELLO_TIMEOUT, "no hello in time")
                    return
                if server.backplane.shared and isinstance(data, str):
                    route = await server.route_hello(data, self.identity)
                    if route is not None:
                        if route.connect is not None:
                            await self._tunnel(route, data)
                            return
                        self.reserved = route
            else:
                data = await ws.recv()
            telemetry.bytes_in.inc(len(data))
            if isinstance(data, str):
                actions = proto.receive_text(data)
                telemetry.messages_in.labels(proto.last_type).inc()
            else:
                actions = proto.receive_binary(data)
                telemetry.messages_in.labels("binary").inc()
            close = await carry_out(self, actions)
            if close is not None:
                self.close_with = close
                self._flush_on_close = True  # the error goes out before the close
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
        through ``broadcast()``; else wake the writer, which awaits the socket.

        An inline write stops at the first frame that pushes the buffer past
        ``write_limit``: the writer sends the rest as the client reads, so a
        long replay never piles up in the transport's buffer (where the
        slow-consumer limit would count it against a client that reads).
        """
        self._send_scheduled = False
        if self._done:  # (a violation's error is flushed by run() itself)
            return
        ws = self.ws
        session = self.proto.session
        # (a shared backplane: the writer writes the frames to it before it sends them)
        journaled = session is not None and session.out.journal is not None
        if self.busy or ws.paused or ws.protocol.state is not State.OPEN or journaled:
            self._wake_writer()
            return
        frames = self.proto.data_to_send()
        if not frames:
            return
        target = (ws,)
        sent = 0
        for frame in frames:
            broadcast(target, frame, text=True)
            sent += 1
            if ws.paused:  # past write_limit now
                break
        fanout = self.server.fanout
        if sent < len(frames):
            self._carry = frames[sent:]
            self._unsent = sum(map(len, self._carry))
            self.busy = True  # nothing overtakes the carried frames (channel traffic waits too)
            self._wake_writer()
            frames = frames[:sent]
        elif ws.paused:  # watched until it drains
            fanout.lagging.add(self)
        fanout.count(frames)  # (no delivery_seconds sample: an inline write does not wait)

    def _wake_writer(self) -> None:
        if self._done:
            return
        self.server.fanout.lagging.add(self)
        if self._writer is None:
            self.wake, self.drained = asyncio.Event(), asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        assert self.wake is not None
        self.wake.set()

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
        if self._carry:
            frames, self._carry = self._carry + frames, []
        self._unsent = sum(map(len, frames))
        try:
            await self.server.backplane.write_log(self.proto.session)  # before the client sees a seq
            for frame in frames:
                self._unsent -= len(frame)
                await send(frame, text=True)
        finally:
            self._unsent = 0
            self.busy = False
            telemetry = self.server.telemetry
            telemetry.frames_out.inc(len(frames))
            telemetry.bytes_out.inc(sum(map(len, frames)))

    # ------------------------------------------------------------- relayed

    async def _tunnel(self, route: Route, hello: str) -> None:
        """Relay this connection to the node that owns its session, until either side ends."""
        assert route.connect is not None
        try:
            tunnel = await route.connect()
        except Exception as exc:  # Redis went away right now: the client tries again
            logger.warning("could not open a tunnel to node %s: %r", route.owner, exc)
            self.close_with = CloseConnection(CloseCode.TRY_AGAIN_LATER, "try again")
            return
        self.tunnel = tunnel
        self.server.fanout.lagging.add(self)  # watched for the slow-consumer limit while relayed
        request = self.ws.request
        token = token_from_request(request.path, request.headers.get("Authorization")) if request else None
        tunnel.open(hello, token, self.ip)
        relay = asyncio.get_running_loop().create_task(self._relay(tunnel))
        try:
            while self.close_with is None and not relay.done():
                data = await self.ws.recv()
                if isinstance(data, str):
                    tunnel.send_text(data)
                else:
                    tunnel.send_binary()
        finally:
            relay.cancel()
            await tunnel.close()

    async def _relay(self, tunnel: Tunnel) -> None:
        """Frames from the owner to the client; a close from the owner closes the connection."""
        while True:
            received = await tunnel.receive()
            if isinstance(received, TunnelClose):
                self.close_with = CloseConnection(received.code, received.reason)
                with contextlib.suppress(ConnectionClosed):
                    await self.ws.close(received.code, received.reason)
                return
            for frame in received:
                await self.ws.send(frame, text=True)

    def close_lost(self) -> None:
        """The tunnel's owner (or Redis) was lost: close with 1012; the client resumes."""
        self._close_or_abort(CloseCode.SERVICE_RESTART, "session node lost; resume")

    # -------------------------------------------------------- slow consumers

    def pending_bytes(self) -> int:
        """Output waiting for this client: the transport's write buffer, the
        frames taken for it and not written yet, the encoded frames queued in
        its session, and ~64 bytes per other frame. (A frame moving from the
        writer to the transport does not change the sum: only new output and
        the client's reading do.)"""
        transport = self.ws.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        session = self.proto.session
        queued = session.out.pending_raw_bytes if session is not None else 0
        relayed = self.tunnel.backlog if self.tunnel is not None else 0
        return buffered + self._unsent + queued + relayed + 64 * self.proto.backlog

    def lagging(self) -> bool:
        """Output may still back up here (the monitor keeps watching)."""
        return self.close_with is None and (
            self.busy or self.ws.paused or self.proto.has_output or self.tunnel is not None
        )

    def close_slow(self) -> None:
        """A slow consumer: close with 1013 (aborted after close_timeout)."""
        self._close_or_abort(CloseCode.TRY_AGAIN_LATER, "slow consumer")

    def _close_or_abort(self, code: int, reason: str) -> None:
        """Unless closing already: start the closing handshake, and abort the
        transport after close_timeout.

        Where websockets leaks: ``ws.close()`` first waits for the write
        buffer to drain, and only then starts its own close_timeout, so
        against a peer that has stopped reading it never returns and the
        connection (with everything queued for it) stays forever.
        """
        if self.close_with is not None:
            return
        self.close_with = CloseConnection(code, reason)
        self.server.spawn(self.ws.close(code, reason))
        asyncio.get_running_loop().call_later(self.server.config.close_timeout, self.ws.transport.abort)
