"""The Redis backplane's pub/sub listener: channel publications, control
messages for this node (tunnels, direct messages), and frames coming back
through this node's tunnels.

Pub/sub channels::

    wss:c:{c}        "{offset} {frame}" of every publication on channel c
    wss:n:{n}        control messages to node n (JSON with "op")
    wss:p:{tunnel}   frames from a session's owner to the tunnelling node

A subscription is *confirmed* before anything that depends on it reads from
Redis (a channel's offset, say), so nothing published in between is missed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson

from .redis_util import DOWN, suppress_down
from .tunnel import TunnelEnd

if TYPE_CHECKING:
    from .redis import RedisBackplane

__all__ = ["PubSub"]

logger = logging.getLogger("wsserver.backplane")


class PubSub:
    def __init__(self, backplane: RedisBackplane) -> None:
        self._bp = backplane
        self._pubsub: Any = None
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """(Re)connect, listening to everything this node listened to before."""
        bp = self._bp
        old, self._pubsub = self._pubsub, bp.redis.pubsub()
        if self._listener is not None:
            self._listener.cancel()
        if old is not None:
            with suppress_down():
                await old.aclose()
        # Everything this node listened to, or is about to (a listen() waiting
        # on the old connection is confirmed by the new one).
        names = {f"wss:n:{bp.node}".encode(), *self._confirmed}
        names |= {name.encode() for name in bp.channels.listening()}
        names |= {f"wss:p:{tid}".encode() for tid in bp.tunnels}
        loop = asyncio.get_running_loop()
        for name in names:
            if name not in self._confirmed or self._confirmed[name].done():
                self._confirmed[name] = loop.create_future()
        await self._pubsub.subscribe(*names)  # (connects; the listener reads the confirmations)
        self._listener = loop.create_task(self._listen_loop(self._pubsub))
        await asyncio.wait_for(asyncio.shield(self._confirmed[f"wss:n:{bp.node}".encode()]), 5.0)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        if self._pubsub is not None:
            with suppress_down():
                await self._pubsub.aclose()

    async def listen(self, channel: str) -> None:
        """Subscribe this node to ``channel`` and wait until Redis confirmed it."""
        key = channel.encode()
        future = self._confirmed.get(key)
        if future is None:
            future = self._confirmed[key] = asyncio.get_running_loop().create_future()
            try:
                await self._pubsub.subscribe(channel)
            except BaseException:
                del self._confirmed[key]
                raise
        await asyncio.wait_for(asyncio.shield(future), 5.0)

    def forget(self, channel: str) -> None:
        """A ``listen()`` that failed half way: no confirmation is awaited any more."""
        self._confirmed.pop(channel.encode(), None)

    def unlisten_nowait(self, channel: str) -> None:
        if channel.encode() in self._confirmed:
            self._bp.spawn(self.unlisten(channel))

    async def unlisten(self, channel: str) -> None:
        if channel.startswith("wss:c:") and self._bp.channels.has_subscribers(channel[6:]):
            return  # subscribed again meanwhile
        if self._confirmed.pop(channel.encode(), None) is not None and self._bp.healthy:
            with suppress_down():
                await self._pubsub.unsubscribe(channel)

    async def _listen_loop(self, pubsub: Any) -> None:
        try:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
                if msg is None:
                    continue
                kind, channel, data = msg["type"], msg["channel"], msg["data"]
                if kind == b"subscribe" or kind == "subscribe":
                    future = self._confirmed.get(channel)
                    if future is not None and not future.done():
                        future.set_result(None)
                elif kind == b"message" or kind == "message":
                    try:
                        self._dispatch(channel, data)
                    except Exception:  # one bad message must not stop the node's listener
                        logger.exception("backplane message on %r failed", channel)
        except asyncio.CancelledError:
            raise
        except DOWN as exc:
            self._bp.down(exc)
        except Exception as exc:  # a deaf node is worse than a reconnect
            logger.exception("backplane listener failed")
            self._bp.down(exc)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        bp = self._bp
        if channel.startswith(b"wss:c:"):
            offset, _, frame = data.partition(b" ")
            bp.channels.deliver(channel[6:].decode(), int(offset), frame)
        elif channel.startswith(b"wss:p:"):
            tunnel = bp.tunnels.get(channel[6:].decode())
            if tunnel is not None:
                tunnel.inbox.put(data)
        else:
            self._control(orjson.loads(data))

    def _control(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        bp = self._bp
        events = bp.events
        if op == "dm":
            bp.spawn(bp.take_direct_messages(msg["sid"]))
        elif op == "result":
            bp.spawn(bp.take_results(msg["sid"]))
        elif op == "open":
            end = TunnelEnd(bp, msg["tunnel"], msg["node"])
            events.tunnel_opened(end, msg["hello"], msg.get("token"), msg.get("ip", "?"))
        elif op == "in":
            events.tunnel_input(msg["tunnel"], b"" if msg.get("binary") else msg["text"])
        elif op == "close":
            events.tunnel_closed(msg["tunnel"])
        else:
            logger.warning("unknown backplane control message %r", op)
