"""What the Python client hands its caller: results, messages, the backoff policy."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

__all__ = ["Backoff", "ChannelMessage", "DirectMessage", "Presence", "StreamResult", "Usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class StreamResult:
    """How a stream ended (``stream.end``)."""

    reason: str
    usage: Usage
    ttft_ms: float | None
    duration_ms: float
    text: str
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Full-jitter exponential backoff: attempt n waits uniform(0, min(cap, base * 2**n)).

    ``give_up_after`` bounds the total time spent reconnecting (None: never give up).
    """

    base: float = 0.25
    cap: float = 10.0
    give_up_after: float | None = 60.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * (2**attempt)))


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    """A publication on a channel (``data`` is any JSON; for a stream published
    into the channel it is the stream frame, e.g. ``{"type": "stream.delta", ...}``)."""

    channel: str
    offset: int
    sender: str
    data: Any


@dataclass(frozen=True, slots=True)
class Presence:
    """Someone joined or left a channel."""

    channel: str
    offset: int
    joined: str | None = None
    left: str | None = None


@dataclass(frozen=True, slots=True)
class DirectMessage:
    sender: str
    data: Any
