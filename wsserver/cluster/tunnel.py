"""Tunnels: a client connected to one node, served by the node that owns its session.

The client's node relays (:class:`Tunnel`): it sends the owner an ``open``
with the client's ``hello``, then every client message, and hands the
client what comes back. The owner (:class:`TunnelEnd`) runs the session as
for a direct connection and sends back frames or a close. Both directions
go over Redis pub/sub: control messages on the owner's node channel, frames
on the tunnel's own channel (their bytes are the codec's tunnel frames).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..wire.codec import TunnelClose, read_tunnel, tunnel_close, tunnel_frames

if TYPE_CHECKING:
    from .redis import RedisBackplane

__all__ = ["Tunnel", "TunnelEnd", "TunnelInbox"]


class TunnelInbox:
    """What the owner sent through a tunnel, waiting for the client's socket.

    ``bytes`` counts toward the connection's slow-consumer limit, so a client
    that stops reading is closed (1013) here as it would be on the owner.
    """

    __slots__ = ("_queue", "bytes")

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.bytes = 0

    def put(self, data: bytes) -> None:
        self.bytes += len(data)
        self._queue.put_nowait(data)

    async def get(self) -> bytes:
        data = await self._queue.get()
        self.bytes -= len(data)
        return data


class Tunnel:
    """The client's side: relays one connection to the session's owner."""

    def __init__(self, backplane: RedisBackplane, tunnel_id: str, owner: str) -> None:
        self._backplane = backplane
        self.id = tunnel_id
        self.owner = owner
        self.inbox = TunnelInbox()

    @property
    def backlog(self) -> int:
        """Bytes relayed from the owner that the client's socket has not taken yet."""
        return self.inbox.bytes

    def _control(self, msg: dict[str, Any]) -> None:
        self._backplane.send_to_node(self.owner, {**msg, "tunnel": self.id})

    def open(self, hello: str, token: str | None, ip: str) -> None:
        self._control({"op": "open", "node": self._backplane.node, "hello": hello, "token": token, "ip": ip})

    def send_text(self, text: str) -> None:
        self._control({"op": "in", "text": text})

    def send_binary(self) -> None:
        """A binary frame: refused there as here (``binary_frame``); its bytes do not matter."""
        self._control({"op": "in", "binary": True})

    async def receive(self) -> list[bytes] | TunnelClose:
        """The next frames from the owner, or the close it asks for."""
        return read_tunnel(await self.inbox.get())

    async def close(self) -> None:
        self._control({"op": "close"})
        await self._backplane.close_tunnel(self.id)


class TunnelEnd:
    """The owner's side: where the session's frames for a relayed client go."""

    def __init__(self, backplane: RedisBackplane, tunnel_id: str, node: str) -> None:
        self._backplane = backplane
        self.id = tunnel_id
        #: The client's node.
        self.node = node

    def send_frames(self, frames: list[bytes]) -> None:
        self._backplane.send_to_tunnel(self.id, tunnel_frames(frames))

    def send_close(self, code: int, reason: str) -> None:
        """Tell the client's node to close the client's connection with ``code``."""
        self._backplane.send_to_tunnel(self.id, tunnel_close(code, reason))
