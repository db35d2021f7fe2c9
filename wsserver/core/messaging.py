"""A session's side of messaging: its subscriptions and the rules of
subscribe, unsubscribe, publish and send (PROTOCOL.md section 7).

:class:`Membership` checks a request (names, channel rights, limits, rate)
and turns it into a :class:`~wsserver.core.actions.MessagingCall` for the
backplane, which owns offsets, history, presence and agent names. The
backplane's answer comes back through :meth:`Membership.subscribed`,
:meth:`Membership.published`, :meth:`Membership.sent` or
:meth:`Membership.failed`.

While a call on a channel is under way, live traffic of that channel is
*held* (:meth:`Membership.hold`) and released after the reply, in offset
order, so nothing overtakes a ``subscribed`` or the publisher's own ``ok``;
each offset is let through once (:meth:`Membership.admit`), so a late second
copy of a publication is dropped.

Direct messages for a session that is *away* (no connection attached: the
transport says so through :attr:`Membership.away`) wait in its *inbox*,
bounded by count and bytes (``inbox_full`` to the sender beyond), and are
sequenced only when the session is back (:meth:`Membership.present`), after
its resume's replay: a flood of them never pushes the session's own frames
out of its replay log.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from ..wire.errors import ErrorCode
from ..wire.messages import Message, Ok, Publish, Send, Subscribe, Subscribed, ToolCallRequest, Unsubscribe
from ..wire.names import NAME_RULE, valid_name
from .actions import MessagingCall
from .limits import ChannelRules, MessagingLimits, TokenBucket
from .outbox import Outbox

if TYPE_CHECKING:
    from .streams import Stream

__all__ = ["ChannelSink", "Membership"]


class ChannelSink(Protocol):
    """Where a session publishes a stream's frames (``generate.channel``).

    Called inside the core's own calls: it must queue, not do I/O.
    """

    def publish_nowait(self, channel: str, sender: str, data: bytes, publisher: str = "") -> None: ...


class Membership:
    """Subscriptions, held traffic and the messaging rules of one session.

    Args:
        name: what others see as ``from`` (the agent name, else a public id).
        sink: the backplane; None when messaging is not enabled.
        account: whom this session's publications count against in the
            channels' history bounds (its identity, or its IP when anonymous).
    """

    __slots__ = (
        "_bucket",
        "_clock",
        "_out",
        "account",
        "away",
        "channel_offsets",
        "held",
        "inbox",
        "inbox_bytes",
        "limits",
        "name",
        "paused",
        "rules",
        "sink",
        "subscriptions",
    )

    def __init__(
        self,
        name: str,
        out: Outbox,
        *,
        sink: ChannelSink | None,
        limits: MessagingLimits,
        rules: ChannelRules | None,
        clock: Callable[[], float],
        account: str = "",
    ) -> None:
        self.name = name
        self.account = account
        self._out = out
        self.sink = sink
        self.limits = limits
        self.rules = rules
        self._clock = clock
        self.subscriptions: set[str] = set()
        #: Subscriptions that get no live traffic until the client subscribes
        #: again (recovering by offset): those of a detached session.
        self.paused: set[str] = set()
        self._bucket = TokenBucket(limits.publish_rate, limits.publish_burst)
        #: Channel traffic held back per channel while a backplane call of this
        #: session on that channel runs: (offset, frame), released in order after
        #: the reply (``subscribed`` or ``ok``), so nothing overtakes it.
        self.held: dict[str, list[tuple[int, bytes]]] = {}
        #: The last offset queued per channel (a copy of a publication that
        #: arrives late, twice, is dropped).
        self.channel_offsets: dict[str, int] = {}
        #: No connection is attached (set by the transport): direct messages
        #: wait in the inbox, (sender, data, encoded size) oldest first.
        self.away = False
        self.inbox: deque[tuple[str, Any, int]] | None = None  # made on first need
        self.inbox_bytes = 0

    @property
    def bucket(self) -> TokenBucket:
        """The publish and send rate limit's bucket."""
        return self._bucket

    # ------------------------------------------------------------ requests

    def check_channel(self, channel: str, ref: str | None, *, publish: bool = False, subscribe: bool = False) -> bool:
        """Messaging on, a valid name, the right to do it; else answered with an error."""
        if self.sink is None:
            self._out.error(ErrorCode.NOT_IMPLEMENTED, "channels are not enabled", ref=ref)
            return False
        if not valid_name(channel):
            self._out.error(ErrorCode.BAD_NAME, f"a channel name {NAME_RULE}", ref=ref, field="channel")
            return False
        rules = self.rules
        if rules is not None and (
            (publish and not rules.may_publish(channel)) or (subscribe and not rules.may_subscribe(channel))
        ):
            action = "publish on" if publish else "subscribe to"
            self._out.error(ErrorCode.FORBIDDEN, f"not allowed to {action} {channel!r}", ref=ref)
            return False
        return True

    def subscribe(self, msg: Subscribe) -> list[MessagingCall]:
        if not self.check_channel(msg.channel, msg.id, subscribe=True):
            return []
        renewal = msg.channel in self.subscriptions
        if not renewal and len(self.subscriptions) >= self.limits.max_subscriptions:
            self._out.error(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.limits.max_subscriptions} subscriptions per session",
                ref=msg.id,
            )
            return []
        self.held.setdefault(msg.channel, [])
        return [MessagingCall("subscribe", msg)]

    def unsubscribe(self, msg: Unsubscribe) -> list[MessagingCall]:
        if not self.check_channel(msg.channel, msg.id):
            return []
        self.subscriptions.discard(msg.channel)
        self.paused.discard(msg.channel)
        self.channel_offsets.pop(msg.channel, None)
        if msg.id is not None:
            self._out.push(None, Ok, {"ref": msg.id})
        return [MessagingCall("unsubscribe", msg)]

    def publish(self, msg: Publish) -> list[MessagingCall]:
        if not self.check_channel(msg.channel, msg.id, publish=True) or self._rate_limited(msg.id):
            return []
        encoded = self._encode_data(msg.data, msg.id)
        if encoded is None:
            return []
        if msg.channel in self.subscriptions:  # its own copy comes after the ok
            self.held.setdefault(msg.channel, [])
        return [MessagingCall("publish", msg, encoded)]

    def send(self, msg: Send) -> list[MessagingCall]:
        if self.sink is None:
            self._out.error(ErrorCode.NOT_IMPLEMENTED, "messaging is not enabled", ref=msg.id)
            return []
        if not valid_name(msg.to):
            self._out.error(ErrorCode.BAD_NAME, f"an agent name {NAME_RULE}", ref=msg.id, field="to")
            return []
        if self._rate_limited(msg.id):
            return []
        encoded = self._encode_data(msg.data, msg.id)
        return [] if encoded is None else [MessagingCall("send", msg, encoded)]

    def _encode_data(self, data: Any, ref: str | None) -> bytes | None:
        encoded = orjson.dumps(data)
        if len(encoded) > self.limits.max_data_bytes:
            self._out.error(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"data is {len(encoded)} bytes; the limit is {self.limits.max_data_bytes}",
                ref=ref,
            )
            return None
        return encoded

    def _rate_limited(self, ref: str | None) -> bool:
        wait = self._bucket.take(self._clock())
        if wait > 0:
            self._out.rate_limited(f"more than {self.limits.publish_rate:g} publications per second", ref, wait)
            return True
        return False

    # ------------------------------------------------- the backplane's answers

    def subscribed(
        self, msg: Subscribe, epoch: str, offset: int, recovered: bool, members: list[str], missed: list[bytes]
    ) -> None:
        """Answer a subscribe: ``subscribed``, the recovered frames, then what
        arrived meanwhile (offsets above ``offset``)."""
        self.subscriptions.add(msg.channel)
        self.paused.discard(msg.channel)
        fields = {
            "ref": msg.id,
            "channel": msg.channel,
            "epoch": epoch,
            "offset": offset,
            "recovered": recovered,
            "members": members,
        }
        self._out.push(None, Subscribed, fields)
        for frame in missed:
            self._out.push_raw(frame)
        self.release(msg.channel, offset)

    def published(self, msg: Publish, offset: int) -> None:
        """The backplane gave the publication ``offset``: answer, then release the own copy."""
        if msg.id is not None:
            self._out.push(None, Ok, {"ref": msg.id, "offset": offset})
        self.release(msg.channel)

    def sent(self, msg: Send, delivered: bool, full: bool = False) -> None:
        """Answer a send: ``ok``; ``unknown_agent`` when no live session holds
        ``to``; ``inbox_full`` when it is away and its inbox is full."""
        if not delivered:
            self._out.error(ErrorCode.UNKNOWN_AGENT, f"no agent named {msg.to!r} is connected", ref=msg.id)
        elif full:
            limits = self.limits
            self._out.error(
                ErrorCode.INBOX_FULL,
                f"agent {msg.to!r} is away and holds {limits.inbox_messages} messages or "
                f"{limits.inbox_bytes} bytes for it already; send again after it is back",
                ref=msg.id,
            )
        elif msg.id is not None:
            self._out.push(None, Ok, {"ref": msg.id})

    def failed(self, call: MessagingCall, message: str) -> None:
        """The backplane could not carry out ``call``: answer ``backplane_unavailable``."""
        channel = getattr(call.msg, "channel", None)
        if call.kind == "subscribe":
            self.held.pop(channel, None)  # type: ignore[arg-type]
        elif call.kind == "publish":
            self.release(channel)  # type: ignore[arg-type]
        self._out.error(ErrorCode.BACKPLANE_UNAVAILABLE, message, ref=call.msg.id, retry_after_ms=1000)

    def deliver_direct(self, sender: str, data: Any, size: int = 0) -> bool:
        """A direct message for this session (``size``: its encoded ``data``).

        Sequenced at once, so it is in the replay log; while the session is
        away it waits in the inbox instead. False: the inbox is full.
        """
        if not self.away:
            self._out.push(None, Message, {"from_": sender, "data": data})
            return True
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = deque()
        limits = self.limits
        if len(inbox) >= limits.inbox_messages or self.inbox_bytes + size > limits.inbox_bytes:
            return False
        inbox.append((sender, data, size))
        self.inbox_bytes += size
        return True

    def restrict(self, rules: ChannelRules | None, streams: Iterable[Stream] = ()) -> list[MessagingCall]:
        """Take the channel rights of a resuming credential of the same identity.

        Narrower rights are narrower at once: subscriptions they forbid are
        dropped, each answered with ``error forbidden`` naming its ``channel``
        (the unsubscribes returned tell the backplane), and of ``streams``
        (the running ones) none mirrors into a channel they forbid publishing on.
        """
        if rules == self.rules:
            return []
        self.rules = rules
        if rules is None:
            return []
        for stream in streams:
            if stream.channel is not None and not rules.may_publish(stream.channel):
                stream.channel = None
        dropped = sorted(name for name in self.subscriptions if not rules.may_subscribe(name))
        for name in dropped:
            self.subscriptions.discard(name)
            self.paused.discard(name)
            self.channel_offsets.pop(name, None)
            self.held.pop(name, None)
            self._out.error(
                ErrorCode.FORBIDDEN,
                f"the subscription to {name!r} was dropped: the credential of this resume does not allow it",
                channel=name,
            )
        return [MessagingCall("unsubscribe", Unsubscribe(type="unsubscribe", channel=name)) for name in dropped]

    def present(self) -> None:
        """A connection is attached again (its resume's replay is taken):
        the direct messages that waited are sequenced now, in order."""
        self.away = False
        inbox, self.inbox, self.inbox_bytes = self.inbox, None, 0
        for sender, data, _ in inbox or ():
            self._out.push(None, Message, {"from_": sender, "data": data})

    def deliver_tool_call(self, sender: str, call: str, name: str, arguments: dict[str, Any]) -> None:
        """A run's call routed to this session's agent (``tool_call``): sequenced, like a direct message."""
        self._out.push(None, ToolCallRequest, {"call": call, "name": name, "arguments": arguments, "from_": sender})

    # ------------------------------------------------------- channel traffic

    def hold(self, channel: str, offset: int, frame: bytes) -> bool:
        """Keep ``frame`` back if a call on ``channel`` is under way (True: held)."""
        held = self.held.get(channel)
        if held is None:
            return False
        held.append((offset, frame))
        return True

    def admit(self, channel: str, offset: int) -> bool:
        """Each offset once, in order: False for a copy at or below the last one queued."""
        offsets = self.channel_offsets
        if offset <= offsets.get(channel, 0):
            return False
        offsets[channel] = offset
        return True

    def release(self, channel: str, after: int = 0) -> None:
        """Stop holding back ``channel``: queue what was held with offsets above ``after``."""
        held = self.held.pop(channel, None)
        if held is None and not after:
            return
        last = max(after, self.channel_offsets.get(channel, 0))
        for offset, frame in held or ():
            if offset > last:
                self._out.push_raw(frame)
                last = offset
        self.channel_offsets[channel] = last

    def mirror(self, channel: str, data: dict[str, Any]) -> None:
        """Publish a frame of one of this session's streams into ``channel``."""
        if self.sink is not None:
            self.sink.publish_nowait(channel, self.name, orjson.dumps(data), self.account)
