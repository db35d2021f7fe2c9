"""The session core: a session's requests and its streams' events, no I/O.

Decoded client messages go in through :meth:`Session.handle`, which returns
:class:`~wsserver.core.actions.Action` values (start or stop a generation,
carry a messaging request to the backplane) for the transport to carry out.
The generation runner reports provider events through the methods of
:class:`~wsserver.core.generation.StreamEvents` (``stream_delta``,
``stream_reasoning``, ``stream_tool_call``, …, ``stream_end``). The transport *pulls* the
encoded frames with :meth:`take_output` when the outbox's ``on_output``
wake-up tells it there is something to take.

The parts, each in its own module:

* :class:`~wsserver.core.outbox.Outbox` — pending frames, sequencing,
  coalescing, the replay log (resume);
* :class:`~wsserver.core.streams.StreamBook` — running streams, used ids,
  recently ended streams;
* :class:`~wsserver.core.messaging.Membership` — subscriptions and the rules
  of subscribe, unsubscribe, publish and send;
* :class:`~wsserver.core.generation.StreamEvents` — the provider events of
  the streams, as frames (text, reasoning, tool calls, the end and its message);
* :class:`~wsserver.core.runs.AgentRuns` — agent runs (steps, tool results,
  approvals, calls routed to agents) and threads (``on_busy``);
* this module — the request rules of generate, cancel, interrupt and ack,
  request ids (``duplicate_request``), rate limits of generations.

Attaching and detaching connections, and the session's expiry, are the
transport's business: the core neither knows nor cares whether a socket is
attached.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel

from ..wire.errors import ErrorCode, ProtocolError
from ..wire.messages import (
    Ack,
    Cancel,
    ChatMessage,
    Generate,
    Interrupt,
    Ok,
    StreamSnapshot,
    StreamStart,
    Usage,
)
from .actions import Action, StartGeneration, StopGeneration
from .runs import AgentRuns, Run
from .conversation import check_generate
from .generation import StreamEvents
from .limits import ChannelRules, GenerationQuota, MessagingLimits, StreamLimits
from .messaging import ChannelSink, Membership
from .outbox import Outbox
from .streams import Stream, StreamBook, StreamState, text_bytes

__all__ = ["ANONYMOUS", "Observer", "ProviderCatalog", "Session"]

#: The identity of every client when authentication is off.
ANONYMOUS = "anonymous"


class Observer(Protocol):
    """Told about what happens in a session (metrics and event logs)."""

    def error(self, code: str) -> None: ...
    def stream_started(self, session_id: str, stream: Stream) -> None: ...
    def stream_ended(self, session_id: str, stream: Stream, usage: Usage, error: tuple[str, str] | None) -> None: ...


class ProviderCatalog(Protocol):
    def resolve(self, name: str | None, model: str | None) -> tuple[str, str]:
        """Return ``(provider, model)`` or raise an exception whose str() is for the client."""


class Session(StreamEvents, AgentRuns):
    """The state of one session: its outbox, its streams and the ids it has answered.

    Args:
        session_id: the public session id (sent in ``welcome``).
        providers: resolves ``generate.provider``/``model``.
        max_streams: concurrent running streams allowed (``too_many_streams``).
        stream_limits: what the streams may hold (:class:`~wsserver.core.limits.StreamLimits`).
        remember_ids: how many answered request ids are remembered for
            ``duplicate_request`` (oldest forgotten first).
        max_log_messages, max_log_bytes, coalesce, on_output: see :class:`Outbox`.
        clock: monotonic clock in seconds.
        channels: the backplane's channels (None: messaging is not enabled).
        public_id: ``from`` of an agent without a name; never the session id
            (random when not given).
        account: whose channel-history bound its publications count against (default ``identity``).
    """

    # One per session, thousands per server: no per-instance __dict__.
    __slots__ = (
        "__weakref__",
        "_answered",
        "agent",
        "book",
        "clock",
        "closing",
        "deferred",
        "id",
        "identity",
        "max_streams",
        "members",
        "observer",
        "on_actions",
        "out",
        "providers",
        "public_id",
        "quota",
        "remember_ids",
        "stream_limits",
    )

    def __init__(
        self,
        session_id: str,
        *,
        providers: ProviderCatalog,
        max_streams: int = 8,
        stream_limits: StreamLimits = StreamLimits(),
        remember_ids: int = 10_000,
        max_log_messages: int = 10_000,
        max_log_bytes: int = 4 << 20,
        coalesce: bool = True,
        clock: Callable[[], float] = time.monotonic,
        on_output: Callable[[], Any] | None = None,
        channels: ChannelSink | None = None,
        agent: str | None = None,
        limits: MessagingLimits = MessagingLimits(),
        identity: str = ANONYMOUS,
        rules: ChannelRules | None = None,
        observer: Observer | None = None,
        quota: GenerationQuota | None = None,
        public_id: str | None = None,
        account: str | None = None,
    ) -> None:
        self.id = session_id
        self.providers = providers
        self.max_streams = max_streams
        self.stream_limits = stream_limits
        self.remember_ids = remember_ids
        self.clock = clock
        self.agent = agent
        #: The authenticated identity this session is bound to.
        self.identity = identity
        self.observer = observer
        self.quota = quota
        self.public_id = public_id or "anon-" + secrets.token_hex(6)
        self.out = Outbox(
            max_log_messages=max_log_messages,
            max_log_bytes=max_log_bytes,
            coalesce=coalesce,
            on_output=on_output,
            observer=observer,
        )
        self.book = StreamBook(stream_limits.recent_bytes)
        self.members = Membership(
            agent if agent is not None else self.public_id,
            self.out,
            sink=channels,
            limits=limits,
            rules=rules,
            clock=clock,
            account=identity if account is None else account,
        )
        self._answered: OrderedDict[str, str | None] = OrderedDict()
        #: Actions of transitions the streams made by themselves (see :meth:`defer`),
        #: and the transport's wake-up for them.
        self.deferred: list[Action] = []
        self.on_actions: Callable[[], Any] | None = None
        #: Ending: no queued stream starts any more.
        self.closing = False

    # ------------------------------------------------------------- views

    @property
    def name(self) -> str:
        """What others see as ``from``: the agent name, else a random public id."""
        return self.members.name

    @property
    def streams(self) -> dict[str, Stream]:
        """Running streams by id."""
        return self.book.running

    @property
    def seq(self) -> int:
        return self.out.seq

    @property
    def acked(self) -> int:
        return self.out.acked

    @property
    def subscriptions(self) -> set[str]:
        return self.members.subscriptions

    @property
    def paused(self) -> set[str]:
        return self.members.paused

    @property
    def has_output(self) -> bool:
        return bool(self.out.pending)

    @property
    def answered(self) -> OrderedDict[str, str | None]:
        """Request ids answered (oldest first), with the stream each one started."""
        return self._answered

    @property
    def backlog(self) -> int:
        return len(self.out.pending)

    # ------------------------------------------------------------------ input

    def handle(self, msg: BaseModel) -> list[Action]:
        """Apply one decoded client request (anything but hello and ping)."""
        request_id: str | None = getattr(msg, "id", None)
        if request_id is not None and request_id in self._answered:
            self.out.error(
                ErrorCode.DUPLICATE_REQUEST,
                f"request id {request_id!r} was already answered; it has no second effect",
                ref=request_id,
                stream=self._answered[request_id],
            )
            return []
        msg_type = msg.type  # type: ignore[attr-defined]
        actions: list[Action] = []
        stream_id: str | None = None
        members = self.members
        if msg_type == "generate":
            stream_id, actions = self._generate(msg)  # type: ignore[arg-type]
        elif msg_type == "cancel":
            actions = self._cancel(msg)  # type: ignore[arg-type]
        elif msg_type == "interrupt":
            stream_id, actions = self._interrupt(msg)  # type: ignore[arg-type]
        elif msg_type == "ack":
            self._ack(msg)  # type: ignore[arg-type]
        elif msg_type == "subscribe":
            actions = members.subscribe(msg)  # type: ignore[arg-type]
        elif msg_type == "unsubscribe":
            actions = members.unsubscribe(msg)  # type: ignore[arg-type]
        elif msg_type == "publish":
            actions = members.publish(msg)  # type: ignore[arg-type]
        elif msg_type == "send":
            actions = members.send(msg)  # type: ignore[arg-type]
        elif msg_type == "tool_result":
            actions = self.tool_result(msg)  # type: ignore[arg-type]
        elif msg_type == "approve":
            self.approve(msg)  # type: ignore[arg-type]
        else:  # pragma: no cover - the protocol layer routes hello and ping
            raise AssertionError(f"unexpected message type {msg_type}")
        if request_id is not None:
            self.remember(request_id, stream_id)
        return actions

    def reject(self, exc: ProtocolError) -> None:
        """Answer a message that could not be decoded or is not allowed."""
        self.out.error(exc.code, exc.message, ref=exc.ref, field=exc.field, **exc.extra)

    def remember(self, request_id: str, stream_id: str | None) -> None:
        """``request_id`` was answered (for ``stream_id``): a repeat gets ``duplicate_request``."""
        self._answered[request_id] = stream_id
        if len(self._answered) > self.remember_ids:
            self._answered.popitem(last=False)

    def _generate(self, msg: Generate) -> tuple[str | None, list[Action]]:
        ref = msg.id
        if msg.channel is not None and not self.members.check_channel(msg.channel, ref, publish=True):
            return None, []
        problem = check_generate(msg)
        if problem is not None:
            self.reject(problem)
            return None, []
        found = self.busy_thread(msg)
        if found is None:
            return None, []
        busy, on_busy = found
        if not self.generation_allowed(ref):
            return None, []
        try:
            provider, model = self.providers.resolve(msg.provider, msg.model)
        except Exception as exc:  # the catalog's message is meant for the client
            self.out.error(ErrorCode.PROVIDER_UNAVAILABLE, str(exc), ref=ref)
            return None, []
        stream_id = self._claim_stream_id(msg.stream, ref, freeing=len(busy) if on_busy == "interrupt" else 0)
        if stream_id is None:
            return None, []
        actions: list[Action] = []
        sent = tuple(msg.messages)
        messages, steered_from, queued_after = self.follow_thread(busy, on_busy, sent, actions)
        stream = self._start_stream(
            stream_id,
            ref=ref,
            provider=provider,
            model=model,
            messages=messages,
            params=msg.params,
            channel=msg.channel,
            tools=tuple(msg.tools or ()),
            tool_choice=msg.tool_choice,
            steered_from=steered_from,
            thread=msg.thread,
            on_busy=msg.on_busy,
            queued_after=queued_after,
            client_messages=sent,
            run=Run(msg.max_steps) if msg.max_steps is not None and msg.max_steps > 1 else None,
        )
        if queued_after is None:
            actions.append(StartGeneration(stream))
        return stream_id, actions

    def _claim_stream_id(self, wanted: str | None, ref: str | None, freeing: int = 0) -> str | None:
        """The id for a new stream, or None after answering why there is none
        (``freeing``: streams this request ends first)."""
        if wanted is not None and self.book.used(wanted):
            self.out.error(
                ErrorCode.STREAM_EXISTS,
                f"stream id {wanted!r} is already used in this session",
                ref=ref,
                stream=wanted,
            )
            return None
        if len(self.book.running) - freeing >= self.max_streams:
            self.out.error(
                ErrorCode.TOO_MANY_STREAMS,
                f"at most {self.max_streams} streams may run at once in a session",
                ref=ref,
            )
            return None
        return wanted if wanted is not None else self.book.next_id()

    def _start_stream(self, stream_id: str, **fields: Any) -> Stream:
        stream = Stream(id=stream_id, started_at=self.clock(), **fields)
        if stream.queued_after is not None:
            stream.state = StreamState.QUEUED
        self.book.add(stream)
        start = {
            "stream": stream_id,
            "ref": stream.ref,
            "provider": stream.provider,
            "model": stream.model,
            "steered_from": stream.steered_from,
            "thread": stream.thread,
            "queued_after": stream.queued_after,
        }
        self.out.push(stream, StreamStart, start)
        if self.observer is not None:
            self.observer.stream_started(self.id, stream)
        if stream.channel is not None:  # (the requester's ref means nothing to watchers)
            self._to_channel(stream, StreamStart(seq=1, **{**start, "ref": None}))
        return stream

    def _cancel(self, msg: Cancel) -> list[Action]:
        stream = self.book.running.get(msg.stream)
        if stream is None:
            state = "already ended" if self.book.used(msg.stream) else "unknown"
            self.out.error(
                ErrorCode.UNKNOWN_STREAM, f"stream {msg.stream!r} is {state}", ref=msg.id, stream=msg.stream
            )
            return []
        self.stream_end(stream, "cancelled")
        if msg.id is not None:
            self.out.push(None, Ok, {"ref": msg.id})
        return [StopGeneration(stream.id)]

    def _interrupt(self, msg: Interrupt) -> tuple[str | None, list[Action]]:
        stream = self.book.find(msg.stream)
        if stream is None:
            self.out.error(ErrorCode.UNKNOWN_STREAM, f"stream {msg.stream!r} is unknown", ref=msg.id, stream=msg.stream)
            return None, []
        # (counted, not read again: the chain's size grows by what each steer adds)
        size = 0 if msg.input is None else stream.input_bytes + stream.kept_bytes + text_bytes(msg.input)
        if msg.input is not None and not self.steer_allowed(stream, msg, size):
            return None, []  # refused as a whole: nothing is interrupted
        actions: list[Action] = []
        if stream.state is not StreamState.ENDED:  # running, waiting for tool results, or queued
            self.stream_end(stream, "interrupted")
            actions.append(StopGeneration(stream.id))
        if msg.input is None:
            if msg.id is not None:
                self.out.push(None, Ok, {"ref": msg.id})
            return None, actions
        # The interrupted stream freed its slot, so only a stream that had
        # already ended can meet the limit here.
        new_id = self._claim_stream_id(msg.new_stream, msg.id)
        if new_id is None:
            return None, actions
        words = ChatMessage(role="user", content=msg.input)  # type: ignore[call-arg]
        steered = self._start_stream(
            new_id,
            ref=msg.id,
            provider=stream.provider,
            model=stream.model,
            messages=(*stream.conversation(), words),
            params=stream.params,
            channel=stream.channel,
            tools=stream.tools,
            tool_choice=stream.tool_choice,
            steered_from=stream.id,
            thread=stream.thread,
            client_messages=(*(stream.client_messages or stream.messages), words),
            run=Run(stream.run.max_steps) if stream.run is not None else None,
            input_bytes=size,
        )
        actions.append(StartGeneration(steered))
        return new_id, actions

    def _ack(self, msg: Ack) -> None:
        out = self.out
        if msg.seq > out.seq:
            out.error(
                ErrorCode.BAD_MESSAGE,
                f"field 'seq': ack {msg.seq} is beyond the last seq sent ({out.seq})",
                ref=msg.id,
                field="seq",
            )
            return
        out.ack(msg.seq)
        if msg.id is not None:
            out.push(None, Ok, {"ref": msg.id})

    def close(
        self, reason: str = "cancelled", error: tuple[str, str] | None = None, *, keep_waiting: bool = False
    ) -> list[Action]:
        """End the session: every stream is stopped with ``reason`` (queued
        ones first, so none starts). ``keep_waiting``: runs that wait for tool
        results and queued streams are left as they are (the session is
        handed to another node, which goes on with them)."""
        self.closing = True
        actions: list[Action] = []
        streams = sorted(self.book.running.values(), key=lambda s: s.state is not StreamState.QUEUED)
        for stream in streams:
            if keep_waiting and stream.state in (StreamState.WAITING, StreamState.QUEUED):
                continue
            why = error
            if why is not None and stream.state is StreamState.WAITING:
                why = (why[0], f"{why[1]}, while the run waited for {stream.run.waits()}")  # type: ignore[union-attr]
            self.stream_end(stream, reason, why)
            actions.append(StopGeneration(stream.id))
        self.deferred.clear()  # (a queued stream that would start, a call to route: not any more)
        return actions

    # ---------------------------------------------------------------- resume

    def replay_after(self, last_seq: int) -> list[bytes] | None:
        """See :meth:`Outbox.replay_after`."""
        return self.out.replay_after(last_seq)

    @property
    def log_first(self) -> int:
        return self.out.log_first

    @property
    def log(self) -> list[tuple[int, bytes]]:
        return self.out.log

    def snapshot(self) -> None:
        """Queue one ``stream.snapshot`` per running stream (for a refreshed page).

        Pending frames are sequenced into the log first, so each snapshot's
        text holds every delta so far and its ``index`` is the next delta's.
        """
        self.take_output()
        for stream in self.book.running.values():
            self.out.push(stream, StreamSnapshot, stream.snapshot())

    # ----------------------------------------------------------------- output

    def emit_unsequenced(self, frame: bytes) -> None:
        """Queue a frame that carries no ``seq`` (``pong``, channel traffic) in order with the rest."""
        self.out.push_raw(frame)

    def take_output(self) -> list[bytes]:
        """Sequence and encode everything pending, in order."""
        return self.out.take()
