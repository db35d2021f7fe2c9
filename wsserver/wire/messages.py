"""Wire messages of protocol v1: the pydantic models, and decoding client frames.

The models below are the single source of truth: ``protocol/schema/`` is
generated from them (``scripts/gen_schema.py``) and a test fails when it is
stale. Client messages are validated strictly (``"1"`` is not an integer);
unknown fields are ignored so that newer clients keep working.

Encoding server frames is :mod:`wsserver.wire.codec`'s business.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from .decoding import protocol_error
from .names import NAME_PATTERN

__all__ = [
    "PROTOCOL_VERSION", "SUPPORTED_PROTOCOLS", "SUBPROTOCOL", "MAX_STEPS", "Ack", "Approve", "Cancel",
    "ChatMessage", "ClientMessage", "ContentPart", "Error", "ErrorInfo", "Generate", "GenerateParams", "Hello",
    "ImagePart", "Interrupt", "JsonObjectFormat", "JsonSchemaFormat", "Message", "Ok", "Ping", "Pong",
    "Presence", "Publish", "ReasoningParams", "ReasoningPart", "ResponseFormat", "Send", "ServerMessage",
    "Shutdown", "SnapshotCall", "StreamDelta", "StreamEnd", "StreamSnapshot", "StreamStart", "StreamStep",
    "StreamToolCall", "StreamToolResult", "StreamWaiting", "Subscribe", "Subscribed", "TextPart", "Tool",
    "ToolCall", "ToolCallRequest", "ToolChoice", "ToolChoiceName", "ToolResult", "Unsubscribe", "Usage",
    "WaitingCall", "Welcome", "decode_client", "decode_server",
]

PROTOCOL_VERSION = 1
SUPPORTED_PROTOCOLS = (1,)
SUBPROTOCOL = "wsserver.v1"

#: Agent, channel and stream names.
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
#: Client-chosen request id, unique within a session.
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Seq = PositiveInt
StopReason = Literal["complete", "cancelled", "interrupted", "length", "tool_calls", "error"]
#: Tool names, as every provider accepts them.
ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
#: A tool call's id (the provider's, or the simulated provider's own).
CallId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
#: Bounds of an agent run (``generate.max_steps``) and of a tool's ``timeout_ms``.
MAX_STEPS = 64
MAX_TOOL_TIMEOUT_MS = 86_400_000


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _Client(_Strict):
    id: RequestId | None = None


class _Server(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# --------------------------------------------------------------------------
# Client -> server


class Hello(_Client):
    """First message of every connection; opens or resumes a session."""

    type: Literal["hello"]
    protocol: int
    session: str | None = Field(None, max_length=128)
    last_seq: NonNegativeInt | None = None
    snapshot: bool = False
    token: str | None = Field(None, max_length=8192)
    agent: str | None = Field(None, max_length=1024)  # checked: bad_name


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    """An image by ``http(s)`` URL or ``data:`` URL (checked: ``bad_image``)."""

    type: Literal["image"]
    url: str


class ReasoningPart(_Strict):
    """The model's reasoning, in an assistant message only. ``signature`` is
    what Anthropic needs back with it; ``redacted`` carries an opaque
    redacted block (Anthropic ``redacted_thinking``) as it came."""

    type: Literal["reasoning"]
    text: str = ""
    signature: str | None = None
    redacted: str | None = None


ContentPart = Annotated[Union[TextPart, ImagePart, ReasoningPart], Field(discriminator="type")]


class ToolCall(_Strict):
    """A call the model made, in an assistant message (``arguments`` parsed)."""

    id: CallId
    name: ToolName
    arguments: dict[str, Any]


class ChatMessage(_Strict):
    """One message of a conversation. ``content`` is a string or a list of
    parts; an assistant message may carry ``tool_calls``; a ``tool`` message
    answers the call named by ``tool_call_id``."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart]
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: CallId | None = None


class Tool(_Strict):
    """A tool the model may call; ``parameters`` is a JSON Schema of an object.

    In an agent run (``generate.max_steps`` > 1): ``agent`` routes its calls
    to the session holding that agent name, which answers them; ``approval``
    makes each call wait for ``approve`` first; ``timeout_ms`` bounds the wait
    for a result (for an agent's tool, 60 s unless given)."""

    name: ToolName
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    agent: str | None = Field(None, max_length=1024)  # checked: bad_name
    approval: bool = False
    timeout_ms: Annotated[int, Field(ge=1, le=MAX_TOOL_TIMEOUT_MS)] | None = None


class ToolChoiceName(_Strict):
    name: ToolName


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceName
#: What a generate does when a stream of its thread is still going.
OnBusy = Literal["parallel", "queue", "interrupt", "reject"]
#: What a call of a waiting run waits for.
WaitFor = Literal["approval", "client", "agent"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    name: ToolName
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


ResponseFormat = Annotated[Union[JsonSchemaFormat, JsonObjectFormat], Field(discriminator="type")]


class ReasoningParams(_Strict):
    effort: Literal["minimal", "low", "medium", "high"] | None = None
    budget_tokens: PositiveInt | None = None


class GenerateParams(_Strict):
    """Generation parameters. Unknown ones are ignored; ``provider_options``
    is merged into the upstream request as is (the escape hatch)."""

    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: list[str] | None = Field(None, max_length=16)
    response_format: ResponseFormat | None = None
    reasoning: ReasoningParams | None = None
    provider_options: dict[str, Any] | None = None
    # simulated provider only
    tokens_per_s: Annotated[float, Field(ge=0)] | None = None
    ttft_ms: Annotated[float, Field(ge=0, le=600_000)] | None = None
    reply_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


class Generate(_Client):
    """Start a generation; answered by ``stream.start`` (or ``error``)."""

    type: Literal["generate"]
    stream: Name | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    provider: Name | None = None
    model: str | None = Field(None, max_length=256)
    params: GenerateParams = GenerateParams()
    channel: str | None = Field(None, max_length=1024)  # checked: bad_name
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    #: An agent run: up to this many model steps, tool calls answered in between (1: a plain stream).
    max_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    #: The thread this stream belongs to, and what happens when one of it is still going.
    thread: Name | None = None
    on_busy: OnBusy | None = None


class ToolResult(_Client):
    """The result of a tool call: of a call of this session's own stream
    (``stream`` and the call's id), or of a call routed to this session's
    agent (a ``tool_call`` frame: its ``call`` alone)."""

    type: Literal["tool_result"]
    stream: Name | None = None
    call: CallId
    content: str | list[ContentPart]


class Approve(_Client):
    """Approve (or deny) a call of a run that waits for it; a denial goes to the model as the result."""

    type: Literal["approve"]
    stream: Name
    call: CallId
    approved: bool
    reason: str | None = Field(None, max_length=4096)


class Cancel(_Client):
    type: Literal["cancel"]
    stream: Name


class Interrupt(_Client):
    type: Literal["interrupt"]
    stream: Name
    input: str | None = None
    new_stream: Name | None = None


class Ack(_Client):
    type: Literal["ack"]
    seq: NonNegativeInt


class Ping(_Client):
    type: Literal["ping"]


# Channel and agent names are checked by the server (error bad_name), not by
# the schema, so that a bad name gets its own error code.
ChannelName = Annotated[str, StringConstraints(max_length=1024)]


class Subscribe(_Client):
    type: Literal["subscribe"]
    channel: ChannelName
    since: NonNegativeInt | None = None
    epoch: str | None = Field(None, max_length=128)


class Unsubscribe(_Client):
    type: Literal["unsubscribe"]
    channel: ChannelName


class Publish(_Client):
    type: Literal["publish"]
    channel: ChannelName
    data: Any


class Send(_Client):
    type: Literal["send"]
    to: ChannelName
    data: Any


ClientMessage = Annotated[
    Union[Hello, Generate, Cancel, Interrupt, Ack, Ping, Subscribe, Unsubscribe, Publish, Send, ToolResult, Approve],
    Field(discriminator="type"),
]


# --------------------------------------------------------------------------
# Server -> client


class Usage(_Server):
    input_tokens: NonNegativeInt
    output_tokens: NonNegativeInt
    estimated: bool | None = None


class ErrorInfo(_Server):
    code: str
    message: str


class Welcome(_Server):
    type: Literal["welcome"] = "welcome"
    protocol: int
    session: str
    resumed: bool
    heartbeat_ms: NonNegativeInt
    limits: dict[str, int]
    server: str


class StreamStart(_Server):
    type: Literal["stream.start"] = "stream.start"
    seq: Seq
    stream: str
    ref: str | None = None
    provider: str
    model: str
    steered_from: str | None = None
    thread: str | None = None
    #: Queued (``on_busy: "queue"``): it starts when this stream of its thread ends.
    queued_after: str | None = None


class StreamDelta(_Server):
    """Answer text; with ``part`` reasoning text, or (``part: "tool_call"``)
    a fragment of the arguments JSON of call ``call``."""

    type: Literal["stream.delta"] = "stream.delta"
    seq: Seq
    stream: str
    index: NonNegativeInt
    text: str
    part: Literal["reasoning", "tool_call"] | None = None
    call: str | None = None


class StreamToolCall(_Server):
    """The model opens a tool call; its arguments follow as ``stream.delta {part: "tool_call"}``."""

    type: Literal["stream.tool_call"] = "stream.tool_call"
    seq: Seq
    stream: str
    index: NonNegativeInt
    call: str
    name: str


class StreamEnd(_Server):
    type: Literal["stream.end"] = "stream.end"
    seq: Seq
    stream: str
    reason: StopReason
    error: ErrorInfo | None = None
    usage: Usage
    ttft_ms: float | None = None
    duration_ms: float
    #: The assistant message as it goes back into ``messages``.
    message: ChatMessage | None = None
    #: An agent run: everything it added to the conversation, and its steps.
    messages: list[ChatMessage] | None = None
    steps: PositiveInt | None = None


class WaitingCall(_Server):
    """A call a waiting run waits on: for ``approve`` (``approval``), for the
    session's client (``client``: send ``tool_result``), or for ``agent``."""

    id: str
    name: str
    arguments: dict[str, Any]
    wait: WaitFor
    agent: str | None = None


class StreamWaiting(_Server):
    """A step of a run ended with tool calls: what the run waits for now (the
    calls that have no result yet), and the step's assistant message."""

    type: Literal["stream.waiting"] = "stream.waiting"
    seq: Seq
    stream: str
    step: PositiveInt
    calls: list[WaitingCall]
    message: ChatMessage


class StreamToolResult(_Server):
    """A call of a waiting run got its result. ``error``: the server made it
    (``denied``, ``unknown_agent``, ``timeout``, ``backplane_unavailable``);
    ``from``: the agent that answered."""

    type: Literal["stream.tool_result"] = "stream.tool_result"
    seq: Seq
    stream: str
    call: str
    name: str
    content: str | list[ContentPart]
    error: str | None = None
    from_: str | None = Field(None, alias="from")


class StreamStep(_Server):
    """Every call has its result: the run's next step (2, 3, …) starts."""

    type: Literal["stream.step"] = "stream.step"
    seq: Seq
    stream: str
    step: PositiveInt


class ToolCallRequest(_Server):
    """A call routed to this session's agent (a tool with ``agent``): answer it
    with ``tool_result {call, content}``."""

    type: Literal["tool_call"] = "tool_call"
    seq: Seq
    call: str
    name: str
    arguments: dict[str, Any]
    from_: str = Field(alias="from")


class SnapshotCall(_Server):
    """A tool call as far as it has streamed (``arguments``: the JSON text so far)."""

    call: str
    name: str
    arguments: str


class StreamSnapshot(_Server):
    type: Literal["stream.snapshot"] = "stream.snapshot"
    seq: Seq
    stream: str
    text: str
    index: NonNegativeInt
    reasoning: str | None = None
    calls: list[SnapshotCall] | None = None
    #: An agent run: its step, and the calls it waits on (while it waits).
    step: PositiveInt | None = None
    waiting: list[WaitingCall] | None = None
    queued_after: str | None = None


class Message(_Server):
    """A direct message (``seq``) or a channel message (``channel``, ``offset``)."""

    type: Literal["message"] = "message"
    seq: Seq | None = None
    channel: str | None = None
    offset: PositiveInt | None = None
    from_: str = Field(alias="from")
    data: Any = None


class Subscribed(_Server):
    type: Literal["subscribed"] = "subscribed"
    seq: Seq
    ref: str | None = None
    channel: str
    epoch: str
    offset: NonNegativeInt
    recovered: bool
    members: list[str] = []


class Presence(_Server):
    type: Literal["presence"] = "presence"
    channel: str
    offset: PositiveInt
    joined: str | None = None
    left: str | None = None


class Ok(_Server):
    type: Literal["ok"] = "ok"
    seq: Seq
    ref: str | None = None
    offset: PositiveInt | None = None


class Pong(_Server):
    type: Literal["pong"] = "pong"
    ref: str | None = None


class Error(_Server):
    """A request-level failure. ``seq`` is absent before ``hello``."""

    type: Literal["error"] = "error"
    seq: Seq | None = None
    code: str
    message: str
    ref: str | None = None
    stream: str | None = None
    field: str | None = None
    #: The channel an error is about when no request names it (a subscription
    #: dropped on resume because the new credential does not allow it).
    channel: str | None = None
    supported: list[int] | None = None
    retry_after_ms: NonNegativeInt | None = None


class Shutdown(_Server):
    type: Literal["shutdown"] = "shutdown"
    reconnect_ms: NonNegativeInt
    drain_ms: NonNegativeInt | None = None


ServerMessage = Annotated[
    Union[
        Welcome,
        StreamStart,
        StreamDelta,
        StreamToolCall,
        StreamEnd,
        StreamSnapshot,
        StreamWaiting,
        StreamToolResult,
        StreamStep,
        ToolCallRequest,
        Message,
        Subscribed,
        Presence,
        Ok,
        Pong,
        Error,
        Shutdown,
    ],
    Field(discriminator="type"),
]

CLIENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClientMessage)
SERVER_ADAPTER: TypeAdapter[Any] = TypeAdapter(ServerMessage)
CLIENT_TYPES = frozenset(
    m.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    for m in ClientMessage.__origin__.__args__  # type: ignore[attr-defined]
)


# --------------------------------------------------------------------------
# Decoding


def decode_client(data: str | bytes) -> Any:
    """Decode one client frame into its model, or raise :class:`ProtocolError`.

    The error's code is one of ``bad_json``, ``bad_message`` (with ``field``)
    and ``unknown_type``; ``ref`` is the message's ``id`` when one can be read.
    """
    try:
        return CLIENT_ADAPTER.validate_json(data)
    except ValidationError as exc:
        raise protocol_error(data, exc, CLIENT_TYPES) from None


def decode_server(data: str | bytes) -> Any:
    """Decode one server frame into its model (used by tests and tools)."""
    return SERVER_ADAPTER.validate_json(data)
