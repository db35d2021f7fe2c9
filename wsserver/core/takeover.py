"""Taking over a session whose node was lost (sans-I/O).

A backplane keeps every session's replay log; a node that adopts a lost
node's session rebuilds it from that log: the seq and the log continue, the
request ids the log answered still count as answered, the stream ids it
used stay used, and each stream that was running ends with an error, its
partial answer kept for an ``interrupt`` to continue from.

The partial answer is rebuilt from the stream's frames in the log (a
``stream.snapshot`` there starts it afresh, and so does an agent run's
``stream.waiting`` or ``stream.step``: the answer is the current step's):
its text, its reasoning and its tool calls. The reasoning's signatures are not on the wire before
``stream.end``, so the rebuilt reasoning has none; it counts as finished
when text or a call came after it. The calls are partial (the stream never
finished), so the ``stream.end`` that ends the lost stream carries none.
"""

from __future__ import annotations

from typing import Any

import orjson

from .session import Session
from .streams import Reasoning, Stream, text_bytes

__all__ = ["end_lost", "restore_log"]


#: The frames of a stream's answer: deltas of every part, tool calls, snapshots.
_ANSWER = frozenset({"stream.delta", "stream.tool_call", "stream.snapshot"})
#: An agent run's step boundaries: the answer so far is an earlier step's.
_STEP = frozenset({"stream.waiting", "stream.step"})


def restore_log(
    session: Session, seq: int, acked: int, first: int, frames: list[bytes]
) -> dict[str, list[dict[str, Any]]]:
    """Give ``session`` a replay log kept elsewhere: ``frames`` are seqs
    ``first`` on, the session's seq is ``seq``, its client acknowledged ``acked``.

    Returns each stream's answer frames in the log (decoded), by stream id.
    """
    session.out.restore(seq, acked, first, frames)
    answers: dict[str, list[dict[str, Any]]] = {}
    for frame in frames:
        msg = orjson.loads(frame)
        kind = msg["type"]
        if msg.get("ref") is not None:
            session.remember(msg["ref"], msg.get("stream") if kind == "stream.start" else None)
        if kind == "stream.start":
            session.book.mark_used(msg["stream"])
        elif kind in _ANSWER:
            answers.setdefault(msg["stream"], []).append(msg)
        elif kind in _STEP:
            answers[msg["stream"]] = []
    return answers


def end_lost(session: Session, stream: Stream, frames: list[dict[str, Any]], error: tuple[str, str]) -> None:
    """A stream that ran elsewhere and is gone with its node: it gets the
    answer its ``frames`` tell and ends with ``error`` (its usage estimated
    from the frames)."""
    text, reasoning, calls = stream.earlier()  # (a run's snapshot has its earlier steps too)
    done = {call.id for call in calls}
    for msg in frames:
        kind = msg["type"]
        if kind == "stream.snapshot":
            stream.parts, stream.reasoning, stream.calls, stream.kept_bytes = [], None, None, 0
            rest = msg["text"].removeprefix(text)
            if rest:
                stream.keep(rest)
            rest = msg.get("reasoning", "").removeprefix(reasoning)
            if rest:
                stream.reasoning = [Reasoning([rest], 0, 0)]
                stream.kept_bytes += text_bytes(rest)
            for call in msg.get("calls", ()):
                if call["call"] not in done:
                    stream.open_call(call["call"], call["name"])
                    stream.add_arguments(call["call"], call["arguments"])
            stream.counted_tokens = msg["index"]
            continue
        stream.counted_tokens += 1
        part = msg.get("part")
        if kind == "stream.tool_call":
            if msg["call"] not in (stream.calls or ()):
                stream.open_call(msg["call"], msg["name"])
        elif part is None:
            stream.keep(msg["text"])
        elif part == "reasoning":
            stream.add_reasoning(msg["text"])
        elif msg.get("call") in (stream.calls or ()):  # (its stream.tool_call may be acked away)
            stream.add_arguments(msg["call"], msg["text"])
    stream.exact_count = False
    session.book.add(stream)
    session.stream_end(stream, "error", error)
