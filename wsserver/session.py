"""The session core: sequencing, the replay log, the stream registry and the
request rules (generate, cancel, interrupt, ack).

No I/O happens here. Decoded client messages go in through :meth:`Session.handle`,
the stream runner reports provider events through ``stream_delta``,
``stream_usage`` and ``stream_end``, and the transport takes the encoded frames
out with :meth:`Session.take_output`. ``handle`` returns :class:`Action`
values (start or stop a generation) for the transport to carry out.

Sequencing happens when frames are *taken*, not when they are produced: if
the socket lags, the pending deltas of one stream are merged into one frame
before they get a ``seq`` (DESIGN "Decisions v1"), so ``seq`` stays contiguous
and a slow reader gets fewer, larger frames instead of an ever longer queue.
A merged delta never moves past another frame of its own stream, so a stream's
frames stay in order and no delta follows its ``stream.end``.

Every sequenced frame also enters the *replay log*, bounded by frames and by
bytes, trimmed by ``ack``. A resume replays the log after the client's
``last_seq`` (:meth:`Session.replay_after`); a snapshot resume replaces the
history with one ``stream.snapshot`` per running stream
(:meth:`Session.snapshot`). Attaching and detaching connections, and the
session's expiry, are the transport's business: the core neither knows nor
cares whether a socket is attached.
"""

from __future__ import annotations

import enum
import itertools
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from pydantic import BaseModel

from .errors import ErrorCode, ProtocolError
from .auth import ChannelRules
from .hub import NAME_RULE, Hub, valid_name
from .messages import (
    Ack,
    Cancel,
    ChatMessage,
    Error,
    ErrorInfo,
    Generate,
    GenerateParams,
    Interrupt,
    Message,
    Ok,
    Publish,
    Send,
    StreamEnd,
    StreamSnapshot,
    StreamStart,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Usage,
    compact,
    encode,
    encode_delta,
)

__all__ = [
    "Action",
    "HubCall",
    "Session",
    "StartGeneration",
    "StopGeneration",
    "Stream",
    "StreamState",
]


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


@dataclass(frozen=True, slots=True)
class StartGeneration:
    stream: Stream


@dataclass(frozen=True, slots=True)
class StopGeneration:
    stream_id: str


@dataclass(frozen=True, slots=True)
class HubCall:
    """A messaging request the backplane must carry out (Redis): the transport
    awaits it before the next request of the connection, then reports back
    through :meth:`Session.subscribed`, :meth:`Session.published` or
    :meth:`Session.sent`, so replies still leave in request order."""

    kind: str  # "subscribe" | "publish" | "send"
    msg: Any
    encoded: bytes | None = None


Action = StartGeneration | StopGeneration | HubCall


@dataclass(frozen=True, slots=True)
class MessagingLimits:
    max_subscriptions: int = 100
    max_data_bytes: int = 64 * 1024
    publish_rate: float = 100.0  # publications and direct messages per second
    publish_burst: float = 200.0


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


class Observer(Protocol):
    """Told about what happens in a session (metrics and event logs)."""

    def error(self, code: str) -> None: ...
    def stream_started(self, session_id: str, stream: Stream) -> None: ...
    def stream_ended(self, session_id: str, stream: Stream, usage: Usage, error: tuple[str, str] | None) -> None: ...


class ProviderCatalog(Protocol):
    def resolve(self, name: str | None, model: str | None) -> tuple[str, str]:
        """Return ``(provider, model)`` or raise an exception whose str() is for the client."""


_DELTA = 0
_FRAME = 1
_RAW = 2  # an encoded frame that carries no seq (pong)
#: Ended streams kept so that an interrupt racing the natural end still finds
#: the conversation to continue.
RECENT_STREAMS = 64


class Session:
    """The state of one session: seq, streams and the ids it has answered.

    Args:
        session_id: the public session id (sent in ``welcome``).
        providers: resolves ``generate.provider``/``model``.
        max_streams: concurrent running streams allowed (``too_many_streams``).
        remember_ids: how many answered request ids are remembered for
            ``duplicate_request`` (oldest forgotten first).
        max_log_messages, max_log_bytes: bounds of the replay log; beyond
            them the oldest frames are dropped, acknowledged or not.
        coalesce: merge a stream's pending deltas when the socket lags.
        clock: monotonic clock in seconds (injectable for tests).
        on_output: called when output becomes pending (the transport's wake-up),
            right after the first frame is queued: it may take the output at once.
    """

    # One per session, thousands per server: no per-instance __dict__.
    __slots__ = (
        "__weakref__",
        "_answered",
        "_auto_ids",
        "_log",
        "_log_first",
        "_pending",
        "_publish_bucket",
        "_recent",
        "_used_stream_ids",
        "acked",
        "agent",
        "channel_offsets",
        "clock",
        "coalesce",
        "generate_bucket",
        "held",
        "hub",
        "id",
        "identity",
        "limits",
        "log_bytes",
        "max_log_bytes",
        "max_log_messages",
        "max_streams",
        "observer",
        "on_output",
        "paused",
        "pending_raw_bytes",
        "providers",
        "public_id",
        "remember_ids",
        "rules",
        "seq",
        "streams",
        "subscriptions",
        "token_budget",
        "unsynced",
    )

    def __init__(
        self,
        session_id: str,
        *,
        providers: ProviderCatalog,
        max_streams: int = 8,
        remember_ids: int = 10_000,
        max_log_messages: int = 10_000,
        max_log_bytes: int = 4 << 20,
        coalesce: bool = True,
        clock: Callable[[], float] = time.monotonic,
        on_output: Callable[[], Any] | None = None,
        hub: Hub | None = None,
        agent: str | None = None,
        limits: MessagingLimits = MessagingLimits(),
        identity: str = "anonymous",
        rules: ChannelRules | None = None,
        observer: Observer | None = None,
        generate_bucket: TokenBucket | None = None,
        token_budget: TokenBudget | None = None,
    ) -> None:
        self.id = session_id
        self.providers = providers
        self.max_streams = max_streams
        self.remember_ids = remember_ids
        self.max_log_messages = max_log_messages
        self.max_log_bytes = max_log_bytes
        self.coalesce = coalesce
        self.clock = clock
        self.on_output = on_output
        #: Last seq handed out (0 before the first frame).
        self.seq = 0
        #: Highest seq the client acknowledged.
        self.acked = 0
        #: Running streams by id.
        self.streams: dict[str, Stream] = {}
        self._used_stream_ids: set[str] = set()
        self._auto_ids = itertools.count(1)
        self._answered: OrderedDict[str, str | None] = OrderedDict()
        self._recent: OrderedDict[str, Stream] = OrderedDict()
        self._pending: list[tuple[Any, ...]] = []
        #: Bytes of encoded frames waiting in the queue (channel traffic, pong).
        self.pending_raw_bytes = 0
        # The replay log (see :attr:`log`): the frames, oldest first, and the
        # seq of the first. Frames only, no (seq, frame) tuples: a tuple per
        # frame is a GC-tracked object per token, and their growth alone made
        # the cyclic GC run ~30 times a second under load. An empty tuple
        # until the first frame (an empty deque takes 760 bytes).
        self._log: deque[bytes] | tuple[()] = ()
        self._log_first = 1
        self.log_bytes = 0
        self.hub = hub
        self.agent = agent
        #: The authenticated identity this session is bound to.
        self.identity = identity
        self.rules = rules
        self.observer = observer
        self.generate_bucket = generate_bucket
        self.token_budget = token_budget
        #: ``from`` of an agent without a name; never the session id.
        self.public_id = "anon-" + secrets.token_hex(6)
        self.limits = limits
        self.subscriptions: set[str] = set()
        #: Subscriptions that get no live traffic until the client subscribes
        #: again (recovering by offset): those of a detached session.
        self.paused: set[str] = set()
        self._publish_bucket = TokenBucket(limits.publish_rate, limits.publish_burst)
        #: Channel traffic held back per channel while a backplane call of this
        #: session on that channel runs: (offset, frame), released in order after
        #: the reply (``subscribed`` or ``ok``), so nothing overtakes it.
        self.held: dict[str, list[tuple[int, bytes]]] = {}
        #: With a shared backplane: the last offset queued per channel (a copy
        #: of a publication that arrives late, twice, is dropped).
        self.channel_offsets: dict[str, int] = {}
        #: With a shared backplane: (seq, frame) sequenced but not yet written
        #: there. The transport writes them before it sends the frames.
        self.unsynced: list[tuple[int, bytes]] | None = None

    # ------------------------------------------------------------------ input

    def handle(self, msg: BaseModel) -> list[Action]:
        """Apply one decoded client request (anything but hello and ping)."""
        request_id: str | None = getattr(msg, "id", None)
        if request_id is not None and request_id in self._answered:
            stream = self._answered[request_id]
            self._emit_error(
                ErrorCode.DUPLICATE_REQUEST,
                f"request id {request_id!r} was already answered; it has no second effect",
                ref=request_id,
                stream=stream,
            )
            return []
        msg_type = msg.type  # type: ignore[attr-defined]
        actions: list[Action] = []
        stream_id: str | None = None
        if msg_type == "generate":
            stream_id, actions = self._generate(msg)  # type: ignore[arg-type]
        elif msg_type == "cancel":
            actions = self._cancel(msg)  # type: ignore[arg-type]
        elif msg_type == "interrupt":
            stream_id, actions = self._interrupt(msg)  # type: ignore[arg-type]
        elif msg_type == "ack":
            self._ack(msg)  # type: ignore[arg-type]
        elif msg_type == "subscribe":
            actions = self._subscribe(msg)  # type: ignore[arg-type]
        elif msg_type == "unsubscribe":
            self._unsubscribe(msg)  # type: ignore[arg-type]
        elif msg_type == "publish":
            actions = self._publish(msg)  # type: ignore[arg-type]
        elif msg_type == "send":
            actions = self._send(msg)  # type: ignore[arg-type]
        else:  # pragma: no cover - the protocol layer routes hello and ping
            raise AssertionError(f"unexpected message type {msg_type}")
        if request_id is not None:
            self._remember(request_id, stream_id)
        return actions

    def reject(self, exc: ProtocolError) -> None:
        """Answer a message that could not be decoded or is not allowed."""
        self._emit_error(exc.code, exc.message, ref=exc.ref, field=exc.field, **exc.extra)

    def _remember(self, request_id: str, stream_id: str | None) -> None:
        self._answered[request_id] = stream_id
        if len(self._answered) > self.remember_ids:
            self._answered.popitem(last=False)

    def _generate(self, msg: Generate) -> tuple[str | None, list[Action]]:
        ref = msg.id
        if msg.channel is not None and not self._check_channel(msg.channel, ref, publish=True):
            return None, []
        if not self._generation_allowed(ref):
            return None, []
        try:
            provider, model = self.providers.resolve(msg.provider, msg.model)
        except Exception as exc:  # the catalog's message is meant for the client
            self._emit_error(ErrorCode.PROVIDER_UNAVAILABLE, str(exc), ref=ref)
            return None, []
        stream_id = self._claim_stream_id(msg.stream, ref)
        if stream_id is None:
            return None, []
        stream = self._start_stream(
            stream_id,
            ref=ref,
            provider=provider,
            model=model,
            messages=tuple(msg.messages),
            params=msg.params,
            channel=msg.channel,
        )
        return stream_id, [StartGeneration(stream)]

    def _generation_allowed(self, ref: str | None) -> bool:
        now = self.clock()
        wait = self.generate_bucket.take(now) if self.generate_bucket is not None else 0.0
        what = "generations per minute"
        if not wait and self.token_budget is not None:
            wait, what = self.token_budget.wait(now), "output tokens per minute"
        if wait:
            self._emit_rate_limited(f"over this identity's limit of {what}", ref, wait)
            return False
        return True

    def _emit_rate_limited(self, message: str, ref: str | None, wait_s: float) -> None:
        self._emit_error(ErrorCode.RATE_LIMITED, message, ref=ref, retry_after_ms=max(1, int(wait_s * 1000)))

    def _claim_stream_id(self, wanted: str | None, ref: str | None) -> str | None:
        """The id for a new stream, or None after answering why there is none."""
        if wanted is not None and wanted in self._used_stream_ids:
            self._emit_error(
                ErrorCode.STREAM_EXISTS,
                f"stream id {wanted!r} is already used in this session",
                ref=ref,
                stream=wanted,
            )
            return None
        if len(self.streams) >= self.max_streams:
            self._emit_error(
                ErrorCode.TOO_MANY_STREAMS,
                f"at most {self.max_streams} streams may run at once in a session",
                ref=ref,
            )
            return None
        return wanted if wanted is not None else self._next_stream_id()

    def _start_stream(self, stream_id: str, **fields: Any) -> Stream:
        stream = Stream(id=stream_id, started_at=self.clock(), **fields)
        self._used_stream_ids.add(stream_id)
        self.streams[stream_id] = stream
        start = {
            "stream": stream_id,
            "ref": stream.ref,
            "provider": stream.provider,
            "model": stream.model,
            "steered_from": stream.steered_from,
        }
        self._emit(stream, StreamStart, start)
        if self.observer is not None:
            self.observer.stream_started(self.id, stream)
        if stream.channel is not None:  # (the requester's ref means nothing to watchers)
            self._to_channel(stream, StreamStart(seq=1, **{**start, "ref": None}))
        return stream

    def _next_stream_id(self) -> str:
        while True:
            candidate = f"s{next(self._auto_ids)}"
            if candidate not in self._used_stream_ids:
                return candidate

    def _cancel(self, msg: Cancel) -> list[Action]:
        stream = self.streams.get(msg.stream)
        if stream is None:
            state = "already ended" if msg.stream in self._used_stream_ids else "unknown"
            self._emit_error(
                ErrorCode.UNKNOWN_STREAM,
                f"stream {msg.stream!r} is {state}",
                ref=msg.id,
                stream=msg.stream,
            )
            return []
        self.stream_end(stream, "cancelled")
        if msg.id is not None:
            self._emit(None, Ok, {"ref": msg.id})
        return [StopGeneration(stream.id)]

    def _interrupt(self, msg: Interrupt) -> tuple[str | None, list[Action]]:
        stream = self.streams.get(msg.stream) or self._recent.get(msg.stream)
        if stream is None:
            self._emit_error(
                ErrorCode.UNKNOWN_STREAM,
                f"stream {msg.stream!r} is unknown",
                ref=msg.id,
                stream=msg.stream,
            )
            return None, []
        new_id: str | None = None
        if msg.input is not None:
            if msg.new_stream is not None and msg.new_stream in self._used_stream_ids:
                self._emit_error(
                    ErrorCode.STREAM_EXISTS,
                    f"stream id {msg.new_stream!r} is already used in this session",
                    ref=msg.id,
                    stream=msg.new_stream,
                )
                return None, []
        actions: list[Action] = []
        if stream.state is StreamState.RUNNING:
            self.stream_end(stream, "interrupted")
            actions.append(StopGeneration(stream.id))
        if msg.input is None:
            if msg.id is not None:
                self._emit(None, Ok, {"ref": msg.id})
            return None, actions
        # The interrupted stream freed its slot, so only a stream that had
        # already ended can meet the limit here.
        new_id = self._claim_stream_id(msg.new_stream, msg.id)
        if new_id is None:
            return None, actions
        steered = self._start_stream(
            new_id,
            ref=msg.id,
            provider=stream.provider,
            model=stream.model,
            messages=(*stream.conversation(), ChatMessage(role="user", content=msg.input)),
            params=stream.params,
            channel=stream.channel,
            steered_from=stream.id,
        )
        actions.append(StartGeneration(steered))
        return new_id, actions

    # ------------------------------------------------------------- messaging

    @property
    def name(self) -> str:
        """What others see as ``from``: the agent name, else a random public id."""
        return self.agent if self.agent is not None else self.public_id

    def _check_channel(self, channel: str, ref: str | None, *, publish: bool = False, subscribe: bool = False) -> bool:
        if self.hub is None:
            self._emit_error(ErrorCode.NOT_IMPLEMENTED, "channels are not enabled", ref=ref)
            return False
        if not valid_name(channel):
            self._emit_error(
                ErrorCode.BAD_NAME,
                f"a channel name {NAME_RULE}",
                ref=ref,
                field="channel",
            )
            return False
        rules = self.rules
        if rules is not None and (
            (publish and not rules.may_publish(channel)) or (subscribe and not rules.may_subscribe(channel))
        ):
            action = "publish on" if publish else "subscribe to"
            self._emit_error(ErrorCode.FORBIDDEN, f"not allowed to {action} {channel!r}", ref=ref)
            return False
        return True

    def _subscribe(self, msg: Subscribe) -> list[Action]:
        if not self._check_channel(msg.channel, msg.id, subscribe=True):
            return []
        assert self.hub is not None
        renewal = msg.channel in self.subscriptions
        if not renewal and len(self.subscriptions) >= self.limits.max_subscriptions:
            self._emit_error(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.limits.max_subscriptions} subscriptions per session",
                ref=msg.id,
            )
            return []
        if self.hub.remote:
            self.held.setdefault(msg.channel, [])
            return [HubCall("subscribe", msg)]
        channel, recovered, missed, joined = self.hub.subscribe(
            msg.channel, self, msg.since, msg.epoch
        )
        self.subscribed(msg, channel.epoch, channel.offset, recovered, channel.members, missed)
        if joined:
            self.hub.join_announce(channel, self)
        return []

    def subscribed(
        self, msg: Subscribe, epoch: str, offset: int, recovered: bool, members: list[str], missed: list[bytes]
    ) -> None:
        """Answer a subscribe: ``subscribed``, the recovered frames, then what
        arrived meanwhile (offsets above ``offset``)."""
        self.subscriptions.add(msg.channel)
        self.paused.discard(msg.channel)
        self._emit(
            None,
            Subscribed,
            {
                "ref": msg.id,
                "channel": msg.channel,
                "epoch": epoch,
                "offset": offset,
                "recovered": recovered,
                "members": members,
            },
        )
        for frame in missed:
            self.emit_unsequenced(frame)
        self.release(msg.channel, offset)

    def release(self, channel: str, after: int = 0) -> None:
        """Stop holding back ``channel``: queue what was held with offsets above ``after``."""
        held = self.held.pop(channel, None)
        if held is None and not after:
            return
        last = max(after, self.channel_offsets.get(channel, 0))
        for offset, frame in held or ():
            if offset > last:
                self.emit_unsequenced(frame)
                last = offset
        self.channel_offsets[channel] = last

    def _unsubscribe(self, msg: Unsubscribe) -> None:
        if not self._check_channel(msg.channel, msg.id):
            return
        assert self.hub is not None
        self.subscriptions.discard(msg.channel)
        self.paused.discard(msg.channel)
        self.channel_offsets.pop(msg.channel, None)
        self.hub.unsubscribe(msg.channel, self)
        if msg.id is not None:
            self._emit(None, Ok, {"ref": msg.id})

    def _encode_data(self, data: Any, ref: str | None) -> bytes | None:
        encoded = orjson.dumps(data)
        if len(encoded) > self.limits.max_data_bytes:
            self._emit_error(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"data is {len(encoded)} bytes; the limit is {self.limits.max_data_bytes}",
                ref=ref,
            )
            return None
        return encoded

    def _rate_limited(self, ref: str | None) -> bool:
        wait = self._publish_bucket.take(self.clock())
        if wait > 0:
            self._emit_rate_limited(f"more than {self.limits.publish_rate:g} publications per second", ref, wait)
            return True
        return False

    def _publish(self, msg: Publish) -> list[Action]:
        if not self._check_channel(msg.channel, msg.id, publish=True) or self._rate_limited(msg.id):
            return []
        encoded = self._encode_data(msg.data, msg.id)
        if encoded is None:
            return []
        assert self.hub is not None
        if self.hub.remote:
            if msg.channel in self.subscriptions:  # its own copy comes after the ok
                self.held.setdefault(msg.channel, [])
            return [HubCall("publish", msg, encoded)]
        # the ok goes first: the publisher's own copy (if subscribed) queues behind it
        ok_fields: dict[str, Any] = {"ref": msg.id, "offset": self.hub.channel(msg.channel).offset + 1}
        if msg.id is not None:
            self._emit(None, Ok, ok_fields)
        self.hub.publish(msg.channel, self.name, msg.data, encoded_data=encoded)
        return []

    def published(self, msg: Publish, offset: int) -> None:
        """The backplane gave the publication ``offset``: answer, then release the own copy."""
        if msg.id is not None:
            self._emit(None, Ok, {"ref": msg.id, "offset": offset})
        self.release(msg.channel)

    def _send(self, msg: Send) -> list[Action]:
        if self.hub is None:
            self._emit_error(ErrorCode.NOT_IMPLEMENTED, "messaging is not enabled", ref=msg.id)
            return []
        if not valid_name(msg.to):
            self._emit_error(ErrorCode.BAD_NAME, f"an agent name {NAME_RULE}", ref=msg.id, field="to")
            return []
        if self._rate_limited(msg.id):
            return []
        if self.hub.remote:
            encoded = self._encode_data(msg.data, msg.id)
            return [] if encoded is None else [HubCall("send", msg, encoded)]
        recipient = self.hub.agents.get(msg.to)
        if recipient is None:
            self.sent(msg, False)
            return []
        if self._encode_data(msg.data, msg.id) is None:
            return []
        recipient.deliver_direct(self.name, msg.data)
        self.sent(msg, True)
        return []

    def sent(self, msg: Send, delivered: bool) -> None:
        """Answer a send: ``ok``, or ``unknown_agent`` when no live session holds ``to``."""
        if not delivered:
            self._emit_error(ErrorCode.UNKNOWN_AGENT, f"no agent named {msg.to!r} is connected", ref=msg.id)
        elif msg.id is not None:
            self._emit(None, Ok, {"ref": msg.id})

    def hub_failed(self, call: HubCall, message: str) -> None:
        """The backplane could not carry out ``call``: answer ``backplane_unavailable``."""
        if call.kind == "subscribe":
            self.held.pop(call.msg.channel, None)
        elif call.kind == "publish":
            self.release(call.msg.channel)
        self._emit_error(ErrorCode.BACKPLANE_UNAVAILABLE, message, ref=call.msg.id, retry_after_ms=1000)

    def deliver_direct(self, sender: str, data: Any) -> None:
        """A direct message for this session: sequenced, so it is in the replay log."""
        self._emit(None, Message, {"from_": sender, "data": data})

    def _to_channel(self, stream: Stream, frame: BaseModel) -> None:
        if self.hub is None or stream.channel is None:
            return
        data = frame.model_dump(exclude_none=True)
        del data["seq"]
        self.hub.publish(stream.channel, self.name, data)

    def _ack(self, msg: Ack) -> None:
        if msg.seq > self.seq:
            self._emit_error(
                ErrorCode.BAD_MESSAGE,
                f"field 'seq': ack {msg.seq} is beyond the last seq sent ({self.seq})",
                ref=msg.id,
                field="seq",
            )
            return
        if msg.seq > self.acked:
            self.acked = msg.seq
            log = self._log
            drop = min(len(log), msg.seq - self._log_first + 1)
            if drop > 0:
                assert isinstance(log, deque)
                for _ in range(drop):
                    self.log_bytes -= len(log.popleft())
                self._log_first += drop
        if msg.id is not None:
            self._emit(None, Ok, {"ref": msg.id})

    # ------------------------------------------------------- provider events

    def stream_delta(self, stream: Stream, text: str, tokens: int | None = None) -> None:
        """The provider produced ``text``; ignored once the stream has ended."""
        if stream.state is not StreamState.RUNNING or not text:
            return
        if stream.first_token_at is None:
            stream.first_token_at = self.clock()
        stream.parts.append(text)
        if tokens is None:
            stream.exact_count = False
            stream.counted_tokens += 1
        else:
            stream.counted_tokens += tokens
        pending = self._pending
        pending.append((_DELTA, stream, text))
        if len(pending) == 1 and self.on_output is not None:
            self.on_output()
        if stream.channel is not None and self.hub is not None:
            index, stream.channel_index = stream.channel_index, stream.channel_index + 1
            data = {"type": "stream.delta", "stream": stream.id, "index": index, "text": text}
            self.hub.publish(stream.channel, self.name, data)

    def stream_usage(
        self, stream: Stream, input_tokens: int | None = None, output_tokens: int | None = None
    ) -> None:
        if stream.state is not StreamState.RUNNING:
            return
        if input_tokens is not None:
            stream.input_tokens = input_tokens
        if output_tokens is not None:
            stream.output_tokens = output_tokens

    def stream_end(
        self, stream: Stream, reason: str, error: tuple[str, str] | None = None
    ) -> bool:
        """End ``stream`` with ``reason``; returns False if it had already ended."""
        if stream.state is not StreamState.RUNNING:
            return False
        stream.state = StreamState.ENDED
        stream.reason = reason
        del self.streams[stream.id]
        self._recent[stream.id] = stream
        if len(self._recent) > RECENT_STREAMS:
            self._recent.popitem(last=False)
        now = self.clock()
        payload: dict[str, Any] = {
            "stream": stream.id,
            "reason": reason,
            "usage": self._usage(stream),
            "ttft_ms": _ms(stream.first_token_at - stream.started_at)
            if stream.first_token_at is not None
            else None,
            "duration_ms": _ms(now - stream.started_at),
        }
        if error is not None:
            payload["error"] = ErrorInfo(code=error[0], message=error[1])
        self._emit(stream, StreamEnd, payload)
        if self.token_budget is not None:
            self.token_budget.spend(payload["usage"].output_tokens, now)
        if self.observer is not None:
            self.observer.stream_ended(self.id, stream, payload["usage"], error)
        if stream.channel is not None:
            self._to_channel(stream, StreamEnd(seq=1, **payload))
        return True

    @staticmethod
    def _usage(stream: Stream) -> Usage:
        estimated = False
        input_tokens = stream.input_tokens
        if input_tokens is None:  # rough: ~4 characters a token
            input_tokens = sum(len(m.content) // 4 + 3 for m in stream.messages)
            estimated = True
        output_tokens = stream.output_tokens
        if output_tokens is None:
            output_tokens = stream.counted_tokens
            estimated = estimated or not stream.exact_count
        return Usage(
            input_tokens=input_tokens, output_tokens=output_tokens, estimated=estimated or None
        )

    def close(self, reason: str = "cancelled", error: tuple[str, str] | None = None) -> list[Action]:
        """End the session: every running stream is stopped with ``reason``."""
        actions: list[Action] = []
        for stream in list(self.streams.values()):
            self.stream_end(stream, reason, error)
            actions.append(StopGeneration(stream.id))
        return actions

    # ---------------------------------------------------------------- resume

    def replay_after(self, last_seq: int) -> list[bytes] | None:
        """The frames after ``last_seq``, or None if the log cannot provide them.

        Call :meth:`take_output` first if frames are pending: the replay
        covers what has been sequenced, and later frames follow it live.
        """
        if last_seq > self.seq or last_seq < self.acked:
            return None  # claims frames never sent, or goes back behind an ack
        log = self._log
        first = self._log_first if log else self.seq + 1
        if first > last_seq + 1:
            return None  # trimmed by the bounds
        if not log or self.seq <= last_seq:  # the log ends at self.seq
            return []
        return list(itertools.islice(log, last_seq + 1 - first, None))

    @property
    def log_first(self) -> int:
        """The seq of the oldest frame in the replay log (``seq + 1`` when it is empty)."""
        return self._log_first if self._log else self.seq + 1

    def restore_log(self, seq: int, acked: int, first: int, frames: list[bytes]) -> dict[str, list[str]]:
        """Take over a replay log kept elsewhere (a lost node's, from the backplane):
        ``frames`` are seqs ``first`` on, the session's seq is ``seq``.

        What the frames tell is taken back too: the request ids answered
        (``duplicate_request`` still holds) and the stream ids used. Returns
        the text of each stream's deltas in the log, by stream id.
        """
        self.seq, self.acked = seq, min(acked, seq)
        self._log = deque(frames) if frames else ()
        self._log_first = first if frames else seq + 1
        self.log_bytes = sum(map(len, frames))
        texts: dict[str, list[str]] = {}
        for frame in frames:
            msg = orjson.loads(frame)
            kind = msg["type"]
            if msg.get("ref") is not None:
                self._remember(msg["ref"], msg.get("stream") if kind == "stream.start" else None)
            if kind == "stream.start":
                self._used_stream_ids.add(msg["stream"])
            elif kind == "stream.delta":
                texts.setdefault(msg["stream"], []).append(msg["text"])
        return texts

    def end_lost(self, stream: Stream, parts: list[str], error: tuple[str, str]) -> None:
        """A stream that ran elsewhere and is gone with its node: it gets the
        text it had (``parts``, for an ``interrupt`` to continue from) and
        ends with ``error`` (its usage estimated from the deltas)."""
        self._used_stream_ids.add(stream.id)
        stream.parts = parts
        stream.counted_tokens, stream.exact_count = len(parts), False
        self.streams[stream.id] = stream
        self.stream_end(stream, "error", error)

    @property
    def log(self) -> list[tuple[int, bytes]]:
        """The replay log: ``(seq, frame)`` of every sequenced frame not yet
        acknowledged, oldest first, within the bounds (a copy)."""
        first = self._log_first
        return [(first + i, frame) for i, frame in enumerate(self._log)]

    def snapshot(self) -> None:
        """Queue one ``stream.snapshot`` per running stream (for a refreshed page).

        Pending frames are sequenced into the log first, so each snapshot's
        text holds every delta so far and its ``index`` is the next delta's.
        """
        self.take_output()
        for stream in self.streams.values():
            self._emit(
                stream,
                StreamSnapshot,
                {"stream": stream.id, "text": stream.text, "index": stream.next_index},
            )

    # ----------------------------------------------------------------- output

    def _emit(self, stream: Stream | None, model: type[BaseModel], fields: dict[str, Any]) -> None:
        pending = self._pending
        pending.append((_FRAME, stream, model, fields))
        if len(pending) == 1 and self.on_output is not None:
            self.on_output()

    def emit_unsequenced(self, frame: bytes) -> None:
        """Queue a frame that carries no ``seq`` (``pong``) in order with the rest."""
        pending = self._pending
        pending.append((_RAW, None, frame))
        self.pending_raw_bytes += len(frame)
        if len(pending) == 1 and self.on_output is not None:
            self.on_output()

    def _emit_error(self, code: str, message: str, **fields: Any) -> None:
        if self.observer is not None:
            self.observer.error(str(code))
        fields = {k: v for k, v in fields.items() if v is not None}
        self._emit(None, Error, {"code": str(code), "message": message, **fields})

    @property
    def has_output(self) -> bool:
        return bool(self._pending)

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def take_output(self) -> list[bytes]:
        """Sequence and encode everything pending, in order."""
        pending = self._pending
        if not pending:
            return []
        self._pending = []
        self.pending_raw_bytes = 0
        if self.coalesce and len(pending) > 1:
            pending = _coalesce(pending)
        out: list[bytes] = []
        seq = self.seq
        log, log_bytes = self._log, self.log_bytes
        if not isinstance(log, deque):
            log = self._log = deque()
        unsynced = self.unsynced
        for item in pending:
            if item[0] == _RAW:
                out.append(item[2])
                continue
            seq += 1
            if item[0] == _DELTA:
                stream = item[1]
                text = item[2] if isinstance(item[2], str) else "".join(item[2])
                frame = encode_delta(seq, stream.id, stream.next_index, text)
                stream.next_index += 1
            else:
                frame = encode(item[2](seq=seq, **item[3]))
            frame = compact(frame)  # kept in the log: count the bytes actually held
            out.append(frame)
            log.append(frame)
            log_bytes += len(frame)
            if unsynced is not None:
                unsynced.append((seq, frame))
        dropped = 0
        while log and (len(log) > self.max_log_messages or log_bytes > self.max_log_bytes):
            log_bytes -= len(log.popleft())
            dropped += 1
        self._log_first += dropped
        self.seq = seq
        self.log_bytes = log_bytes
        return out


def _coalesce(pending: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Merge each stream's consecutive deltas (no other frame of it in between)."""
    merged: list[tuple[Any, ...]] = []
    open_delta: dict[Stream, int] = {}
    for item in pending:
        stream = item[1]
        if item[0] == _DELTA:
            j = open_delta.get(stream)
            if j is None:
                open_delta[stream] = len(merged)
                merged.append(item)
            else:
                prev = merged[j]
                parts = prev[2] if isinstance(prev[2], list) else [prev[2]]
                parts.append(item[2])
                merged[j] = (_DELTA, stream, parts)
        else:
            if stream is not None:
                open_delta.pop(stream, None)
            merged.append(item)
    return merged


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
