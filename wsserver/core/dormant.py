"""A finished session at rest: everything it keeps, as one ``bytes`` (sans-I/O).

A session outlives its connection for ``session_ttl`` (120 s by default), and
most sessions that wait out that time are finished: detached, no stream
running, nothing pending. As live objects such a session is some 25
containers the cyclic garbage collector tracks (the session, its outbox,
stream book, membership, a stream with its request models, sets, dicts, the
runtime and its timer), and the collector visits every frame of its replay
log and every token of its answer on each full collection. Under connection
churn thousands of them pile up, and each full collection stops the event
loop (every stream) for longer and longer.

:func:`park` turns such a session into one ``bytes``: a JSON head (ids, seq,
ack, the request ids it answered, the stream ids it used, its recently ended
streams with their conversation, its publish bucket) followed by its replay
log's frames end to end, compressed (zlib, level 1: a log of JSON frames
shrinks about fivefold, for ~20 µs per park and ~10 µs per resume). ``bytes`` is not tracked by the collector, and
neither is a ``dict`` of them. :func:`read` and :func:`restore` rebuild it
on a resume, exactly as it was: the same seq, log, acknowledged position,
answered request ids (``duplicate_request``), used stream ids
(``stream_exists``) and ended streams an ``interrupt`` may continue.

Only a session that :func:`can_park` is parked: no stream running, no output
pending or unwritten, no messaging call under way, no subscription and no
agent name (a channel or the agent directory refers to the live object).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from ..wire.codec import wire_json
from ..wire.messages import ChatMessage
from .limits import ChannelRules
from .runs import Run
from .session import Session
from .streams import Reasoning, Stream, StreamState, request_fields, request_record, text_bytes

__all__ = ["Parked", "can_park", "park", "read", "restore"]

_VERSION = 1


def can_park(session: Session) -> bool:
    """Nothing about ``session`` needs a live object: see the module's docstring."""
    members = session.members
    out = session.out
    return not (
        session.book.running
        or out.pending
        or out.journal
        or members.subscriptions
        or members.held
        or session.agent is not None
    )


def park(session: Session, **extra: str | None) -> bytes:
    """``session`` as bytes (check :func:`can_park` first); ``extra`` is kept
    for the caller (what it needs to rebuild the session's surroundings)."""
    rules = session.members.rules
    bucket = session.members.bucket
    frames = [frame for _, frame in session.log]
    head = {
        "v": _VERSION,
        "identity": session.identity,
        "public_id": session.public_id,
        "rules": None if rules is None else [rules.subscribe, rules.publish],
        "seq": session.out.seq,
        "acked": session.out.acked,
        "first": session.log_first,
        "sizes": [len(frame) for frame in frames],
        "ids": sorted(session.book.ids_used),
        "answered": list(session.answered.items()),
        "recent": [_ended(stream) for stream in session.book.recent],
        "bucket": [bucket.tokens, bucket.stamp],
        "offsets": session.members.channel_offsets,
        "extra": extra,
    }
    return zlib.compress(b"".join((orjson.dumps(head), b"\n", *frames)), 1)


@dataclass(frozen=True, slots=True)
class Parked:
    """A parked session, read back: what building its :class:`Session` needs,
    and the rest for :func:`restore`."""

    identity: str
    public_id: str
    rules: ChannelRules | None
    extra: dict[str, Any]
    head: dict[str, Any]
    log: bytes


def read(blob: bytes) -> Parked:
    blob = zlib.decompress(blob)
    end = blob.index(b"\n")
    head = orjson.loads(blob[:end])
    if head.get("v") != _VERSION:  # pragma: no cover - parked and read by the same process
        raise ValueError(f"parked session of version {head.get('v')}")
    rules = head["rules"]
    return Parked(
        identity=head["identity"],
        public_id=head["public_id"],
        rules=None if rules is None else ChannelRules(tuple(rules[0]), tuple(rules[1])),
        extra=head["extra"],
        head=head,
        log=blob[end + 1 :],
    )


def restore(session: Session, parked: Parked) -> None:
    """Give a fresh ``session`` (built with ``parked``'s identity, public id
    and rules) everything else it had when it was parked."""
    head, log = parked.head, memoryview(parked.log)
    frames, at = [], 0
    for size in head["sizes"]:
        frames.append(bytes(log[at : at + size]))
        at += size
    session.out.restore(head["seq"], head["acked"], head["first"], frames)
    book = session.book
    for stream_id in head["ids"]:
        book.mark_used(stream_id)
    for record in head["recent"]:
        stream = _stream(record, session.clock())
        book.add(stream)
        book.ended(stream)
    for request_id, stream_id in head["answered"]:
        session.remember(request_id, stream_id)
    bucket = session.members.bucket
    bucket.tokens, bucket.stamp = head["bucket"]
    session.members.channel_offsets.update(head["offsets"])


def _ended(stream: Stream) -> dict[str, Any]:
    """What an ``interrupt`` on an ended stream needs: its request, its thread,
    what its run added (if it was a run) and its answer (text and finished
    reasoning, as :meth:`Stream.message` gives it)."""
    return {
        **request_record(stream),
        "id": stream.id,
        "steered_from": stream.steered_from,
        "reason": stream.reason,
        "answer": wire_json(stream.message())["content"],
        "thread": stream.thread,
        "client": None if stream.client_messages is None else [wire_json(m) for m in stream.client_messages],
        "run": None if stream.run is None else stream.run.state(),
    }


def _stream(record: dict[str, Any], now: float) -> Stream:
    stream = Stream(
        id=record["id"],
        ref=None,
        started_at=now,
        steered_from=record["steered_from"],
        state=StreamState.ENDED,
        reason=record["reason"],
        thread=record.get("thread"),
        client_messages=None if record.get("client") is None else tuple(map(ChatMessage.model_validate, record["client"])),
        run=None if record.get("run") is None else Run.from_state(record["run"]),
        **request_fields(record),
    )
    answer = record["answer"]
    if isinstance(answer, str):
        if answer:
            stream.keep(answer)
        return stream
    text = ""  # text parts and reasoning blocks where they were, as message() rebuilds them
    for part in answer:
        if part["type"] == "reasoning":
            if stream.reasoning is None:
                stream.reasoning = []
            reasoning = part.get("text", "")
            stream.reasoning.append(
                Reasoning(
                    [reasoning], len(text), 0,
                    signature=part.get("signature"), redacted=part.get("redacted"), done=True,
                )
            )
            stream.kept_bytes += text_bytes(reasoning) + len(part.get("signature") or "") + len(part.get("redacted") or "")
        else:
            text += part["text"]
    if text:
        stream.keep(text)  # (counted as it was, for the session's bound on ended streams)
    return stream
