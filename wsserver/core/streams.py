"""Streams: one generation each, and the book of a session's streams.

A :class:`Stream` is what the session core knows of a generation: its
request, its answer so far, its token counts. The :class:`StreamBook` keeps a
session's running streams, every stream id the session has used (ids are
never reused: ``stream_exists``), and the most recently ended streams (an
``interrupt`` racing the natural end still finds the conversation).

What a stream keeps of its answer, for ``stream.end.message``, a snapshot
and a steer:

* the answer text (``parts``: the text deltas, joined on demand);
* its reasoning blocks (:class:`Reasoning`), in order, each placed among the
  text by the text's length when it began. A block is *finished* when the
  provider said so (``ReasoningDone``, with a signature or a redacted block)
  or when anything came after it (text, a tool call, another block): only
  the last block can be unfinished;
* its tool calls (:class:`Call`: id, tool name, the argument JSON text so
  far), in the order they opened. A call is *finished* only when the
  provider finished the stream (``Finish``); then its arguments must parse
  as a JSON object. A stream stopped any other way (cancel, interrupt, an
  error) has partial calls only, and they are dropped from its message.

An agent run (``generate.max_steps`` > 1, :mod:`.runs`) is one stream over
several model steps: the answer fields above are the current step's, the
:class:`~wsserver.core.runs.Run` keeps what earlier steps added to the
conversation (their assistant messages and the tool results), and a snapshot
or a steer sees the whole run.

What a stream keeps is counted in UTF-8 bytes: ``input_bytes`` (its
request's messages, counted once when it is made) and ``kept_bytes`` (its
output: answer text, reasoning, tool call names and arguments, counted
where each is kept; :meth:`Stream.keep` for the text). The session ends a
stream whose output reaches its bound (``length``), and the book forgets the
oldest ended streams beyond a bound of bytes (:meth:`Stream.retained`).
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from ..wire.codec import wire_json
from ..wire.messages import (
    ChatMessage,
    OnBusy,
    GenerateParams,
    ReasoningPart,
    SnapshotCall,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceName,
    Usage,
)

if TYPE_CHECKING:
    from .runs import Run

__all__ = [
    "RECENT_STREAMS_BYTES",
    "STREAM_OVERHEAD",
    "Call",
    "Reasoning",
    "Stream",
    "StreamBook",
    "StreamState",
    "add_text",
    "bounded",
    "content_chars",
    "message_bytes",
    "request_fields",
    "request_record",
    "text_bytes",
    "text_of",
]

#: Bytes of ended streams a session keeps by default, so that an interrupt
#: racing the natural end still finds the conversation to continue.
RECENT_STREAMS_BYTES = 4 << 20
#: Bytes counted for each stream beyond its messages and its output (the
#: objects themselves), so that many small streams are bounded too.
STREAM_OVERHEAD = 1024


#: More text fragments than this are joined into one string at once (see
#: :func:`add_text`; the merging keeps far fewer on its own).
PARTS_MAX = 32


def add_text(parts: list[str], text: str) -> None:
    """Append ``text`` to ``parts``, merged so that few fragments are kept.

    A stream's answer was one str per token, each a reference the garbage
    collector follows on every full collection, for every running stream.
    Here the last fragment is merged into the one before it while it is at
    least as long (a binary counter: fragments stay longer than the ones
    after them, so there are about log2(characters) of them, and each
    character is copied about that many times in all, never the whole
    answer per token).
    """
    parts.append(text)
    while len(parts) > 1 and len(parts[-1]) >= len(parts[-2]):
        last = parts.pop()
        parts[-1] += last
    if len(parts) > PARTS_MAX:  # (fragments of shrinking lengths: not expected)
        parts[:] = ["".join(parts)]


class StreamState(enum.IntEnum):
    """``RUNNING``: a step is under way (a generation task runs it);
    ``WAITING``: a run's step ended with tool calls that wait for results or
    approvals (no task, no upstream); ``QUEUED``: it starts when the stream of
    its thread it waits behind ends; ``ENDED``: its ``stream.end`` is sent."""

    RUNNING = 0
    WAITING = 1
    QUEUED = 2
    ENDED = 3


@dataclass(slots=True, eq=False)
class Reasoning:
    """One reasoning block of an answer."""

    parts: list[str]
    #: Length of the answer text when the block began (where it sits in the text).
    at: int
    #: Tool calls opened when the block began.
    calls_at: int
    signature: str | None = None
    #: An opaque redacted block (it has no text).
    redacted: str | None = None
    #: The provider closed it (``ReasoningDone``).
    done: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(slots=True, eq=False)
class Call:
    """A tool call as far as it has streamed."""

    id: str
    name: str
    #: The argument JSON text, in the fragments it came in.
    parts: list[str] = field(default_factory=list)

    @property
    def arguments(self) -> str:
        return "".join(self.parts)


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
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    thread: str | None = None
    on_busy: OnBusy | None = None
    #: The stream of its thread it starts after (``on_busy: "queue"``).
    queued_after: str | None = None
    #: The messages as the client sent them (None: ``messages``): how a
    #: later generate of the thread is matched to this conversation.
    client_messages: tuple[ChatMessage, ...] | None = None
    #: An agent run (``max_steps`` > 1): what its earlier steps added.
    run: Run | None = None
    channel_index: int = 0  # index of the next delta-like frame published to the channel
    state: StreamState = StreamState.RUNNING
    reason: str | None = None
    first_token_at: float | None = None
    parts: list[str] = field(default_factory=list)
    reasoning: list[Reasoning] | None = None  # made at the first reasoning event
    calls: dict[str, Call] | None = None  # by id, in the order they opened
    next_index: int = 0  # index of the next delta-like frame (assigned when taken)
    input_tokens: int | None = None  # as reported by the provider
    output_tokens: int | None = None  # as reported by the provider
    counted_tokens: int = 0  # sum of the deltas' token counts
    exact_count: bool = True  # every delta carried its token count
    #: UTF-8 bytes of the request's messages (counted when the stream is made).
    input_bytes: int = -1
    #: UTF-8 bytes of the output kept so far: text, reasoning, tool calls.
    kept_bytes: int = 0

    def __post_init__(self) -> None:
        if self.input_bytes < 0:
            self.input_bytes = sum(map(message_bytes, self.messages))

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def keep(self, text: str, nbytes: int | None = None) -> None:
        """Keep answer ``text`` (``nbytes``: its UTF-8 length, if known)."""
        add_text(self.parts, text)
        self.kept_bytes += text_bytes(text) if nbytes is None else nbytes

    def retained(self) -> int:
        """Bytes this stream holds: its messages, its output, the objects."""
        return STREAM_OVERHEAD + self.input_bytes + self.kept_bytes

    # ------------------------------------------------------------ reasoning

    def add_reasoning(self, text: str) -> None:
        """Reasoning text: it continues the last block unless that one is finished."""
        add_text(self._block().parts, text)
        self.kept_bytes += text_bytes(text)

    def end_reasoning(self, signature: str | None, redacted: str | None) -> None:
        """The provider closed the reasoning block (or sent a redacted one, a block of its own)."""
        block = self._block(fresh=redacted is not None)
        block.signature, block.redacted, block.done = signature, redacted, True
        self.kept_bytes += len(signature or "") + len(redacted or "")

    def _block(self, *, fresh: bool = False) -> Reasoning:
        """The block reasoning goes to: the last one, unless it is finished (or ``fresh``)."""
        blocks = self.reasoning
        if blocks is None:
            blocks = self.reasoning = []
        text_len = sum(map(len, self.parts))
        if fresh or not blocks or self._finished(blocks[-1], text_len, last=True):
            blocks.append(Reasoning([], text_len, len(self.calls or ())))
        return blocks[-1]

    def _finished(self, block: Reasoning, text_len: int, *, last: bool) -> bool:
        return block.done or not last or text_len > block.at or len(self.calls or ()) > block.calls_at

    @property
    def reasoning_text(self) -> str | None:
        """All reasoning text so far (None: there was none)."""
        if not self.reasoning:
            return None
        return "".join(block.text for block in self.reasoning)

    # ----------------------------------------------------------- tool calls

    def open_call(self, call: str, name: str) -> None:
        calls = self.calls
        if calls is None:
            calls = self.calls = {}
        if call in calls:
            raise ValueError(f"tool call {call!r} opened twice")
        calls[call] = Call(call, name)
        self.kept_bytes += len(call) + len(name)

    def add_arguments(self, call: str, text: str) -> None:
        found = self.calls.get(call) if self.calls is not None else None
        if found is None:
            raise ValueError(f"arguments for tool call {call!r}, which was never opened")
        add_text(found.parts, text)
        self.kept_bytes += text_bytes(text)

    def finished_calls(self, *, drop_broken: bool = False) -> list[ToolCall] | str:
        """The calls, their arguments parsed, once the provider finished the
        stream; or what is wrong with the first that cannot be (arguments that
        are not a JSON object, an id or tool name the wire does not take).
        ``drop_broken`` leaves such calls out instead (a stream cut at
        ``max_tokens`` whose last call was cut with it)."""
        finished: list[ToolCall] = []
        for call in (self.calls or {}).values():
            raw = call.arguments
            problem = None
            try:
                arguments = orjson.loads(raw) if raw.strip() else {}
            except orjson.JSONDecodeError:
                problem = "its arguments are not valid JSON"
            else:
                if not isinstance(arguments, dict):
                    problem = "its arguments are not a JSON object"
            if problem is None:
                try:
                    finished.append(ToolCall(id=call.id, name=call.name, arguments=arguments))
                    continue
                except ValidationError:
                    problem = "its id or tool name is not valid"
            if not drop_broken:
                return f"tool call {call.id!r} ({call.name}): {problem}"
        return finished

    # -------------------------------------------------------------- answer

    def message(self, calls: Sequence[ToolCall] = ()) -> ChatMessage:
        """The assistant message as it goes back into ``messages``: the text,
        the finished reasoning blocks where they came (content becomes a list
        of parts when there is reasoning), and ``calls``."""
        text = self.text
        content: str | list[Any] = text
        blocks = self.reasoning
        if blocks:
            parts: list[Any] = []
            pos, last = 0, len(blocks) - 1
            for i, block in enumerate(blocks):
                if not self._finished(block, len(text), last=i == last):
                    break  # still streaming: dropped
                if block.at > pos:
                    parts.append(TextPart(type="text", text=text[pos : block.at]))
                    pos = block.at
                parts.append(
                    ReasoningPart(type="reasoning", text=block.text, signature=block.signature, redacted=block.redacted)
                )
            if parts:
                if pos < len(text):
                    parts.append(TextPart(type="text", text=text[pos:]))
                content = parts
        return ChatMessage(role="assistant", content=content, tool_calls=list(calls) or None)

    def conversation(self) -> tuple[ChatMessage, ...]:
        """The request's messages, what the run added, plus the answer so far
        (if any): what a steered stream continues. The current step's tool
        calls are left out (nobody answered them); the calls of a run that
        waited have their results (or an error result saying the run ended)."""
        done = (*self.messages, *self.run.messages(self.reason or "cancelled")) if self.run else self.messages
        answer = self.message()
        if not answer.content:  # an interrupt before the first token adds no empty message
            return done
        return (*done, answer)

    def snapshot(self) -> dict[str, Any]:
        """The fields of this stream's ``stream.snapshot``: everything so far
        (of a run: every step's text, reasoning and calls)."""
        text, reasoning, calls = self.earlier()
        fields: dict[str, Any] = {"stream": self.id, "index": self.next_index, "queued_after": None}
        run = self.run
        if run is not None:
            fields["step"] = run.step
            if self.state is StreamState.WAITING:
                fields["waiting"] = run.waiting_calls()
        if self.state is StreamState.QUEUED:
            fields["queued_after"] = self.queued_after
        mine = self.reasoning_text
        fields["text"] = text + self.text
        fields["reasoning"] = reasoning + (mine or "") if reasoning or mine else None
        calls += (self.calls or {}).values()
        if calls:
            fields["calls"] = [SnapshotCall(call=c.id, name=c.name, arguments=c.arguments) for c in calls]
        return fields

    def earlier(self) -> tuple[str, str, list[Call]]:
        """What a run's earlier steps (and the step it waits on) said: their
        text, their reasoning, their calls (all empty for a plain stream)."""
        run = self.run
        if run is None:
            return "", "", []
        said = [m for m in (*run.added, *((run.message,) if run.message else ())) if m.role == "assistant"]
        calls = [Call(c.id, c.name, [orjson.dumps(c.arguments).decode()]) for m in said for c in m.tool_calls or ()]
        return "".join(text_of(m) for m in said), "".join(text_of(m, "reasoning") for m in said), calls

    def usage(self) -> Usage:
        """Token usage (of the whole run, its steps summed): the provider's
        figures, else estimated (``estimated: true``)."""
        estimated = False
        input_tokens = self.input_tokens
        if input_tokens is None:  # rough: ~4 characters a token
            input_tokens = sum(content_chars(m) // 4 + 3 for m in self.step_messages())
            estimated = True
        output_tokens = self.output_tokens
        if output_tokens is None:
            output_tokens = self.counted_tokens
            estimated = estimated or not self.exact_count
        run = self.run
        if run is not None:
            input_tokens += run.input_tokens
            output_tokens += run.output_tokens
            estimated = estimated or run.estimated
        return Usage(input_tokens=input_tokens, output_tokens=output_tokens, estimated=estimated or None)

    # ------------------------------------------------------------------ runs

    def step_messages(self) -> tuple[ChatMessage, ...]:
        """The conversation the current step answers: the request's messages
        and what the run's earlier steps added."""
        run = self.run
        return self.messages if run is None or not run.added else (*self.messages, *run.added)

    def end_step(self) -> None:
        """A step of a run ended: its usage goes into the run's, its answer is
        cleared for the next step (the run keeps its message)."""
        run = self.run
        assert run is not None
        usage = self.usage()  # (the run's so far, this step included)
        run.input_tokens, run.output_tokens = usage.input_tokens, usage.output_tokens
        run.estimated = bool(usage.estimated)
        self.input_tokens = self.output_tokens = 0
        self.counted_tokens, self.exact_count = 0, True
        self.parts, self.reasoning, self.calls = [], None, None

    def start_step(self) -> None:
        """The next step starts: its usage is the provider's to report."""
        self.input_tokens = self.output_tokens = None


#: What an image counts as in a rough estimate of input tokens, in characters.
IMAGE_CHARS = 1000


def text_of(message: ChatMessage, part: str = "text") -> str:
    """The text of a message's ``text`` parts (or of its ``reasoning`` parts), joined."""
    content = message.content
    if isinstance(content, str):
        return content if part == "text" else ""
    return "".join(p.text for p in content if p.type == part)  # type: ignore[union-attr]


def text_bytes(text: str) -> int:
    """UTF-8 length of ``text`` (without encoding it when it is ASCII: the hot path)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def bounded(text: str, room: int) -> tuple[str, int, bool]:
    """``text`` within ``room`` bytes: ``(the part that fits, its UTF-8 length,
    whether the room is full)``; cut after the last whole character."""
    nbytes = text_bytes(text)
    if nbytes < room:
        return text, nbytes, False
    if room <= 0:
        return "", 0, True
    if text.isascii():
        return text[:room], min(room, nbytes), True
    cut = text.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
    return cut, text_bytes(cut), True


def message_bytes(message: ChatMessage) -> int:
    """What a message of a conversation weighs, in bytes: its text, reasoning
    (and signatures), image URLs, tool calls and the id of the call it answers."""
    content = message.content
    if isinstance(content, str):
        size = text_bytes(content)
    else:
        size = 0
        for part in content:
            if part.type == "image":
                size += len(part.url)
            else:
                size += text_bytes(part.text)
                size += len(getattr(part, "signature", None) or "") + len(getattr(part, "redacted", None) or "")
    for call in message.tool_calls or ():
        size += len(call.id) + len(call.name) + len(orjson.dumps(call.arguments))
    return size + len(message.tool_call_id or "")


def content_chars(message: ChatMessage) -> int:
    """The characters of a message, roughly as a model reads them (an image
    counts as :data:`IMAGE_CHARS`, a tool call as its arguments' JSON)."""
    content = message.content
    if isinstance(content, str):
        chars = len(content)
    else:
        chars = sum(IMAGE_CHARS if part.type == "image" else len(part.text) for part in content)
    for call in message.tool_calls or ():
        chars += len(call.name) + len(orjson.dumps(call.arguments))
    return chars


def request_record(stream: Stream) -> dict[str, Any]:
    """A stream's request as JSON-ready data (wire JSON, as a client would send
    it): what whoever keeps it elsewhere needs to continue the conversation
    (an interrupt) — the Redis backplane for an adopting node, a parked session."""
    record: dict[str, Any] = {
        "provider": stream.provider,
        "model": stream.model,
        "messages": [wire_json(m) for m in stream.messages],
        "params": wire_json(stream.params),
        "channel": stream.channel,
    }
    if stream.tools:
        record["tools"] = [wire_json(t) for t in stream.tools]
    if stream.tool_choice is not None:
        choice = stream.tool_choice
        record["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump(mode="json")
    return record


def request_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The request of :func:`request_record`, as the fields of a :class:`Stream`."""
    choice = record.get("tool_choice")
    return {
        "provider": record.get("provider", "?"),
        "model": record.get("model", "?"),
        "messages": tuple(ChatMessage.model_validate(m) for m in record.get("messages", ())),
        "params": GenerateParams.model_validate(record.get("params", {})),
        "channel": record.get("channel"),
        "tools": tuple(Tool.model_validate(t) for t in record.get("tools", ())),
        "tool_choice": choice if choice is None or isinstance(choice, str) else ToolChoiceName.model_validate(choice),
    }


class StreamBook:
    """A session's streams: running ones by id, every id used, the recently ended.

    Args:
        max_recent_bytes: what the recently ended streams may hold together
            (:meth:`Stream.retained`); the oldest are forgotten first, the
            newest is always kept.
    """

    __slots__ = ("_auto_ids", "_recent", "ids_used", "max_recent_bytes", "recent_bytes", "running")

    def __init__(self, max_recent_bytes: int = RECENT_STREAMS_BYTES) -> None:
        #: Running streams by id.
        self.running: dict[str, Stream] = {}
        self.ids_used: set[str] = set()
        self._auto_ids = itertools.count(1)
        self._recent: OrderedDict[str, Stream] | None = None  # made at the first end
        self.max_recent_bytes = max_recent_bytes
        #: What the recently ended streams hold, in bytes.
        self.recent_bytes = 0

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
        self.recent_bytes += stream.retained()
        while self.recent_bytes > self.max_recent_bytes and len(recent) > 1:
            self.recent_bytes -= recent.popitem(last=False)[1].retained()

    @property
    def recent(self) -> list[Stream]:
        """The recently ended streams, oldest first."""
        return list(self._recent.values()) if self._recent is not None else []

    def in_thread(self, thread: str) -> list[Stream]:
        """The streams of ``thread`` not yet ended, oldest first."""
        return [stream for stream in self.running.values() if stream.thread == thread]

    def find(self, stream_id: str) -> Stream | None:
        """A running stream, or a recently ended one."""
        found = self.running.get(stream_id)
        if found is None and self._recent is not None:
            found = self._recent.get(stream_id)
        return found
