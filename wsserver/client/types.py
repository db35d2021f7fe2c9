"""What the Python client hands its caller: results, messages, the backoff policy."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Backoff",
    "ChannelMessage",
    "DirectMessage",
    "PendingCall",
    "Presence",
    "StreamEvent",
    "StreamResult",
    "ToolCall",
    "ToolCallRequest",
    "Usage",
    "WaitingCall",
]


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
    #: The assistant message as it goes back into ``messages`` (``stream.end.message``).
    message: dict[str, Any] | None = None
    #: The reasoning text received (all blocks).
    reasoning: str = ""
    #: An agent run: everything it added to the conversation, and its steps.
    messages: list[dict[str, Any]] | None = None
    steps: int | None = None


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a stream, as :meth:`ClientStream.events` yields them.

    ``kind`` is ``"text"`` (answer text), ``"reasoning"`` (reasoning text),
    ``"tool_call"`` (a call opens: ``call``, ``name``) or ``"tool_call_delta"``
    (a fragment of ``call``'s argument JSON in ``text``); in an agent run also
    ``"waiting"`` (``data``: the :class:`WaitingCall` list the run waits on),
    ``"tool_result"`` (``call``, ``name``, ``data``: the content; ``text``:
    the error code of a result the server made, else empty) and ``"step"``
    (``data``: the step that starts).
    """

    kind: Literal["text", "reasoning", "tool_call", "tool_call_delta", "waiting", "tool_result", "step"]
    text: str = ""
    call: str | None = None
    name: str | None = None
    data: Any = None


@dataclass(slots=True)
class PendingCall:
    """A tool call as far as it has streamed (``arguments``: the JSON text so far)."""

    id: str
    name: str
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A finished tool call of ``stream.end.message`` (``arguments`` parsed)."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WaitingCall:
    """A call an agent run waits on (``stream.waiting``): ``wait`` is
    ``"approval"`` (send :meth:`ClientStream.approve`), ``"client"`` (send
    :meth:`ClientStream.tool_result`) or ``"agent"`` (the agent ``agent`` answers)."""

    id: str
    name: str
    arguments: dict[str, Any]
    wait: str
    agent: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallRequest:
    """A call routed to this client's agent (a ``tool_call`` frame): answer it
    with :meth:`Client.tool_result` (``call``), or let a handler registered
    with ``client.tools.register`` do it."""

    call: str
    name: str
    arguments: dict[str, Any]
    sender: str


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
