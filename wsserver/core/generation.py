"""What a generation reports: the provider events of a session's streams, as frames.

:class:`StreamEvents` is the part of :class:`~wsserver.core.session.Session`
that the generation runner (``server/runner.py``) talks to: one method per
provider event. Each keeps what the stream needs of it (:mod:`.streams`),
queues the frame (:class:`~wsserver.core.outbox.Outbox`) and, for a stream
published into a channel, its channel copy. Events of a stream that has
ended are ignored (a cancel does not wait for the provider to stop).

Frames, in the order the events come:

* answer text: ``stream.delta {index, text}``;
* reasoning text: ``stream.delta {index, text, part: "reasoning"}``;
* a tool call opens: ``stream.tool_call {index, call, name}``, then its
  argument JSON in fragments: ``stream.delta {index, text, part:
  "tool_call", call}``;
* the end: ``stream.end {reason, usage, …, message}`` (of an agent run,
  also ``messages`` and ``steps``; a step that waits for tool results is
  :mod:`.runs`' business).

``index`` counts every delta-like frame of a stream (deltas of every part and
``stream.tool_call``); it is assigned when the frame is sequenced, after
coalescing.

A stream's output (text, reasoning, tool call arguments) is bounded by
``StreamLimits.answer_bytes``: the delta that reaches the bound is cut there
and the stream ends with ``length`` (a tool call cut in its arguments is
dropped from the message, as for ``max_tokens``); its runner then stops
reading the provider, which closes the upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..wire.errors import ErrorCode
from ..wire.messages import ErrorInfo, Interrupt, StreamEnd, ToolCall
from .streams import Stream, StreamState, bounded

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .limits import GenerationQuota, StreamLimits
    from .messaging import Membership
    from .outbox import Outbox
    from .session import Observer
    from .streams import StreamBook

__all__ = ["NATURAL_ENDS", "StreamEvents"]

#: End reasons that mean the provider finished the stream itself.
NATURAL_ENDS = frozenset({"complete", "length", "tool_calls"})


class StreamEvents:
    """The provider events of a session's streams, and the limits on starting
    one (a part of ``Session``)."""

    __slots__ = ()

    # Provided by Session.
    id: str
    out: Outbox
    book: StreamBook
    members: Membership
    clock: Callable[[], float]
    observer: Observer | None
    quota: GenerationQuota | None
    stream_limits: StreamLimits

    # --------------------------------------------- starting a generation

    def generation_allowed(self, ref: str | None) -> bool:
        """Whether the identity's generation limits allow one more (else answered ``rate_limited``)."""
        if self.quota is None:
            return True
        wait, what = self.quota.wait(self.clock())
        if wait:
            self.out.rate_limited(f"over this identity's limit of {what}", ref, wait)
            return False
        return True

    def steer_allowed(self, stream: Stream, msg: Interrupt, size: int) -> bool:
        """A steer starts a generation: the new id, the conversation's ``size``
        and the identity's generation limits must allow it (else answered)."""
        new, limit = msg.new_stream, self.stream_limits.conversation_bytes
        if new is not None and self.book.used(new):
            message = f"stream id {new!r} is already used in this session"
            self.out.error(ErrorCode.STREAM_EXISTS, message, ref=msg.id, stream=new)
        elif size > limit:
            message = f"the conversation would be {size} bytes; the limit is {limit}"
            self.out.error(ErrorCode.CONVERSATION_TOO_LARGE, message, ref=msg.id, stream=stream.id)
        else:
            return self.generation_allowed(msg.id)
        return False

    # ------------------------------------------------------ provider events

    def stream_delta(self, stream: Stream, text: str, tokens: int | None = None) -> None:
        """The provider produced answer ``text``."""
        if stream.state is not StreamState.RUNNING or not text:
            return
        if stream.first_token_at is None:
            stream.first_token_at = self.clock()
        text, nbytes, full = bounded(text, self.stream_limits.answer_bytes - stream.kept_bytes)
        if tokens is None or full:
            stream.exact_count = False
        stream.counted_tokens += 1 if tokens is None else tokens
        if text:
            stream.keep(text, nbytes)
            self.out.push_delta(stream, text)
            if stream.channel is not None:
                self._mirror_delta(stream, {"text": text})
        if full:
            self.stream_end(stream, "length")

    def stream_reasoning(self, stream: Stream, text: str, tokens: int | None = None) -> None:
        """The provider produced reasoning ``text``."""
        if stream.state is not StreamState.RUNNING or not text:
            return
        text, _, full = bounded(text, self.stream_limits.answer_bytes - stream.kept_bytes)
        self._count(stream, tokens)
        if text:
            stream.add_reasoning(text)
            self.out.push_part(stream, text, "reasoning", None)
            if stream.channel is not None:
                self._mirror_delta(stream, {"text": text, "part": "reasoning"})
        if full:
            stream.exact_count = False
            self.stream_end(stream, "length")

    def stream_reasoning_done(self, stream: Stream, signature: str | None = None, redacted: str | None = None) -> None:
        """The provider closed a reasoning block (no frame: ``stream.end.message``
        carries the signature, or the redacted block)."""
        if stream.state is StreamState.RUNNING:
            stream.end_reasoning(signature, redacted)

    def stream_tool_call(self, stream: Stream, call: str, name: str) -> None:
        """The provider opened tool call ``call`` of tool ``name`` (an id used
        twice in a stream raises ValueError: a provider's bug)."""
        if stream.state is not StreamState.RUNNING:
            return
        stream.open_call(call, name)
        self._count(stream, None, exact=True)
        self.out.push_call(stream, call, name)
        if stream.channel is not None:
            index, stream.channel_index = stream.channel_index, stream.channel_index + 1
            frame = {"type": "stream.tool_call", "stream": stream.id, "index": index, "call": call, "name": name}
            self.members.mirror(stream.channel, frame)

    def stream_tool_delta(self, stream: Stream, call: str, text: str, tokens: int | None = None) -> None:
        """A fragment of call ``call``'s argument JSON (a call never opened
        raises ValueError: a provider's bug)."""
        if stream.state is not StreamState.RUNNING or not text:
            return
        text, _, full = bounded(text, self.stream_limits.answer_bytes - stream.kept_bytes)
        self._count(stream, tokens)
        if text:
            stream.add_arguments(call, text)
            self.out.push_part(stream, text, "tool_call", call)
            if stream.channel is not None:
                self._mirror_delta(stream, {"text": text, "part": "tool_call", "call": call})
        if full:
            stream.exact_count = False
            self.stream_end(stream, "length")

    def _count(self, stream: Stream, tokens: int | None, *, exact: bool = False) -> None:
        if stream.first_token_at is None:
            stream.first_token_at = self.clock()
        if tokens is not None:
            stream.counted_tokens += tokens
        elif not exact:
            stream.exact_count = False
            stream.counted_tokens += 1

    def _mirror_delta(self, stream: Stream, fields: dict[str, Any]) -> None:
        index, stream.channel_index = stream.channel_index, stream.channel_index + 1
        self.members.mirror(stream.channel, {"type": "stream.delta", "stream": stream.id, "index": index, **fields})  # type: ignore[arg-type]

    def _to_channel(self, stream: Stream, frame: BaseModel) -> None:
        data = frame.model_dump(by_alias=True, exclude_none=True)
        del data["seq"]
        self.members.mirror(stream.channel, data)  # type: ignore[arg-type]

    def stream_usage(self, stream: Stream, input_tokens: int | None = None, output_tokens: int | None = None) -> None:
        if stream.state is not StreamState.RUNNING:
            return
        if input_tokens is not None:
            stream.input_tokens = input_tokens
        if output_tokens is not None:
            stream.output_tokens = output_tokens

    def stream_end(self, stream: Stream, reason: str, error: tuple[str, str] | None = None) -> bool:
        """End ``stream`` with ``reason``; returns False if it had already ended.

        A natural end (the provider finished: ``complete``, ``length``,
        ``tool_calls``) keeps the stream's tool calls, their arguments parsed:
        ``complete`` with calls becomes ``tool_calls``, and arguments that are
        not a JSON object end it with ``error provider_error`` instead (text
        and reasoning kept). Any other end drops the calls, which are partial.
        """
        if stream.state is StreamState.ENDED:
            return False
        self.end(stream, *self.finish_calls(stream, reason, error))
        return True

    def finish_calls(
        self, stream: Stream, reason: str, error: tuple[str, str] | None
    ) -> tuple[str, tuple[str, str] | None, Sequence[ToolCall]]:
        """The end's reason, error and the calls it keeps (see :meth:`stream_end`)."""
        calls: Any = ()
        if reason in NATURAL_ENDS and stream.calls:
            calls = stream.finished_calls(drop_broken=reason == "length")
            if isinstance(calls, str):
                reason, error, calls = "error", (ErrorCode.PROVIDER_ERROR.value, calls), ()
            elif calls and reason == "complete":
                reason = "tool_calls"
        return reason, error, calls

    def end(self, stream: Stream, reason: str, error: tuple[str, str] | None, calls: Sequence[ToolCall]) -> None:
        """Send ``stream.end`` (of a run: with ``messages``, what it added, and
        its usage summed); a stream queued behind it in its thread starts."""
        run = stream.run
        waited = run is not None and run.message is not None  # it ended while it waited
        stream.state = StreamState.ENDED
        stream.reason = reason
        self.book.ended(stream)
        now = self.clock()
        usage = stream.usage()
        message = run.message if run is not None and run.message is not None else stream.message(calls)
        payload: dict[str, Any] = {
            "stream": stream.id,
            "reason": reason,
            "usage": usage,
            "ttft_ms": _ms(stream.first_token_at - stream.started_at) if stream.first_token_at is not None else None,
            "duration_ms": _ms(now - stream.started_at),
            "message": message,
        }
        if run is not None:
            added = run.messages(error[0] if error is not None else reason)
            if not waited and (message.content or message.tool_calls):
                added.append(message)
            payload["messages"], payload["steps"] = added, run.step
        if error is not None:
            payload["error"] = ErrorInfo(code=error[0], message=error[1])
        self.out.push(stream, StreamEnd, payload)
        if self.quota is not None:
            self.quota.spend(usage.output_tokens, now)
        if self.observer is not None:
            self.observer.stream_ended(self.id, stream, usage, error)
        if stream.channel is not None:
            self._to_channel(stream, StreamEnd(seq=1, **payload))
        if stream.thread is not None:
            self.thread_moved(stream)

    if TYPE_CHECKING:

        def thread_moved(self, ended: Stream) -> None: ...  # (AgentRuns)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
