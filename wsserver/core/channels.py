"""Channels, presence and the agent directory of one process (sans-I/O).

This is the memory backplane's state. A channel message is encoded ONCE,
stored once in the channel's history and queued as a *delivery* (the frame
and the sessions subscribed to it) that the transport pulls with
:meth:`Channels.take_deliveries` and sends to every attached subscriber with
``websockets.broadcast()``. That is why channel traffic carries a
per-channel ``offset`` (and an ``epoch`` that changes whenever the channel's
history starts afresh) instead of each recipient's ``seq``.

Presence events (``presence {channel, offset, joined|left}``) are channel
traffic too: they take an offset and enter the history. A session is a
member of a channel from its first ``subscribe`` until it unsubscribes or
ends; a detached session stays present until it expires.

History is bounded per channel (messages, age) and in bytes: all channels
together (``history_bytes``) and per publisher (``history_bytes_per_publisher``:
the identity a publication counts against). Past a bound the oldest entries
go first, always from the front of a channel's history, so what a channel
still holds stays contiguous and recovery by offset stays exact.

:meth:`Channels.carry_out` answers a session's
:class:`~wsserver.core.actions.MessagingCall` at once (the memory backplane
has nothing to wait for). Nothing here touches a socket; time and the epoch
generator are injectable.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..wire.codec import channel_message, compact, presence
from ..wire.messages import Publish, Send, Subscribe

if TYPE_CHECKING:
    from .actions import MessagingCall
    from .session import Session

__all__ = ["HISTORY_ENTRY_OVERHEAD", "Channel", "Channels", "Delivery"]

#: A frame for the attached ones among the sessions: (channel, offset, frame, sessions).
Delivery = tuple[str, int, bytes, list["Session"]]

#: Bytes counted per history entry beyond its frame (the tuples that hold it).
HISTORY_ENTRY_OVERHEAD = 160


@dataclass(eq=False)
class Channel:
    name: str
    epoch: str
    #: Offset of the newest message (0 before the first).
    offset: int = 0
    #: (offset, time, frame, publisher) of the newest messages, oldest first.
    history: deque[tuple[int, float, bytes, str]] = field(default_factory=deque)
    #: Subscribed sessions, in subscription order.
    subscribers: dict[Session, None] = field(default_factory=dict)
    #: Subscribed sessions per name (several sessions may share an agent
    #: name): presence is decided in O(1) per join and leave.
    names: dict[str, int] = field(default_factory=dict)

    @property
    def members(self) -> list[str]:
        return sorted(self.names)


class Channels:
    """Every channel and agent name of one server (the memory backplane).

    Args:
        history_size, history_ttl: each channel keeps at most this many
            messages, none older than this many seconds.
        history_bytes: what the histories of all channels may hold together.
        history_bytes_per_publisher: what the messages of one publisher may
            hold in all histories together (presence events count only in
            the total).
        clock: wall-clock-like time in seconds (for history age).
        new_epoch: makes a channel's epoch.
        on_output: called when a delivery becomes pending (the transport's
            wake-up); the transport pulls them with :meth:`take_deliveries`.
    """

    def __init__(
        self,
        *,
        history_size: int = 1000,
        history_ttl: float = 300.0,
        history_bytes: int = 128 << 20,
        history_bytes_per_publisher: int = 16 << 20,
        clock: Callable[[], float] = time.monotonic,
        new_epoch: Callable[[], str] = lambda: secrets.token_hex(4),
        on_output: Callable[[], Any] | None = None,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.history_bytes = history_bytes
        self.history_bytes_per_publisher = history_bytes_per_publisher
        #: What all histories hold (frames and HISTORY_ENTRY_OVERHEAD each), and how many entries.
        self.held_bytes = 0
        self.held_entries = 0
        #: Every entry appended, oldest first: (channel, offset); entries gone
        #: from their channel already are skipped (and compacted away).
        self._order: deque[tuple[Channel, int]] = deque()
        #: Per publisher: [bytes held, entries held, its entries oldest first].
        self.publishers: dict[str, list[Any]] = {}
        self.clock = clock
        self.new_epoch = new_epoch
        self.on_output = on_output
        self.channels: dict[str, Channel] = {}
        #: Agent name -> the session that holds it (attached or detached).
        self.agents: dict[str, Session] = {}
        self._deliveries: list[Delivery] = []

    # ----------------------------------------------------------------- agents

    def claim_agent(self, name: str, session: Session) -> bool:
        """Give ``name`` to ``session``; False if another live session holds it."""
        holder = self.agents.get(name)
        if holder is not None and holder is not session:
            return False
        self.agents[name] = session
        return True

    def release_agent(self, session: Session) -> None:
        if session.agent is not None and self.agents.get(session.agent) is session:
            del self.agents[session.agent]

    # --------------------------------------------------------------- channels

    def channel(self, name: str) -> Channel:
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(name, epoch=self.new_epoch())
        return channel

    def subscribe(
        self, name: str, session: Session, since: int | None, epoch: str | None
    ) -> tuple[Channel, bool, list[bytes], bool]:
        """Subscribe ``session``; returns ``(channel, recovered, missed frames, joined)``.

        ``recovered`` is True when ``since`` was given and every message after
        it is in ``missed``; a different ``epoch``, or a history that no longer
        reaches ``since + 1``, gives False and no frames. Subscribing again
        (after a resume) is recovery, not a second subscription.
        """
        channel = self.channel(name)
        self._trim(channel)
        recovered, missed = False, []
        if since is not None and (epoch is None or epoch == channel.epoch):
            if since >= channel.offset:
                recovered = since == channel.offset
            else:
                first = channel.history[0][0] if channel.history else channel.offset + 1
                if first <= since + 1:
                    recovered = True
                    missed = [entry[2] for entry in channel.history if entry[0] > since]
        joined = session not in channel.subscribers
        if joined:
            channel.subscribers[session] = None
            names = channel.names
            names[session.name] = names.get(session.name, 0) + 1
        return channel, recovered, missed, joined

    def unsubscribe(self, name: str, session: Session) -> bool:
        channel = self.channels.get(name)
        if channel is None or session not in channel.subscribers:
            return False
        del channel.subscribers[session]
        name, names = session.name, channel.names
        left = names[name] - 1
        if left:
            names[name] = left
        else:
            del names[name]
            self.publish_presence(channel, left=name)
        return True

    def join_announce(self, channel: Channel, session: Session) -> None:
        if channel.names.get(session.name) == 1:
            self.publish_presence(channel, joined=session.name)

    def leave_all(self, session: Session) -> None:
        """The session ended: it leaves every channel and frees its agent name."""
        for name in list(session.subscriptions):
            self.unsubscribe(name, session)
        session.subscriptions.clear()
        self.release_agent(session)

    def publish(self, name: str, sender: str, data: bytes, publisher: str = "") -> int:
        """Publish ``data`` (already JSON) on channel ``name``; returns its offset.

        ``publisher``: whose history bound the message counts against."""
        channel = self.channel(name)
        offset = channel.offset + 1
        self._append(channel, offset, channel_message(name, offset, sender, data), publisher)
        return offset

    def publish_nowait(self, channel: str, sender: str, data: bytes, publisher: str = "") -> None:
        """A stream's frame into ``channel`` (see :class:`~wsserver.core.messaging.ChannelSink`)."""
        self.publish(channel, sender, data, publisher)

    def publish_presence(self, channel: Channel, *, joined: str | None = None, left: str | None = None) -> int:
        offset = channel.offset + 1
        self._append(channel, offset, presence(channel.name, offset, joined=joined, left=left))
        return offset

    def _append(self, channel: Channel, offset: int, frame: bytes, publisher: str = "") -> None:
        channel.offset = offset
        frame = compact(frame)  # kept in the history
        history = channel.history
        history.append((offset, self.clock(), frame, publisher))
        self._count(channel, offset, len(frame) + HISTORY_ENTRY_OVERHEAD, publisher)
        if len(history) > self.history_size:
            self._drop_front(channel)
        if channel.subscribers:
            deliveries = self._deliveries
            deliveries.append((channel.name, offset, frame, list(channel.subscribers)))
            if len(deliveries) == 1 and self.on_output is not None:
                self.on_output()

    def take_deliveries(self) -> list[Delivery]:
        """The frames queued for subscribers since the last call, in order."""
        deliveries, self._deliveries = self._deliveries, []
        return deliveries

    def _trim(self, channel: Channel) -> None:
        horizon = self.clock() - self.history_ttl
        history = channel.history
        while history and history[0][1] < horizon:
            self._drop_front(channel)

    # ----------------------------------------------------- history in bytes

    def _count(self, channel: Channel, offset: int, size: int, publisher: str) -> None:
        """A new history entry: count it, then enforce the byte bounds (oldest first)."""
        self.held_bytes += size
        self.held_entries += 1
        order = self._order
        order.append((channel, offset))
        if publisher:
            use = self.publishers.get(publisher)
            if use is None:
                use = self.publishers[publisher] = [0, 0, deque()]
            use[0] += size
            use[1] += 1
            use[2].append((channel, offset))
            while use[0] > self.history_bytes_per_publisher and use[2]:
                self._evict(*use[2].popleft())
            if len(use[2]) > 2 * use[1] + 64:
                use[2] = deque(entry for entry in use[2] if _held(*entry))
        while self.held_bytes > self.history_bytes and order:
            self._evict(*order.popleft())
        if len(order) > 2 * self.held_entries + 64:  # entries gone by age or count: compact
            self._order = deque(entry for entry in order if _held(*entry))

    def _evict(self, channel: Channel, offset: int) -> None:
        """Forget ``channel``'s history up to ``offset`` (the oldest entries of a bound)."""
        history = channel.history
        while history and history[0][0] <= offset:
            self._drop_front(channel)

    def _drop_front(self, channel: Channel) -> None:
        """Every entry leaves a history here (age, count or bytes), so the counts stay exact."""
        _, _, frame, publisher = channel.history.popleft()
        size = len(frame) + HISTORY_ENTRY_OVERHEAD
        self.held_bytes -= size
        self.held_entries -= 1
        if publisher:
            use = self.publishers[publisher]
            use[0] -= size
            use[1] -= 1
            if not use[1]:
                del self.publishers[publisher]

    def sweep(self) -> int:
        """Forget channels with no subscriber and no history left; returns how many."""
        gone = 0
        for name, channel in list(self.channels.items()):
            self._trim(channel)
            if not channel.subscribers and not channel.history:
                del self.channels[name]
                gone += 1
        return gone

    # ------------------------------------------------------ messaging calls

    def carry_out(self, session: Session, call: MessagingCall) -> None:
        """Answer a session's messaging request at once (nothing to wait for here)."""
        msg = call.msg
        if call.kind == "subscribe":
            assert isinstance(msg, Subscribe)
            channel, recovered, missed, joined = self.subscribe(msg.channel, session, msg.since, msg.epoch)
            session.members.subscribed(msg, channel.epoch, channel.offset, recovered, channel.members, missed)
            if joined:
                self.join_announce(channel, session)
        elif call.kind == "unsubscribe":
            self.unsubscribe(msg.channel, session)  # type: ignore[union-attr]
        elif call.kind == "publish":
            assert isinstance(msg, Publish) and call.encoded is not None
            members = session.members
            members.published(msg, self.publish(msg.channel, session.name, call.encoded, members.account))
        else:
            assert isinstance(msg, Send)
            recipient = self.agents.get(msg.to)
            accepted = recipient is not None and recipient.members.deliver_direct(
                session.name, msg.data, len(call.encoded or b"")
            )
            session.members.sent(msg, recipient is not None, full=not accepted)


def _held(channel: Channel, offset: int) -> bool:
    """The entry ``offset`` of ``channel`` is still in its history (entries leave from the front)."""
    history = channel.history
    return bool(history) and history[0][0] <= offset
