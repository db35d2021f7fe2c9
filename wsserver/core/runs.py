"""Agent runs: one stream over several model steps, tool calls answered in between (no I/O).

A generate with ``max_steps`` > 1 makes its stream a *run*. When a step ends
with tool calls (and the run has steps left) the stream does not end: it
*waits* (``stream.waiting {step, calls, message}``), with no generation task
and no upstream open. Each call waits for one of:

* ``approval`` — its tool has ``approval: true``: an ``approve {stream, call,
  approved, reason?}``; a denial is the call's result, an approval makes it
  wait for its result (``stream.waiting`` again, without the decided call);
* ``client`` — a ``tool_result {stream, call, content}`` from any connection
  of the session;
* ``agent`` — its tool has ``agent``: the call is routed to the session that
  holds that agent name (:class:`~wsserver.core.actions.RouteCall`, a
  ``tool_call`` frame there), which answers with ``tool_result {call,
  content}``; no such agent, or no answer within the tool's ``timeout_ms``
  (:data:`AGENT_TIMEOUT_MS` by default), gives the model an error result.

Every result is a ``stream.tool_result`` frame; when each call has one, the
step's assistant message and the results (as ``tool`` messages, in the order
of the calls) are added to the run's conversation, ``stream.step {step}``
says the next step starts, and a new generation task runs it. One
``stream.end`` ends the run, with the usage of every step, the last
``message`` and ``messages``: everything the run added.

A result the server makes is a JSON object in the ``tool`` message's
content, ``{"error": CODE, "message": …}`` (``denied`` with the ``reason``,
``unknown_agent``, ``timeout``, ``backplane_unavailable``); a run that ends
while it waits gives each unanswered call such a result, with the end's code
(``cancelled``, ``interrupted``, ``expired``, …), so ``messages`` is always a
conversation a provider takes.

Transitions a stream makes by itself (a step ends, a call times out, an
agent's answer arrives, a queued stream starts) queue their actions with
:meth:`AgentRuns.defer`; the transport pulls them (``take_actions``) when
``on_actions`` tells it to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from ..wire.codec import wire_json
from ..wire.errors import ErrorCode
from ..wire.messages import (
    ChatMessage,
    Ok,
    StreamStep,
    StreamToolResult,
    StreamWaiting,
    ToolCall,
    ToolResult,
    WaitingCall,
)
from .actions import Action, AnswerCall, ArmTimer, RouteCall, StartGeneration, StopGeneration
from .conversation import check_content
from .streams import Stream, StreamState

if TYPE_CHECKING:
    from .messaging import Membership
    from .outbox import Outbox
    from .streams import StreamBook
    from ..wire.messages import Approve, Generate

__all__ = ["AGENT_TIMEOUT_MS", "AgentRuns", "Run", "RunCall", "continue_thread", "error_result", "route_id"]

#: How long a call routed to an agent waits for its answer unless its tool says (``timeout_ms``).
AGENT_TIMEOUT_MS = 60_000

def content_json(content: Any) -> Any:
    """A result's content as wire JSON (a string, or a list of part objects)."""
    if isinstance(content, str):
        return content
    return [p if isinstance(p, dict) else p.model_dump(mode="json", exclude_none=True) for p in content]


def error_result(code: str, message: str, **extra: Any) -> str:
    """The content of a result the server makes: ``{"error": code, "message": …}`` as JSON text."""
    return orjson.dumps({"error": code, "message": message, **extra}).decode()


def route_id(session_id: str, stream_id: str, call_id: str) -> str:
    """The id a routed call goes by (``tool_call.call``): the same every time
    for one call (routing again after a node change finds it), and not
    guessable without the session id, which is never on the wire."""
    digest = hashlib.sha256(f"{session_id}\0{stream_id}\0{call_id}".encode()).hexdigest()
    return "rc_" + digest[:32]


@dataclass(slots=True, eq=False)
class RunCall:
    """A call of the step a run waits on."""

    id: str
    name: str
    arguments: dict[str, Any]
    #: ``approval``, ``client`` or ``agent``: what it waits for.
    wait: str
    agent: str | None = None
    timeout_ms: int | None = None
    #: Its result (wire JSON: a string or a list of parts); None: none yet.
    content: Any = None
    #: The code of a result the server made (``denied``, ``timeout``, …).
    error: str | None = None
    #: The agent that answered.
    sender: str | None = None

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}  # type: ignore[attr-defined]


@dataclass(slots=True, eq=False)
class Run:
    """What a run adds to its stream: the steps so far, and the one it waits on."""

    max_steps: int
    step: int = 1
    #: What completed steps added: each step's assistant message, then its results.
    added: list[ChatMessage] = field(default_factory=list)
    #: While it waits: the step's assistant message and its calls.
    message: ChatMessage | None = None
    calls: dict[str, RunCall] | None = None
    #: Approvals given or refused, by call id.
    decisions: dict[str, bool] = field(default_factory=dict)
    #: Usage of the completed steps.
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False

    def waiting_calls(self) -> list[WaitingCall]:
        """The calls that have no result yet, as ``stream.waiting`` lists them."""
        return [
            WaitingCall(id=c.id, name=c.name, arguments=c.arguments, wait=c.wait, agent=c.agent)  # type: ignore[arg-type]
            for c in (self.calls or {}).values()
            if c.content is None
        ]

    def waits(self) -> str:
        """What the run waits for, in words (for an error message)."""
        what = {"approval": "an approval of {}", "client": "the result of {}", "agent": "the result of {} from agent {!r}"}
        return ", ".join(what[c.wait].format(repr(c.name), c.agent) for c in (self.calls or {}).values() if c.content is None)

    def results(self, ended: str | None = None) -> list[ChatMessage]:
        """The waiting step's results as ``tool`` messages, in the order of its
        calls; with ``ended`` (the run ended), unanswered calls get an error result."""
        out = []
        for call in (self.calls or {}).values():
            content = call.content
            if content is None:
                if ended is None:
                    continue
                content = error_result(ended, f"the run ended ({ended}) before this call had a result")
            out.append(ChatMessage.model_validate({"role": "tool", "tool_call_id": call.id, "content": content}))
        return out

    def messages(self, ended: str) -> list[ChatMessage]:
        """What the run added: completed steps, and the step it waited on (its
        unanswered calls given an error result saying it ``ended``)."""
        if self.message is None:
            return list(self.added)
        return [*self.added, self.message, *self.results(ended)]

    def result_of(self, call_id: str) -> Any:
        """The result (wire JSON) a call of this run already has, or None."""
        call = (self.calls or {}).get(call_id)
        if call is not None:
            return call.content
        for message in self.added:
            if message.role == "tool" and message.tool_call_id == call_id:
                return content_json(message.content)
        return None

    # ------------------------------------------------ kept on the backplane

    def state(self) -> dict[str, Any]:
        """As JSON, for the backplane (an adopting node rebuilds the run)."""
        out: dict[str, Any] = {
            "max_steps": self.max_steps,
            "step": self.step,
            "added": [wire_json(m) for m in self.added],
            "decisions": self.decisions,
            "usage": [self.input_tokens, self.output_tokens, self.estimated],
        }
        if self.message is not None:
            out["message"] = wire_json(self.message)
            out["calls"] = [c.state() for c in (self.calls or {}).values()]
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Run:
        run = cls(max_steps=state["max_steps"], step=state["step"])
        run.added = [ChatMessage.model_validate(m) for m in state.get("added", ())]
        run.decisions = dict(state.get("decisions", {}))
        run.input_tokens, run.output_tokens, run.estimated = state.get("usage", (0, 0, False))
        if "message" in state:
            run.message = ChatMessage.model_validate(state["message"])
            run.calls = {c["id"]: RunCall(**c) for c in state.get("calls", ())}
        return run


def continue_thread(prev: Stream, sent: Sequence[ChatMessage]) -> tuple[ChatMessage, ...]:
    """The conversation of a generate that follows ``prev`` in its thread
    (queued behind it, or interrupting it): when ``sent`` begins with the
    messages ``prev``'s client sent and goes on with no assistant message of
    its own, ``prev``'s whole conversation (what its run added, its answer)
    takes the place of that beginning; otherwise ``sent`` as it is."""
    prefix = prev.client_messages if prev.client_messages is not None else prev.messages
    n = len(prefix)
    if len(sent) < n or tuple(sent[:n]) != tuple(prefix) or (len(sent) > n and sent[n].role == "assistant"):
        return tuple(sent)
    return (*prev.conversation(), *sent[n:])


class AgentRuns:
    """The rules of agent runs and threads (a part of ``Session``)."""

    __slots__ = ()

    # Provided by Session.
    id: str
    out: Outbox
    book: StreamBook
    members: Membership
    clock: Callable[[], float]
    deferred: list[Action]
    on_actions: Callable[[], Any] | None
    closing: bool

    if TYPE_CHECKING:  # (StreamEvents)

        def stream_end(self, stream: Stream, reason: str, error: tuple[str, str] | None = None) -> bool: ...
        def finish_calls(
            self, stream: Stream, reason: str, error: tuple[str, str] | None
        ) -> tuple[str, tuple[str, str] | None, Sequence[ToolCall]]: ...
        def end(self, stream: Stream, reason: str, error: tuple[str, str] | None, calls: Sequence[ToolCall]) -> None: ...
        def _to_channel(self, stream: Stream, frame: Any) -> None: ...

    # ------------------------------------------------------------- actions

    def defer(self, action: Action) -> None:
        """Queue an action of a transition the stream made by itself (see the module's doc)."""
        deferred = self.deferred
        deferred.append(action)
        if len(deferred) == 1 and self.on_actions is not None:
            self.on_actions()

    def take_actions(self) -> list[Action]:
        """The deferred actions, in order (and none left)."""
        actions = list(self.deferred)
        self.deferred.clear()
        return actions

    # ------------------------------------------------------------- threads

    def busy_thread(self, msg: Generate) -> tuple[list[Stream], str] | None:
        """The streams of ``msg.thread`` not yet ended, and what ``on_busy``
        does about them (``parallel`` when there are none); None when the
        generate is refused (answered ``busy``)."""
        busy = self.book.in_thread(msg.thread) if msg.thread is not None else []
        on_busy = (msg.on_busy or "parallel") if busy else "parallel"
        if on_busy == "reject":
            text = f"thread {msg.thread!r} is busy with stream {busy[-1].id!r}"
            self.out.error(ErrorCode.BUSY, text, ref=msg.id, stream=busy[-1].id)
            return None
        return busy, on_busy

    def follow_thread(
        self, busy: list[Stream], on_busy: str, sent: tuple[ChatMessage, ...], actions: list[Action]
    ) -> tuple[tuple[ChatMessage, ...], str | None, str | None]:
        """A new stream's ``(messages, steered_from, queued_after)`` behind the
        ``busy`` streams of its thread: ``interrupt`` ends them (their stops
        go into ``actions``) and the newest one that had started goes on with
        the new input; ``queue`` waits behind the last."""
        if on_busy == "interrupt":
            source = next((b for b in reversed(busy) if b.state is not StreamState.QUEUED), busy[-1])
            for other in busy:
                self.stream_end(other, "interrupted")
                actions.append(StopGeneration(other.id))
            return continue_thread(source, sent), source.id, None
        if on_busy == "queue":
            return sent, None, busy[-1].id
        return sent, None, None

    # --------------------------------------------------------------- steps

    def step_end(self, stream: Stream, reason: str) -> None:
        """The provider finished a step: the stream ends, or (a run with steps
        left, a step that called tools) waits for the calls' results."""
        if stream.state is not StreamState.RUNNING:
            return
        reason, error, calls = self.finish_calls(stream, reason, None)
        run = stream.run
        if run is None or reason != "tool_calls" or not calls or run.step >= run.max_steps:
            self.end(stream, reason, error, calls)
            return
        run.message = stream.message(calls)
        stream.end_step()
        tools = {tool.name: tool for tool in stream.tools}
        run.calls = {}
        for made in calls:
            tool = tools.get(made.name)  # (a tool the request does not have: the client answers)
            wait = "approval" if tool is not None and tool.approval else "agent" if tool is not None and tool.agent else "client"
            run.calls[made.id] = RunCall(
                made.id, made.name, made.arguments, wait, tool.agent if tool else None, tool.timeout_ms if tool else None
            )
        stream.state = StreamState.WAITING
        self._push_waiting(stream)
        for call in run.calls.values():
            if call.wait != "approval":
                self._send_call(stream, call)

    def _push_waiting(self, stream: Stream) -> None:
        run = stream.run
        assert run is not None and run.message is not None
        fields: dict[str, Any] = {"stream": stream.id, "step": run.step, "calls": run.waiting_calls(), "message": run.message}
        self.out.push(stream, StreamWaiting, fields)
        if stream.channel is not None:
            self._to_channel(stream, StreamWaiting(seq=1, **fields))

    def _send_call(self, stream: Stream, call: RunCall) -> None:
        """The call now waits for its result: routed to its agent, its timer armed."""
        timeout = call.timeout_ms
        if call.wait == "agent":
            assert call.agent is not None
            route = route_id(self.id, stream.id, call.id)
            self.defer(RouteCall(stream.id, call.id, route, call.agent, call.name, call.arguments))
            timeout = timeout or AGENT_TIMEOUT_MS
        if timeout:
            self.defer(ArmTimer(stream.id, call.id, timeout / 1000))

    def resolve(
        self, stream: Stream, call: RunCall, content: Any, error: str | None = None, sender: str | None = None
    ) -> None:
        """``call`` has its result; when every call has one, the next step starts."""
        call.content, call.error, call.sender = content_json(content), error, sender
        fields: dict[str, Any] = {
            "stream": stream.id,
            "call": call.id,
            "name": call.name,
            "content": call.content,
            "error": error,
            "from_": sender,
        }
        self.out.push(stream, StreamToolResult, fields)
        if stream.channel is not None:
            self._to_channel(stream, StreamToolResult(seq=1, **fields))
        run = stream.run
        assert run is not None and run.calls is not None and run.message is not None
        if any(c.content is None for c in run.calls.values()):
            return
        run.added += [run.message, *run.results()]
        run.message, run.calls = None, None
        run.step += 1
        stream.start_step()
        stream.state = StreamState.RUNNING
        self.out.push(stream, StreamStep, {"stream": stream.id, "step": run.step})
        if stream.channel is not None:
            self._to_channel(stream, StreamStep(seq=1, stream=stream.id, step=run.step))
        self.defer(StartGeneration(stream))

    def thread_moved(self, ended: Stream) -> None:
        """A stream of a thread ended: the streams queued behind it start,
        continuing its conversation (:func:`continue_thread`)."""
        if self.closing:
            return
        for stream in list(self.book.running.values()):
            if stream.state is StreamState.QUEUED and stream.queued_after == ended.id:
                stream.messages = continue_thread(ended, stream.client_messages or stream.messages)
                stream.state = StreamState.RUNNING
                stream.started_at = self.clock()  # (its times count from when it runs)
                self.defer(StartGeneration(stream))

    def resume_waiting(self, stream: Stream) -> None:
        """A waiting run rebuilt on this node (its node was lost): route and
        time again the calls that wait for a result (a route is found again, never sent twice)."""
        for call in (stream.run.calls or {}).values():  # type: ignore[union-attr]
            if call.content is None and call.wait != "approval":
                self._send_call(stream, call)

    def _waiting_call(self, stream_id: str, call_id: str) -> tuple[Stream, RunCall] | None:
        stream = self.book.running.get(stream_id)
        if stream is None or stream.state is not StreamState.WAITING:
            return None
        call = stream.run.calls.get(call_id)  # type: ignore[union-attr]
        if call is None or call.content is not None:
            return None
        return stream, call

    # ------------------------------------------------ what the transport reports

    def call_routed(self, stream_id: str, call_id: str, delivered: bool | None) -> None:
        """The backplane routed a call (``delivered``: an agent's session took it;
        False: no live session holds the name; None: the backplane is unreachable)."""
        found = self._waiting_call(stream_id, call_id)
        if found is None or delivered:
            return
        stream, call = found
        if delivered is None:
            code, text = "backplane_unavailable", "the call could not be routed to its agent; the backplane is unreachable"
        else:
            code, text = "unknown_agent", f"no agent named {call.agent!r} is connected"
        self.resolve(stream, call, error_result(code, text, agent=call.agent), code)

    def routed_result(self, stream_id: str, call_id: str, content: Any, sender: str | None) -> None:
        """The agent answered a routed call (a late or second answer is dropped)."""
        found = self._waiting_call(stream_id, call_id)
        if found is not None and found[1].wait == "agent":
            self.resolve(found[0], found[1], content, None, sender)

    def call_timed_out(self, stream_id: str, call_id: str) -> None:
        found = self._waiting_call(stream_id, call_id)
        if found is None or found[1].wait == "approval":
            return
        stream, call = found
        ms = call.timeout_ms or AGENT_TIMEOUT_MS
        who = f"agent {call.agent!r}" if call.wait == "agent" else "the client"
        self.resolve(stream, call, error_result("timeout", f"{who} gave no result within {ms} ms"), "timeout")

    def call_answered(self, msg: ToolResult, verdict: str) -> None:
        """The backplane's verdict on this session's answer to a routed call:
        ``ok``, ``same`` (answered before with this content), ``different``,
        ``unknown``, ``forbidden`` (routed to another session), ``down``."""
        ref = msg.id
        if verdict in ("ok", "same"):
            if ref is not None:
                self.out.push(None, Ok, {"ref": ref})
        elif verdict == "different":
            self.out.error(ErrorCode.CALL_ANSWERED, f"call {msg.call!r} already has another result", ref=ref)
        elif verdict == "forbidden":
            self.out.error(ErrorCode.CALL_FORBIDDEN, f"call {msg.call!r} was not routed to this session", ref=ref)
        elif verdict == "down":
            self.out.error(ErrorCode.BACKPLANE_UNAVAILABLE, "the backplane is unreachable; try again", ref=ref, retry_after_ms=1000)
        else:
            self.out.error(ErrorCode.UNKNOWN_CALL, f"no call {msg.call!r} was routed to this session", ref=ref)

    # ------------------------------------------------------------ requests

    def tool_result(self, msg: ToolResult) -> list[Action]:
        """``tool_result``: for a call of this session's run, or (no ``stream``) of a call routed here."""
        problem = check_content(msg.content)
        if problem is not None:
            self.out.error(problem[0], problem[2], ref=msg.id, field=problem[1])
            return []
        if msg.stream is None:
            encoded = orjson.dumps(content_json(msg.content))
            return [AnswerCall(msg, encoded)]
        ref = msg.id
        stream = self.book.find(msg.stream)
        if stream is None:
            self.out.error(ErrorCode.UNKNOWN_STREAM, f"stream {msg.stream!r} is unknown", ref=ref, stream=msg.stream)
            return []
        run = stream.run
        prior = run.result_of(msg.call) if run is not None else None
        if prior is not None:  # idempotent: the same result again changes nothing
            if prior == content_json(msg.content):
                self._ok(ref)
            else:
                self.out.error(ErrorCode.CALL_ANSWERED, f"call {msg.call!r} already has another result", ref=ref)
            return []
        if stream.state is not StreamState.WAITING or run is None:
            self._not_waiting(stream, ref)
            return []
        call = run.calls.get(msg.call)  # type: ignore[union-attr]
        if call is None:
            self.out.error(ErrorCode.UNKNOWN_CALL, f"stream {stream.id!r} waits for no call {msg.call!r}", ref=ref)
        elif call.wait == "approval":
            self.out.error(ErrorCode.APPROVAL_REQUIRED, f"call {msg.call!r} waits for an approval first", ref=ref)
        elif call.wait == "agent":
            text = f"call {msg.call!r} was routed to agent {call.agent!r}; only its session may answer it"
            self.out.error(ErrorCode.CALL_FORBIDDEN, text, ref=ref)
        else:
            self.resolve(stream, call, msg.content)
            self._ok(ref)
        return []

    def approve(self, msg: Approve) -> None:
        ref = msg.id
        stream = self.book.find(msg.stream)
        if stream is None:
            self.out.error(ErrorCode.UNKNOWN_STREAM, f"stream {msg.stream!r} is unknown", ref=ref, stream=msg.stream)
            return
        run = stream.run
        decided = run.decisions.get(msg.call) if run is not None else None
        if decided is not None:  # idempotent: the same decision again changes nothing
            if decided == msg.approved:
                self._ok(ref)
            else:
                word = "approved" if decided else "denied"
                self.out.error(ErrorCode.NOT_WAITING, f"call {msg.call!r} was {word} already", ref=ref)
            return
        if stream.state is not StreamState.WAITING or run is None:
            self._not_waiting(stream, ref)
            return
        call = run.calls.get(msg.call)  # type: ignore[union-attr]
        if call is None:
            self.out.error(ErrorCode.UNKNOWN_CALL, f"stream {stream.id!r} waits for no call {msg.call!r}", ref=ref)
            return
        if call.wait != "approval":
            self.out.error(ErrorCode.NOT_WAITING, f"call {msg.call!r} does not wait for an approval", ref=ref)
            return
        run.decisions[call.id] = msg.approved
        if msg.approved:
            call.wait = "agent" if call.agent is not None else "client"
            self._push_waiting(stream)
            self._send_call(stream, call)
        else:
            extra = {"reason": msg.reason} if msg.reason is not None else {}
            self.resolve(stream, call, error_result("denied", "the user denied this call", **extra), "denied")
        self._ok(ref)

    def _ok(self, ref: str | None) -> None:
        if ref is not None:
            self.out.push(None, Ok, {"ref": ref})

    def _not_waiting(self, stream: Stream, ref: str | None) -> None:
        state = "ended" if stream.state is StreamState.ENDED else stream.state.name.lower()
        self.out.error(ErrorCode.NOT_WAITING, f"stream {stream.id!r} waits for nothing (it is {state})", ref=ref)
