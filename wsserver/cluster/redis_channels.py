"""Channels shared through Redis: offsets, epochs, history and presence live
there; this node keeps only which of its sessions subscribe to what.

A publication is one script (``INCR``, ``XADD``, ``PUBLISH``): every node
listening to the channel's pub/sub channel gets ``"{offset} {frame}"`` and
queues a delivery for its own subscribers (pulled by the server, which
broadcasts the frame once to all of them).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import orjson

from ..core.channels import Delivery
from ..wire.codec import channel_message_parts, presence_parts
from ..wire.messages import Publish, Subscribe
from .redis_util import eval_in, skey

if TYPE_CHECKING:
    from ..core.session import Session
    from .redis import RedisBackplane

__all__ = ["RedisChannels"]


def pubsub_name(channel: str) -> str:
    return f"wss:c:{channel}"


class RedisChannels:
    """This node's side of the shared channels.

    Args:
        history_size, history_ttl: what each channel keeps for recovery.
        history_bytes, history_bytes_per_publisher: what all histories may
            hold together, and the messages of one publisher in them (the
            channel script trims them, oldest first).
    """

    def __init__(
        self,
        backplane: RedisBackplane,
        *,
        history_size: int,
        history_ttl: float,
        history_bytes: int = 128 << 20,
        history_bytes_per_publisher: int = 16 << 20,
    ) -> None:
        self._bp = backplane
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.history_bytes = history_bytes
        self.history_bytes_per_publisher = history_bytes_per_publisher
        #: This node's subscribed sessions per channel, in subscription order.
        self.local: dict[str, dict[Session, None]] = {}
        self._deliveries: list[Delivery] = []

    # ------------------------------------------------------------ deliveries

    def deliver(self, name: str, offset: int, frame: bytes) -> None:
        """A publication arrived from Redis: queue it for this node's subscribers."""
        subscribers = self.local.get(name)
        if subscribers:
            deliveries = self._deliveries
            deliveries.append((name, offset, frame, list(subscribers)))
            if len(deliveries) == 1:
                self._bp.events.deliveries_pending()

    def take_deliveries(self) -> list[Delivery]:
        deliveries, self._deliveries = self._deliveries, []
        return deliveries

    def listening(self) -> set[str]:
        """The pub/sub channels of the channels this node has subscribers on."""
        return {pubsub_name(name) for name, subscribers in self.local.items() if subscribers}

    def has_subscribers(self, name: str) -> bool:
        return bool(self.local.get(name))

    # ------------------------------------------------------------ operations

    def args(
        self,
        name: str,
        op: str,
        a6: Any = "",
        a7: Any = "",
        a8: Any = "",
        joined: str = "",
        presence: bytes = b"}",
        publisher: str = "",
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the channel script (see :mod:`~wsserver.cluster.redis_scripts`)."""
        keys = [f"wss:c:{name}:e", f"wss:c:{name}:o", f"wss:c:{name}:h", f"wss:c:{name}:m"]
        epoch = secrets.token_hex(4)  # used only if the channel has none yet
        head = presence_parts(name)[0]
        args = [op, self.history_ttl, self.history_size, pubsub_name(name), epoch, a6, a7, a8, head, joined, presence]
        args += [self.history_bytes, self.history_bytes_per_publisher, publisher]
        return keys, args

    def publish_nowait(self, channel: str, sender: str, data: bytes, publisher: str = "") -> None:
        """A stream's frame into ``channel``: published in order, not awaited
        (dropped during an outage, like the stream's other watchers' view)."""
        head, tail = channel_message_parts(channel, sender, data)
        keys, args = self.args(channel, "pub", head, tail, publisher=publisher)
        bp = self._bp
        if bp.healthy:
            script = bp.scripts["channel"]
            bp.enqueue(lambda pipe: eval_in(pipe, script, keys, args), wait=False)

    async def publish(self, session: Session, msg: Publish, encoded: bytes) -> None:
        head, tail = channel_message_parts(msg.channel, session.name, encoded)
        keys, args = self.args(msg.channel, "pub", head, tail, publisher=session.members.account)
        offset = await self._bp.scripts["channel"](keys=keys, args=args)
        session.members.published(msg, int(offset))

    async def subscribe(self, session: Session, msg: Subscribe) -> None:
        name = msg.channel
        await self._bp.listen(pubsub_name(name))  # confirmed before the offset is read: nothing slips between
        subscribers = self.local.setdefault(name, {})
        joined = session not in subscribers
        subscribers[session] = None
        keys, args = self.args(
            name,
            "sub",
            session.name,
            "" if msg.since is None else str(msg.since),
            msg.epoch or "",
            "1" if joined else "0",
            presence_parts(name, joined=session.name)[1],
        )
        epoch, offset, recovered, missed, members = await self._bp.scripts["channel"](keys=keys, args=args)
        session.members.subscribed(
            msg, epoch.decode(), int(offset), bool(recovered), sorted(m.decode() for m in members), list(missed)
        )
        self.save_subscriptions(session)

    def subscribe_failed(self, session: Session, name: str) -> None:
        """A subscribe that did not happen: not a local subscriber (unless it was before)."""
        subscribers = self.local.get(name)
        if subscribers is not None and name not in session.subscriptions:
            subscribers.pop(session, None)

    def unsubscribe(self, name: str, session: Session) -> None:
        subscribers = self.local.get(name)
        if subscribers is None or session not in subscribers:
            return
        del subscribers[session]
        keys, args = self.args(name, "leave", session.name, presence=presence_parts(name, left=session.name)[1])
        script = self._bp.scripts["channel"]
        self._bp.later(session.id, lambda pipe: eval_in(pipe, script, keys, args))
        self.save_subscriptions(session)

    def leave_all(self, session: Session) -> None:
        for name in list(session.subscriptions):
            self.unsubscribe(name, session)
        session.subscriptions.clear()

    def restore(self, session: Session) -> None:
        """An adopted session's subscriptions: local subscribers again (paused until it resumes)."""
        for name in session.subscriptions:
            self.local.setdefault(name, {})[session] = None

    def save_subscriptions(self, session: Session) -> None:
        subs = orjson.dumps(sorted(session.subscriptions))
        self._bp.later(session.id, lambda pipe: pipe.hset(skey(session.id), "subs", subs))

    def sweep(self) -> None:
        """Forget channels with no subscriber here, and stop listening to them."""
        gone = [name for name, subscribers in self.local.items() if not subscribers]
        for name in gone:
            del self.local[name]
            self._bp.unlisten_nowait(pubsub_name(name))
