"""Streams: one generation each, and the book of a session's streams.

A :class:`Stream` is what the session core knows of a generation: its
request, its answer so far, its token counts. The :class:`StreamBook` keeps a
session's running streams, every stream id the session has used (ids are
never reused: ``stream_exists``), and the most recently ended streams (an
``interrupt`` racing the natural end still finds the conversation).
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from ..wire.messages import ChatMessage, GenerateParams, Usage

__all__ = ["RECENT_STREAMS", "Stream", "StreamBook", "StreamState"]

#: Ended streams kept so that an interrupt racing the natural end still finds
#: the conversation to continue.
RECENT_STREAMS = 64


class StreamState(enum.IntEnum):
    RUNNING = 0
    ENDED = 1


@dataclass(slots=True, eq=False)
class Stream:
    """One generation, as the session sees it."""

    id: str
    ref: str | None
    provider: str
    model: str
    messages: tuple[ChatMessage, ...]
    params: GenerateParams
    started_at: float
    channel: str | None = None
    steered_from: str | None = None
    channel_index: int = 0  # index of the next delta published to the channel
    state: StreamState = StreamState.RUNNING
    reason: str | None = None
    first_token_at: float | None = None
    parts: list[str] = field(default_factory=list)
    next_index: int = 0  # index of the next delta frame (assigned when taken)
    input_tokens: int | None = None  # as reported by the provider
    output_tokens: int | None = None  # as reported by the provider
    counted_tokens: int = 0  # sum of TextDelta.tokens
    exact_count: bool = True  # every delta carried its token count

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def conversation(self) -> tuple[ChatMessage, ...]:
        """The request's messages plus the answer so far (if any)."""
        text = self.text
        if not text:  # an interrupt before the first token adds no empty message
            return self.messages
        return (*self.messages, ChatMessage(role="assistant", content=text))

    def usage(self) -> Usage:
        """Token usage: the provider's figures, else estimated (``estimated: true``)."""
        estimated = False
        input_tokens = self.input_tokens
        if input_tokens is None:  # rough: ~4 characters a token
            input_tokens = sum(len(m.content) // 4 + 3 for m in self.messages)
            estimated = True
        output_tokens = self.output_tokens
        if output_tokens is None:
            output_tokens = self.counted_tokens
            estimated = estimated or not self.exact_count
        return Usage(input_tokens=input_tokens, output_tokens=output_tokens, estimated=estimated or None)


class StreamBook:
    """A session's streams: running ones by id, every id used, the recently ended."""

    __slots__ = ("_auto_ids", "_recent", "ids_used", "running")

    def __init__(self) -> None:
        #: Running streams by id.
        self.running: dict[str, Stream] = {}
        self.ids_used: set[str] = set()
        self._auto_ids = itertools.count(1)
        self._recent: OrderedDict[str, Stream] | None = None  # made at the first end

    def used(self, stream_id: str) -> bool:
        return stream_id in self.ids_used

    def mark_used(self, stream_id: str) -> None:
        self.ids_used.add(stream_id)

    def next_id(self) -> str:
        """A fresh ``s1``, ``s2``… id no stream of the session has used."""
        while True:
            candidate = f"s{next(self._auto_ids)}"
            if candidate not in self.ids_used:
                return candidate

    def add(self, stream: Stream) -> None:
        self.ids_used.add(stream.id)
        self.running[stream.id] = stream

    def ended(self, stream: Stream) -> None:
        """``stream`` stopped running: it is kept among the recent ones."""
        del self.running[stream.id]
        recent = self._recent
        if recent is None:
            recent = self._recent = OrderedDict()
        recent[stream.id] = stream
        if len(recent) > RECENT_STREAMS:
            recent.popitem(last=False)

    def find(self, stream_id: str) -> Stream | None:
        """A running stream, or a recently ended one."""
        found = self.running.get(stream_id)
        if found is None and self._recent is not None:
            found = self._recent.get(stream_id)
        return found
