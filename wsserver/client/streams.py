"""A generation as the Python client sees it: an async iterator of its text,
and of all its events (reasoning, tool calls, an agent run's waits, results
and steps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from ..wire.errors import ServerError, StreamFailed
from .types import PendingCall, StreamEvent, StreamResult, ToolCall, Usage, WaitingCall

if TYPE_CHECKING:
    from .client import Client

__all__ = ["ClientStream"]


class ClientStream:
    """One generation: an async iterator of text pieces.

    ``async for text in stream`` yields the answer text; :meth:`events`
    yields every event (text, reasoning, tool calls opening, argument
    fragments), each iterator from the first event on. ``result`` is set once
    ``stream.end`` arrived; ``message`` is then the assistant message to put
    back into ``messages`` and ``tool_calls`` its calls. Iteration ends
    normally for every reason but ``error``, which raises
    :class:`StreamFailed`.

    An agent run (``generate(max_steps=…)``) is one stream over its steps:
    the text iterator goes on across them; ``waiting`` holds the calls the
    run waits on; :meth:`wait_for_tools` returns when some need this client
    (an approval, a result no registered handler gives), and
    :meth:`tool_result` and :meth:`approve` answer them; ``messages`` (once
    ended) is everything the run added to the conversation.
    """

    def __init__(self, client: Client, ref: str) -> None:
        self._client = client
        self.ref = ref
        self.id: str | None = None
        self.provider: str | None = None
        self.model: str | None = None
        self.steered_from: str | None = None
        self.result: StreamResult | None = None
        #: Tool calls as far as they have streamed, by call id, in order.
        self.calls: dict[str, PendingCall] = {}
        #: An agent run: the step it is at, and the calls it waits on (by id).
        self.step = 1
        self.waiting: dict[str, WaitingCall] = {}
        self._acted: set[str] = set()  # calls this client answered or decided
        self._parts: list[str] = []
        self._reasoning: list[str] = []
        self._events: list[StreamEvent] = []
        self._text_at = 0  # the text iterator's place in _events
        self._ended = False
        self._wake: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self._parts)

    @property
    def reasoning(self) -> str:
        """The reasoning text received so far."""
        return "".join(self._reasoning)

    @property
    def message(self) -> dict[str, Any] | None:
        """The assistant message as it goes back into ``messages`` (once ended)."""
        return self.result.message if self.result is not None else None

    @property
    def messages(self) -> list[dict[str, Any]] | None:
        """What an agent run added to the conversation (once ended)."""
        return self.result.messages if self.result is not None else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls the model made (once ended; reason ``tool_calls``), arguments parsed."""
        message = self.message or {}
        return [ToolCall(c["id"], c["name"], c["arguments"]) for c in message.get("tool_calls") or ()]

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        while True:
            events = self._events
            while self._text_at < len(events):
                event = events[self._text_at]
                self._text_at += 1
                if event.kind == "text":
                    return event.text
            if not await self._next():
                raise StopAsyncIteration

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Every event of the stream, from the first on (each call starts afresh)."""
        at = 0
        while True:
            while at < len(self._events):
                at += 1
                yield self._events[at - 1]
            if not await self._next():
                return

    async def _next(self) -> bool:
        """Wait for the next event (True), or the end (False; raises the failure)."""
        if self._ended:
            if self._failure is not None:
                raise self._failure
            return False
        if self._wake is None:
            self._wake = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._wake)
        return True

    async def wait(self) -> StreamResult:
        """Consume the rest of the stream and return its result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def wait_for_tools(self) -> list[WaitingCall]:
        """Wait until the run waits on calls that need this client (an
        approval, or a result that no registered handler gives and that it
        has not sent), and return every call the run waits on; ``[]`` once
        the stream has ended (it raises, as iteration does, if it failed)."""
        while True:
            pending = list(self.waiting.values())
            if any(c.id not in self._acted and self._needs_me(c) for c in pending):
                return pending
            if not await self._next():
                return []

    def _needs_me(self, call: WaitingCall) -> bool:
        return call.wait == "approval" or (call.wait == "client" and not self._client.tools.handles(call.name))

    async def tool_result(self, call: str, content: Any) -> None:
        """Send the result of ``call`` (a string, a list of parts, or anything JSON)."""
        assert self.id is not None
        self._acted.add(call)
        await self._client.tool_result(call, content, stream=self.id)

    async def approve(self, call: str, approved: bool = True, reason: str | None = None) -> None:
        """Approve (or deny, with ``reason`` for the model) a call that waits for an approval."""
        assert self.id is not None
        self._acted.add(call)
        message: dict[str, Any] = {"type": "approve", "stream": self.id, "call": call, "approved": approved}
        if reason is not None:
            message["reason"] = reason
        await self._client.request(message)

    async def cancel(self) -> None:
        """Stop the generation. Returns once the stream has ended (a no-op if it had)."""
        if self.result is not None or self.id is None:
            return
        try:
            await self._client.request({"type": "cancel", "stream": self.id})
        except ServerError as exc:
            if exc.code != "unknown_stream":  # ended meanwhile: nothing to do
                raise

    async def interrupt(self, text: str | None = None) -> ClientStream | None:
        """Steer: stop this stream where it is and, with ``text``, continue the
        conversation (so far, plus ``text`` as the user's words) in a new stream,
        which is returned. Without ``text`` it only stops (reason ``interrupted``).
        The new stream keeps this one's tools.
        """
        assert self.id is not None
        message: dict[str, Any] = {"type": "interrupt", "stream": self.id}
        if text is None:
            await self._client.request(message)
            return None
        message["input"] = text
        return await self._client._start_stream(message)

    # called by the client's reader
    def _add(self, event: StreamEvent) -> None:
        kind = event.kind
        if kind == "text":
            self._parts.append(event.text)
        elif kind == "reasoning":
            self._reasoning.append(event.text)
        elif kind == "tool_call":
            self.calls[event.call or ""] = PendingCall(event.call or "", event.name or "")
        else:
            pending = self.calls.get(event.call or "")
            if pending is None:  # its opening was missed: keep the fragment anyway
                pending = self.calls[event.call or ""] = PendingCall(event.call or "", "")
            pending.arguments += event.text
        self._events.append(event)
        self._notify()

    def _notify(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _frame(self, kind: str, frame: Mapping[str, Any]) -> None:
        if kind == "stream.delta":
            self._delta(frame)
        elif kind == "stream.tool_call":
            self._tool_call(frame)
        elif kind == "stream.waiting":
            self._wait(frame["calls"], frame["step"])
        elif kind == "stream.tool_result":
            self._tool_result(frame)
        else:
            self._step(frame)

    def _delta(self, frame: Mapping[str, Any]) -> None:
        part = frame.get("part")
        if part is None:
            self._add(StreamEvent("text", frame["text"]))
        elif part == "reasoning":
            self._add(StreamEvent("reasoning", frame["text"]))
        elif part == "tool_call":
            self._add(StreamEvent("tool_call_delta", frame["text"], frame.get("call")))

    def _tool_call(self, frame: Mapping[str, Any]) -> None:
        self._add(StreamEvent("tool_call", call=frame["call"], name=frame.get("name")))

    def _wait(self, calls: list[Mapping[str, Any]], step: int | None) -> None:
        """The run waits on ``calls`` (those that have a result are not among them)."""
        if step is not None:
            self.step = step
        self.waiting = {
            c["id"]: WaitingCall(c["id"], c["name"], c.get("arguments") or {}, c["wait"], c.get("agent")) for c in calls
        }
        for call in self.waiting.values():  # a registered handler answers what waits for the client
            if call.wait == "client" and self._client.tools.answer(self.id, call.id, call.name, call.arguments):
                self._acted.add(call.id)
        self.events_added(StreamEvent("waiting", data=list(self.waiting.values())))

    def _tool_result(self, frame: Mapping[str, Any]) -> None:
        self.waiting.pop(frame["call"], None)
        event = StreamEvent("tool_result", frame.get("error") or "", frame["call"], frame.get("name"), frame.get("content"))
        self.events_added(event)

    def _step(self, frame: Mapping[str, Any]) -> None:
        self.step, self.waiting = frame["step"], {}
        self.events_added(StreamEvent("step", data=frame["step"]))

    def events_added(self, event: StreamEvent) -> None:
        self._events.append(event)
        self._notify()

    def _snapshot(self, frame: Mapping[str, Any]) -> None:
        # The server's answer so far: deliver only what this handle has not seen.
        for kind, text, seen in (("reasoning", frame.get("reasoning") or "", self.reasoning), ("text", frame["text"], self.text)):
            if text.startswith(seen) and len(text) > len(seen):
                self._add(StreamEvent(kind, text[len(seen) :]))  # type: ignore[arg-type]
        for call in frame.get("calls") or ():
            if call["call"] not in self.calls:
                self._add(StreamEvent("tool_call", call=call["call"], name=call["name"]))
            seen = self.calls[call["call"]].arguments
            arguments = call["arguments"]
            if arguments.startswith(seen) and len(arguments) > len(seen):
                self._add(StreamEvent("tool_call_delta", arguments[len(seen) :], call["call"]))
        if frame.get("step") is not None:  # an agent run: where it is, what it waits on
            self._wait(frame.get("waiting") or [], frame["step"])

    def _end(self, frame: Mapping[str, Any]) -> None:
        usage = frame.get("usage") or {}
        error = frame.get("error") or {}
        self.result = StreamResult(
            reason=frame["reason"],
            usage=Usage(
                usage.get("input_tokens", 0),
                usage.get("output_tokens", 0),
                bool(usage.get("estimated", False)),
            ),
            ttft_ms=frame.get("ttft_ms"),
            duration_ms=frame.get("duration_ms", 0.0),
            text=self.text,
            error_code=error.get("code"),
            error_message=error.get("message"),
            message=frame.get("message"),
            reasoning=self.reasoning,
            messages=frame.get("messages"),
            steps=frame.get("steps"),
        )
        self.waiting = {}
        if frame["reason"] == "error":
            self._failure = StreamFailed(
                error.get("code", "internal"), error.get("message", ""), self.result
            )
        self._ended = True
        self._notify()

    def _lost(self, exc: BaseException) -> None:
        if self.result is None and self._failure is None:
            self._failure = exc
            self._ended = True
            self._notify()
