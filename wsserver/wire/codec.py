"""The one codec: every byte string that leaves as (or carries) a frame is built here.

Server frames are UTF-8 JSON objects whose first key is ``type`` (PROTOCOL.md
section 2). Most are encoded from their pydantic model by :func:`encode`; the
hot and the shared ones have their own builders, each checked by a test
against the model's encoding:

* :func:`encode_delta` — ``stream.delta``, once per token batch (answer
  text, reasoning, a tool call's arguments);
* :func:`encode_tool_call` — ``stream.tool_call``;
* :func:`channel_message` / :func:`channel_message_parts` — a channel
  ``message``, encoded once for every subscriber (the parts are the bytes
  around the offset, for a backplane that assigns the offset itself);
* :func:`presence` / :func:`presence_parts` — ``presence`` events, likewise;
* :func:`tunnel_frames` / :func:`tunnel_close` and :func:`read_tunnel` — what
  a node relays to a client's node (several frames, or a close);
* :func:`peek` — the ``type`` (and ``stream``) of a frame this codec built,
  without decoding it (a backplane indexing a session's log);
* :func:`seq_of` — the ``seq`` of such a frame (the HTTP transport's event id).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import orjson
from pydantic import BaseModel

from .messages import Message

__all__ = [
    "Peeked",
    "TunnelClose",
    "channel_message",
    "channel_message_parts",
    "compact",
    "encode",
    "encode_delta",
    "encode_tool_call",
    "peek",
    "presence",
    "presence_parts",
    "read_tunnel",
    "seq_of",
    "tunnel_close",
    "tunnel_frames",
    "wire_json",
]


def encode(msg: BaseModel) -> bytes:
    """Encode a server message as the UTF-8 JSON bytes of one text frame.

    Absent optional fields are left out rather than sent as null, except
    ``message.data``, which may be a JSON null.
    """
    fields = msg.model_dump(by_alias=True, exclude_none=True)
    if type(msg) is Message:
        fields["data"] = msg.data
    return orjson.dumps(fields)


def wire_json(model: BaseModel) -> dict[str, Any]:
    """A message model as the JSON data a client would send (field aliases,
    absent fields left out): what is kept of it elsewhere (a backplane, a
    parked session) and validated again when read back."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def compact(frame: bytes) -> bytes:
    """An exact-size copy of an orjson result (orjson's bytes keep a ~4 KiB
    buffer); for frames that are kept (replay log, channel history)."""
    return bytes(memoryview(frame))


def encode_delta(
    seq: int, stream: str, index: int, text: str, part: str | None = None, call: str | None = None
) -> bytes:
    """Hot-path encoder of ``stream.delta`` (same bytes as ``encode(StreamDelta(...))``):
    answer text, or with ``part`` reasoning text or (``part="tool_call"``) a
    fragment of the arguments of ``call``."""
    if part is None:
        return orjson.dumps({"type": "stream.delta", "seq": seq, "stream": stream, "index": index, "text": text})
    fields = {"type": "stream.delta", "seq": seq, "stream": stream, "index": index, "text": text, "part": part}
    if call is not None:
        fields["call"] = call
    return orjson.dumps(fields)


def encode_tool_call(seq: int, stream: str, index: int, call: str, name: str) -> bytes:
    """``stream.tool_call`` (same bytes as ``encode(StreamToolCall(...))``)."""
    return orjson.dumps(
        {"type": "stream.tool_call", "seq": seq, "stream": stream, "index": index, "call": call, "name": name}
    )


# ------------------------------------------------------------------ channels


def channel_message_parts(channel: str, sender: str, data: bytes) -> tuple[bytes, bytes]:
    """A channel ``message`` split around its offset: ``head + b"7" + tail``
    is the frame of offset 7 (a backplane script puts the offset between)."""
    head = b'{"type":"message","channel":' + orjson.dumps(channel) + b',"offset":'
    return head, b',"from":' + orjson.dumps(sender) + b',"data":' + data + b"}"


def channel_message(channel: str, offset: int, sender: str, data: bytes) -> bytes:
    """A channel ``message`` frame; ``data`` is already JSON (encoded once by the publisher)."""
    head, tail = channel_message_parts(channel, sender, data)
    return b"".join((head, str(offset).encode(), tail))


def presence_parts(channel: str, *, joined: str | None = None, left: str | None = None) -> tuple[bytes, bytes]:
    """A ``presence`` event split around its offset (see :func:`channel_message_parts`)."""
    head = b'{"type":"presence","channel":' + orjson.dumps(channel) + b',"offset":'
    tail = b""
    if joined is not None:
        tail += b',"joined":' + orjson.dumps(joined)
    if left is not None:
        tail += b',"left":' + orjson.dumps(left)
    return head, tail + b"}"


def presence(channel: str, offset: int, *, joined: str | None = None, left: str | None = None) -> bytes:
    head, tail = presence_parts(channel, joined=joined, left=left)
    return b"".join((head, str(offset).encode(), tail))


# ------------------------------------------------------------------- tunnels
# A node that serves a session for a client connected to another node sends
# it either frames (``F`` + the frames joined by newlines: JSON frames never
# hold a raw newline) or a close (``C`` + {"code", "reason"}).


class TunnelClose(NamedTuple):
    code: int
    reason: str


def tunnel_frames(frames: list[bytes]) -> bytes:
    return b"F" + b"\n".join(frames)


def tunnel_close(code: int, reason: str) -> bytes:
    return b"C" + orjson.dumps({"code": code, "reason": reason})


def read_tunnel(data: bytes) -> list[bytes] | TunnelClose:
    """The frames of a tunnel message, or the close it asks for."""
    if data[:1] == b"C":
        close = orjson.loads(data[1:])
        return TunnelClose(int(close["code"]), str(close["reason"]))
    return data[1:].split(b"\n")


# ---------------------------------------------------------------------- peek


class Peeked(NamedTuple):
    type: str
    #: ``stream`` of a ``stream.*`` frame, else None.
    stream: str | None
    #: Delivered to this session by the backplane: a direct ``message`` (it
    #: has a ``seq``; a channel one has an ``offset``) or a routed ``tool_call``.
    direct: bool
    #: ``call`` of a ``stream.tool_result``.
    call: str | None = None


#: Frames decoded for their stream id (rare: a few per stream).
_STREAM_TYPES = (
    b'{"type":"stream.start"',
    b'{"type":"stream.end"',
    b'{"type":"stream.waiting"',
    b'{"type":"stream.tool_result"',
    b'{"type":"stream.step"',
)
_DIRECT = (b'{"type":"message","seq":', b'{"type":"tool_call","seq":')


def peek(frame: bytes) -> Peeked:
    """What a frame built here is, read cheaply: only the rare frames that
    mark a stream's life (start, end, an agent run's waits, results and
    steps) are decoded, for their stream id."""
    if frame.startswith(_STREAM_TYPES):
        msg: dict[str, Any] = orjson.loads(frame)
        return Peeked(msg["type"], msg["stream"], False, msg.get("call"))
    if frame.startswith(_DIRECT):
        return Peeked("message" if frame[9] == ord("m") else "tool_call", None, True)
    end = frame.find(b'"', 9)
    return Peeked(frame[9:end].decode() if end > 9 else "", None, False)


#: Every sequenced frame built here has ``seq`` right after ``type``.
_SEQ = re.compile(rb'\{"type":"[a-z._]{1,32}","seq":([0-9]{1,18})[,}]')


def seq_of(frame: bytes) -> int | None:
    """The ``seq`` of a frame built here, or None for one without (``welcome``,
    ``pong``, ``shutdown``, channel traffic, an ``error`` before ``hello``)."""
    match = _SEQ.match(frame)
    return int(match[1]) if match else None
