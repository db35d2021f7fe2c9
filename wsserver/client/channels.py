"""A channel subscription of the Python client: an async iterator of what arrives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from .types import ChannelMessage, Presence

if TYPE_CHECKING:
    from .client import Client

__all__ = ["END", "Subscription"]

#: Put in a queue: nothing more comes.
END = object()


class Subscription:
    """A channel subscription: an async iterator of :class:`ChannelMessage` and
    :class:`Presence` items, in offset order, each once.

    After a reconnect the client re-subscribes with ``since`` = the last
    offset seen and the channel's ``epoch``; if the server could not recover
    the gap, ``recovered`` is False (refetch your state) and delivery goes on
    from the channel's current position. ``members`` is kept up to date from
    presence events.
    """

    def __init__(self, client: Client, channel: str, since: int | None, epoch: str | None) -> None:
        self._client = client
        self.channel = channel
        self.offset = since or 0
        self.epoch = epoch
        self.recovered: bool | None = None
        self.members: set[str] = set()
        self._since = since
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._failure: BaseException | None = None

    def __aiter__(self) -> AsyncIterator[ChannelMessage | Presence]:
        return self

    async def __anext__(self) -> ChannelMessage | Presence:
        item = await self._queue.get()
        if item is END:
            self._queue.put_nowait(END)
            if self._failure is not None:
                raise self._failure
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]

    async def next(self, timeout: float | None = None) -> ChannelMessage | Presence:
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    async def unsubscribe(self) -> None:
        self._client._subscriptions.pop(self.channel, None)
        await self._client.request({"type": "unsubscribe", "channel": self.channel})
        self._queue.put_nowait(END)

    def _request(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "subscribe", "channel": self.channel}
        if self._since is not None:
            msg["since"] = self._since
        if self.epoch is not None:
            msg["epoch"] = self.epoch
        return msg

    # called by the client's reader
    def _subscribed(self, frame: Mapping[str, Any]) -> None:
        self.recovered = bool(frame.get("recovered"))
        self.members = set(frame.get("members") or ())
        self.epoch = frame.get("epoch")
        if not self.recovered:  # nothing replayed: go on from the current position
            self.offset = frame.get("offset", 0)
        self._since = self.offset  # what a re-subscription asks for

    def _deliver(self, frame: Mapping[str, Any]) -> None:
        offset = frame.get("offset", 0)
        if offset <= self.offset:
            return  # seen already
        self.offset = self._since = offset
        if frame["type"] == "presence":
            joined, left = frame.get("joined"), frame.get("left")
            if joined:
                self.members.add(joined)
            if left:
                self.members.discard(left)
            self._queue.put_nowait(Presence(self.channel, offset, joined, left))
        else:
            self._queue.put_nowait(ChannelMessage(self.channel, offset, frame.get("from", ""), frame.get("data")))

    def _lost(self, exc: BaseException) -> None:
        self._failure = exc
        self._queue.put_nowait(END)
