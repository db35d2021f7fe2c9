"""A client connected to another node, whose session lives here (Redis backplane).

The other node relays the client's messages (:meth:`TunnelledConnection.feed`)
and the frames this side sends back through the tunnel's end; everything
else is what a :class:`~wsserver.server.connection.Connection` does: one
protocol state machine, one writer, the log written before a frame leaves.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..cluster.backplane import LOCAL, Route
from ..core.actions import CloseConnection
from ..core.protocol import ConnState
from ..wire.errors import CloseCode
from .connection import hello_of
from .runtime import SessionRuntime, carry_out

if TYPE_CHECKING:
    from ..cluster.tunnel import TunnelEnd
    from .app import Server
    from .auth import Identity

__all__ = ["TunnelledConnection", "TunnelledConnections"]


class TunnelledConnection:
    """The owner's side of a relayed client connection."""

    busy = True  # channel traffic is queued with the session's frames, never broadcast here
    ws = None

    def __init__(self, server: Server, end: TunnelEnd, ip: str, identity: Identity | None) -> None:
        self.server = server
        self.end = end
        self.ip = ip
        self.identity = identity
        self.reserved: Route = LOCAL
        self.live: SessionRuntime | None = None
        self.wake = asyncio.Event()
        self.close_with: CloseConnection | None = None
        self._inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.proto = server.protocol_for(self)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._write_loop())]

    @property
    def node(self) -> str:
        """The client's node."""
        return self.end.node

    def feed(self, text: str | bytes) -> None:
        self._inbox.put_nowait(text)

    def send_soon(self) -> None:
        self.wake.set()

    async def _read_loop(self) -> None:
        proto, backplane = self.proto, self.server.backplane
        while self.close_with is None:
            text = await self._inbox.get()
            if text is None:
                return
            if isinstance(text, bytes):
                self.close_with = await carry_out(self, proto.receive_binary(text))
            else:
                hello = hello_of(text) if proto.state is ConnState.AWAITING_HELLO else None
                if hello is not None and self.server.hello_admitted(text, self.identity):
                    self.reserved = await backplane.reserve_agent(hello)
                self.close_with = await carry_out(self, proto.receive_text(text))
            if proto.has_output or self.close_with is not None:
                self.wake.set()

    async def _write_loop(self) -> None:
        backplane, proto = self.server.backplane, self.proto
        while True:
            await self.wake.wait()
            self.wake.clear()
            frames = proto.data_to_send()
            await backplane.write_log(proto.session)
            if frames:
                self.end.send_frames(frames)
            if self.close_with is not None:
                self._close(self.close_with.code, self.close_with.reason)
                return

    def send_close(self, code: int, reason: str) -> None:
        """Tell the client's node to close the client's connection with ``code``."""
        self.end.send_close(code, reason)

    def _close(self, code: int, reason: str) -> None:
        self.send_close(code, reason)
        self.server.tunnels.forget(self.end.id)
        self.stop()

    def take_over(self) -> None:
        """Another connection resumed the session: the client's node closes with 4000."""
        self.proto.release()
        self.live = None
        self._close(CloseCode.SESSION_TAKEN_OVER, "session taken over")

    def stop(self) -> None:
        """The client left (or its node was lost): detach, as a dropped socket does.

        The reader finishes the request it is on (a backplane call cut in the
        middle would leave channel traffic held back) and then stops.
        """
        self.close_with = self.close_with or CloseConnection(CloseCode.GOING_AWAY, "tunnel closed")
        self.proto.release()
        if self.live is not None:
            self.live.detach(self)
        self._inbox.put_nowait(None)
        self._tasks[1].cancel()  # the writer


class TunnelledConnections:
    """The relayed clients this node serves, by tunnel id."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._by_id: dict[str, TunnelledConnection] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, end: TunnelEnd, hello: str, token: str | None, ip: str) -> None:
        """A client reached ``end.node`` with a hello for a session of ours: serve it."""
        server = self._server
        if not server.accepting:  # (this node is going away: resume elsewhere)
            end.send_close(CloseCode.SERVICE_RESTART, "node draining; resume again")
            return
        identity = server.auth.verify(token) if token is not None and server.auth.enabled else None
        conn = self._by_id[end.id] = TunnelledConnection(server, end, ip, identity)
        conn.feed(hello)

    def input(self, tunnel: str, data: str | bytes) -> None:
        """A client message relayed from the client's node (``bytes``: a binary frame)."""
        conn = self._by_id.get(tunnel)
        if conn is not None:
            conn.feed(data)

    def close(self, tunnel: str, *, code: int | None = None) -> None:
        """The client's node closed the tunnel (or is gone); with ``code``, tell it to close the client."""
        conn = self._by_id.pop(tunnel, None)
        if conn is not None:
            if code is not None:
                conn.send_close(code, "session node lost; resume")
            conn.stop()

    def forget(self, tunnel: str) -> None:
        self._by_id.pop(tunnel, None)

    def peers(self) -> set[str]:
        """Nodes whose clients are tunnelled here."""
        return {conn.node for conn in self._by_id.values()}

    def node_lost(self, node: str | None) -> None:
        """End the tunnels from ``node`` (None: from every node)."""
        for tunnel in [t for t, conn in self._by_id.items() if node in (None, conn.node)]:
            self.close(tunnel)
