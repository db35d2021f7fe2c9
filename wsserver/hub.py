"""Channels, presence and the agent directory (sans-I/O).

A channel message is encoded ONCE, stored once in the channel's history and
handed to the transport's ``deliver`` callback together with the sessions
subscribed to it; the transport sends those bytes to every attached
subscriber with ``websockets.broadcast()``. That is why channel traffic
carries a per-channel ``offset`` (and an ``epoch`` that changes whenever the
channel's history starts afresh) instead of each recipient's ``seq``.

Presence events (``presence {channel, offset, joined|left}``) are channel
traffic too: they take an offset and enter the history. A session is a
member of a channel from its first ``subscribe`` until it unsubscribes or
ends; a detached session stays present until it expires.

Nothing here touches a socket; the time source is injectable.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .messages import compact

if TYPE_CHECKING:
    from .session import Session

__all__ = ["NAME_RE", "NAME_RULE", "Channel", "Hub", "valid_name"]

#: Agent and channel names.
NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
NAME_RULE = "is 1 to 128 characters of A-Z a-z 0-9 _ . : -"


def valid_name(name: str) -> bool:
    return NAME_RE.match(name) is not None


@dataclass(eq=False)
class Channel:
    name: str
    epoch: str
    #: Offset of the newest message (0 before the first).
    offset: int = 0
    #: (offset, time, frame) of the newest messages, oldest first.
    history: deque[tuple[int, float, bytes]] = field(default_factory=deque)
    #: Subscribed sessions, in subscription order.
    subscribers: dict[Session, None] = field(default_factory=dict)
    #: Subscribed sessions per name (several sessions may share an agent
    #: name): presence is decided in O(1) per join and leave.
    names: dict[str, int] = field(default_factory=dict)

    @property
    def members(self) -> list[str]:
        return sorted(self.names)


class Hub:
    """Every channel and agent name of one server (the memory backplane).

    Args:
        deliver: ``deliver(channel, frame, sessions)`` sends an encoded
            channel frame to the given subscribers (the transport broadcasts
            it to those attached whose subscription is not paused).
        history_size, history_ttl: each channel keeps at most this many
            messages, none older than this many seconds.
        clock: wall-clock-like time in seconds (for history age).
    """

    #: False: offsets, history, presence and agent names live here and every
    #: call completes at once. A shared backplane (Redis) sets it, and sessions
    #: then hand subscribe, publish and send over as :class:`HubCall` actions.
    remote = False

    def __init__(
        self,
        *,
        deliver: Callable[[str, bytes, list[Session]], Any] | None = None,
        history_size: int = 1000,
        history_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deliver = deliver
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.clock = clock
        self.channels: dict[str, Channel] = {}
        #: Agent name -> the session that holds it (attached or detached).
        self.agents: dict[str, Session] = {}

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
            channel = self.channels[name] = Channel(name, epoch=secrets.token_hex(4))
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
                    missed = [frame for offset, _, frame in channel.history if offset > since]
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

    def publish(self, name: str, sender: str, data: Any, *, encoded_data: bytes | None = None) -> int:
        """Publish ``data`` on channel ``name``; returns its offset."""
        channel = self.channel(name)
        offset = channel.offset + 1
        if encoded_data is None:
            encoded_data = orjson.dumps(data)
        frame = b"".join(
            (
                b'{"type":"message","channel":',
                orjson.dumps(name),
                b',"offset":',
                str(offset).encode(),
                b',"from":',
                orjson.dumps(sender),
                b',"data":',
                encoded_data,
                b"}",
            )
        )
        self._append(channel, offset, frame)
        return offset

    def publish_presence(self, channel: Channel, *, joined: str | None = None, left: str | None = None) -> int:
        offset = channel.offset + 1
        event: dict[str, Any] = {"type": "presence", "channel": channel.name, "offset": offset}
        if joined is not None:
            event["joined"] = joined
        if left is not None:
            event["left"] = left
        self._append(channel, offset, orjson.dumps(event))
        return offset

    def _append(self, channel: Channel, offset: int, frame: bytes) -> None:
        channel.offset = offset
        frame = compact(frame)  # kept in the history
        history = channel.history
        history.append((offset, self.clock(), frame))
        if len(history) > self.history_size:
            history.popleft()
        if self.deliver is not None and channel.subscribers:
            self.deliver(channel.name, frame, list(channel.subscribers))

    def _trim(self, channel: Channel) -> None:
        horizon = self.clock() - self.history_ttl
        history = channel.history
        while history and history[0][1] < horizon:
            history.popleft()

    def sweep(self) -> int:
        """Forget channels with no subscriber and no history left; returns how many."""
        gone = 0
        for name, channel in list(self.channels.items()):
            self._trim(channel)
            if not channel.subscribers and not channel.history:
                del self.channels[name]
                gone += 1
        return gone
