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
    "Error",
    "ErrorInfo",
    "Generate",
    "GenerateParams",
    "Hello",
    "Interrupt",
    "Message",
    "Ok",
    "Ping",
    "Pong",
    "Presence",
    "Publish",
    "Send",
    "ServerMessage",
    "Shutdown",
    "StreamDelta",
    "StreamEnd",
    "StreamSnapshot",
    "StreamStart",
    "Subscribe",
    "Subscribed",
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
StopReason = Literal["complete", "cancelled", "interrupted", "length", "error"]


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


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateParams(_Strict):
    """Generation parameters. Unknown ones are ignored."""

    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: list[str] | None = Field(None, max_length=16)
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
    type: Literal["stream.delta"] = "stream.delta"
    seq: Seq
    stream: str
    index: NonNegativeInt
    text: str


class StreamEnd(_Server):
    type: Literal["stream.end"] = "stream.end"
    seq: Seq
    stream: str
    reason: StopReason
    error: ErrorInfo | None = None
    usage: Usage
    ttft_ms: float | None = None
    duration_ms: float


class StreamSnapshot(_Server):
    type: Literal["stream.snapshot"] = "stream.snapshot"
    seq: Seq
    stream: str
    text: str
    index: NonNegativeInt


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
    err = exc.errors(include_url=False)[0]
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
    if kind == "union_tag_not_found":
        return ProtocolError(
            ErrorCode.BAD_MESSAGE, "field 'type' is required", field="type", ref=ref
        )
    if kind == "union_tag_invalid":
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
    loc = [str(p) for p in err["loc"][1:]]  # drop the union tag
    field = ".".join(loc)
    if kind == "missing":
        text = f"field {field!r} is required"
    else:
        got = _lookup(obj, err["loc"][1:])
        text = f"field {field!r}: {err['msg'][0].lower()}{err['msg'][1:]}, got {_json_kind(got)}"
    return ProtocolError(ErrorCode.BAD_MESSAGE, text, field=field, ref=ref)


def _lookup(obj: Any, loc: tuple[Any, ...]) -> Any:
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
