"""Rate limits and access rules, as plain values the session core consults.

Time is always passed in (``now``, seconds on any monotonic clock): nothing
here reads a clock of its own.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

__all__ = ["ChannelRules", "GenerationQuota", "MessagingLimits", "StreamLimits", "TokenBucket", "TokenBudget"]


@dataclass(frozen=True, slots=True)
class ChannelRules:
    """Which channels an identity may subscribe to and publish on
    (:func:`fnmatch.fnmatchcase` patterns, e.g. ``team:*``)."""

    subscribe: tuple[str, ...] = ("*",)
    publish: tuple[str, ...] = ("*",)

    def may_subscribe(self, channel: str) -> bool:
        return any(fnmatch.fnmatchcase(channel, p) for p in self.subscribe)

    def may_publish(self, channel: str) -> bool:
        return any(fnmatch.fnmatchcase(channel, p) for p in self.publish)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What a session's streams may hold, in UTF-8 bytes."""

    #: One stream's output (text, reasoning, tool calls): it ends with reason ``length`` there.
    answer_bytes: int = 1 << 20
    #: The ended streams a session keeps for ``interrupt``, together (oldest forgotten first).
    recent_bytes: int = 4 << 20
    #: The conversation an ``interrupt`` continues (``conversation_too_large`` beyond).
    conversation_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class MessagingLimits:
    max_subscriptions: int = 100
    max_data_bytes: int = 64 * 1024
    publish_rate: float = 100.0  # publications and direct messages per second
    publish_burst: float = 200.0
    #: Direct messages held for a session that is away (no connection), and
    #: their encoded ``data`` in bytes; a send beyond either is ``inbox_full``.
    inbox_messages: int = 100
    inbox_bytes: int = 1 << 20


class TokenBucket:
    """``take(now)`` returns 0 if a token was available, else seconds to wait."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp: float | None = None

    def take(self, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def idle_full(self, now: float) -> bool:
        """Unused long enough to be full again (and a minute more): forgettable."""
        return self.stamp is not None and now - self.stamp > self.burst / (self.rate or 1.0) + 60


class TokenBudget:
    """Output tokens per minute: spending may go negative; new generations wait
    until the budget is positive again."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: float) -> None:
        self.capacity = per_minute
        self.level = per_minute
        self.rate = per_minute / 60.0
        self.stamp: float | None = None

    def _refill(self, now: float) -> None:
        if self.stamp is not None:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, now: float) -> float:
        self._refill(now)
        return 0.0 if self.level > 0 else (1 - self.level) / self.rate

    def spend(self, tokens: int, now: float) -> None:
        self._refill(now)
        self.level -= tokens

    def idle_full(self, now: float) -> bool:
        return self.stamp is not None and now - self.stamp > self.capacity / (self.rate or 1.0) + 60


@dataclass(frozen=True, slots=True)
class GenerationQuota:
    """An identity's limits on generations: how many start per minute, and
    how many output tokens they may produce per minute (either may be off)."""

    starts: TokenBucket | None = None
    tokens: TokenBudget | None = None

    def wait(self, now: float) -> tuple[float, str]:
        """Seconds until a generation may start (0: now), and which limit says so."""
        wait = self.starts.take(now) if self.starts is not None else 0.0
        if wait:
            return wait, "generations per minute"
        if self.tokens is not None:
            return self.tokens.wait(now), "output tokens per minute"
        return 0.0, ""

    def spend(self, output_tokens: int, now: float) -> None:
        if self.tokens is not None:
            self.tokens.spend(output_tokens, now)

    def idle_full(self, now: float) -> bool:
        """Both limits unused long enough to be full again: forgettable."""
        return all(limit is None or limit.idle_full(now) for limit in (self.starts, self.tokens))
