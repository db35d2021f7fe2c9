"""Wire messages of protocol v1: the pydantic models, and decoding client frames.

The models below are the single source of truth: ``protocol/schema/`` is
generated from them (``scripts/gen_schema.py``) and a test fails when it is
stale. Client messages are validated strictly (``"1"`` is not an integer);
unknown fields are ignored so that newer clients keep working.

Encoding server frames is :mod:`wsserver.wire.codec`'s business.
"""

from __future__ import annotations

import json
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

from .errors import ErrorCode, ProtocolError
from .names import NAME_PATTERN

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_PROTOCOLS",
    "SUBPROTOCOL",
    "Ack",
    "Cancel",
    "ChatMessage",
    "ClientMessage",
    "ContentPart",
    "Error",
    "ErrorInfo",
    "Generate",
    "GenerateParams",
    "Hello",
    "ImagePart",
    "Interrupt",
    "JsonObjectFormat",
    "JsonSchemaFormat",
    "Message",
    "Ok",
    "Ping",
    "Pong",
    "Presence",
    "Publish",
    "ReasoningParams",
    "ReasoningPart",
    "ResponseFormat",
    "Send",
    "ServerMessage",
    "Shutdown",
    "SnapshotCall",
    "StreamDelta",
    "StreamEnd",
    "StreamSnapshot",
    "StreamStart",
    "StreamToolCall",
    "Subscribe",
    "Subscribed",
    "TextPart",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolChoiceName",
    "Unsubscribe",
    "Usage",
    "Welcome",
    "decode_client",
    "decode_server",
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
    """A tool the model may call; ``parameters`` is a JSON Schema of an object."""

    name: ToolName
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None


class ToolChoiceName(_Strict):
    name: ToolName


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceName


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
    Union[Hello, Generate, Cancel, Interrupt, Ack, Ping, Subscribe, Unsubscribe, Publish, Send],
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
        raise _protocol_error(data, exc) from None


def _protocol_error(data: str | bytes, exc: ValidationError) -> ProtocolError:
    errors = exc.errors(include_url=False)
    # Of the alternatives of a union (content: a string or a list of parts),
    # the one that got furthest into the input says what is wrong.
    err = max(errors, key=lambda e: len(e["loc"]))
    kind = err["type"]
    if kind == "json_invalid":
        return ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {err['msg'][14:]}")
    if kind == "string_unicode":  # a str with lone surrogates (never from the wire: UTF-8)
        return ProtocolError(ErrorCode.BAD_JSON, "not valid JSON: the text is not valid Unicode")
    # Valid JSON from here on, but possibly beyond what orjson reads (integers
    # over 64 bits, NaN, Infinity), so the rare error path uses the stdlib.
    obj = json.loads(data)
    if not isinstance(obj, dict):
        return ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"a message must be a JSON object, got {_json_kind(obj)}",
            field="",
        )
    ref = obj.get("id") if isinstance(obj.get("id"), str) and len(obj["id"]) <= 64 else None
    msg_type = obj.get("type")
    if kind == "union_tag_not_found" and len(err["loc"]) == 0:
        return ProtocolError(
            ErrorCode.BAD_MESSAGE, "field 'type' is required", field="type", ref=ref
        )
    if kind == "union_tag_invalid" and len(err["loc"]) == 0:
        if not isinstance(msg_type, str):
            return ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"field 'type' must be a string, got {_json_kind(msg_type)}",
                field="type",
                ref=ref,
            )
        shown = msg_type if len(msg_type) <= 40 else msg_type[:40] + "…"
        return ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {shown!r}; expected one of {', '.join(sorted(CLIENT_TYPES))}",
            ref=ref,
        )
    path = _field_path(obj, err["loc"][1:])  # drop the union tags
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # a part's (or a format's) type
        path.append(err["ctx"]["discriminator"].strip("'"))
        kind = "missing" if kind == "union_tag_not_found" else "literal_error"
        err = {**err, "msg": f"Input should be one of {err['ctx'].get('expected_tags', '?')}"}
    field = ".".join(str(p) for p in path)
    alternatives = [e for e in errors if _field_path(obj, e["loc"][1:]) == path]
    if kind == "missing":
        text = f"field {field!r} is required"
    elif len(alternatives) > 1 and len(err["loc"]) - 1 > len(path):  # e.g. a string or a list of parts
        text = f"field {field!r}: not of any accepted type, got {_json_kind(_lookup(obj, path))}"
    else:
        got = _lookup(obj, path)
        text = f"field {field!r}: {err['msg'][0].lower()}{err['msg'][1:]}, got {_json_kind(got)}"
    return ProtocolError(ErrorCode.BAD_MESSAGE, text, field=field, ref=ref)


def _field_path(obj: Any, loc: tuple[Any, ...]) -> list[Any]:
    """The fields and indexes of a pydantic error location in the input
    ``obj``, without the labels pydantic adds for a union's branches (``str``,
    ``list[...]``, a model's name) or a discriminated union's tag (the value
    of ``type``): a part followed by more parts must exist in the input."""
    path: list[Any] = []
    for i, part in enumerate(loc):
        if i + 1 < len(loc):
            if isinstance(obj, dict):
                if part not in obj or part == obj.get("type"):
                    continue
            elif isinstance(obj, list):
                if not isinstance(part, int) or not -len(obj) <= part < len(obj):
                    continue
            else:
                continue
        elif isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part):
            continue
        path.append(part)
        try:
            obj = obj[part]
        except (KeyError, IndexError, TypeError):
            obj = None
    return path


def _lookup(obj: Any, loc: list[Any]) -> Any:
    for part in loc:
        try:
            obj = obj[part]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def decode_server(data: str | bytes) -> Any:
    """Decode one server frame into its model (used by tests and tools)."""
    return SERVER_ADAPTER.validate_json(data)
