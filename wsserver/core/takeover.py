"""Taking over a session whose node was lost (sans-I/O).

A backplane keeps every session's replay log; a node that adopts a lost
node's session rebuilds it from that log: the seq and the log continue, the
request ids the log answered still count as answered, the stream ids it
used stay used, and each stream that was running ends with an error, its
partial answer kept for an ``interrupt`` to continue from.
"""

from __future__ import annotations

import orjson

from .session import Session
from .streams import Stream

__all__ = ["end_lost", "restore_log"]


def restore_log(session: Session, seq: int, acked: int, first: int, frames: list[bytes]) -> dict[str, list[str]]:
    """Give ``session`` a replay log kept elsewhere: ``frames`` are seqs
    ``first`` on, the session's seq is ``seq``, its client acknowledged ``acked``.

    Returns the text of each stream's deltas in the log, by stream id.
    """
    session.out.restore(seq, acked, first, frames)
    texts: dict[str, list[str]] = {}
    for frame in frames:
        msg = orjson.loads(frame)
        kind = msg["type"]
        if msg.get("ref") is not None:
            session.remember(msg["ref"], msg.get("stream") if kind == "stream.start" else None)
        if kind == "stream.start":
            session.book.mark_used(msg["stream"])
        elif kind == "stream.delta":
            texts.setdefault(msg["stream"], []).append(msg["text"])
    return texts


def end_lost(session: Session, stream: Stream, parts: list[str], error: tuple[str, str]) -> None:
    """A stream that ran elsewhere and is gone with its node: it gets the text
    it had (``parts``) and ends with ``error`` (its usage estimated from the deltas)."""
    stream.parts = parts
    stream.counted_tokens, stream.exact_count = len(parts), False
    session.book.add(stream)
    session.stream_end(stream, "error", error)
