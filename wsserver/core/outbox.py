"""A session's output: pending frames, sequencing, coalescing and the replay log.

Frames are *queued* by the session core (:meth:`Outbox.push`,
:meth:`Outbox.push_delta`, :meth:`Outbox.push_raw`) and *sequenced* only when
the transport takes them (:meth:`Outbox.take`): if the socket lags, the
pending deltas of one stream are merged into one frame before they get a
``seq`` (DESIGN "Decisions v1"), so ``seq`` stays contiguous and a slow
reader gets fewer, larger frames instead of an ever longer queue. Only
neighbours merge: deltas of the same stream, part (answer text, reasoning,
a tool call's arguments) and call, with no other frame of that stream in
between. A merged delta never moves past another frame of its own stream, so
a stream's frames stay in order and no delta follows its ``stream.end``.
Delta-like frames (``stream.delta`` of every part, ``stream.tool_call``)
get their stream's next ``index`` when they are sequenced.

Every sequenced frame also enters the *replay log*, bounded by frames and by
bytes and trimmed by ``ack`` (:meth:`Outbox.ack`); :meth:`Outbox.replay_after`
reads it for a resume. With a shared backplane the outbox also keeps a
*journal*: the frames sequenced but not yet written there, which the
transport writes before it sends them.

``on_output`` is the transport's wake-up: it is called when the first frame
of a batch is queued, and the transport takes the output later (pull, never
push).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel

from ..wire.codec import compact, encode, encode_delta, encode_tool_call
from ..wire.errors import ErrorCode
from ..wire.messages import Error
from .framelog import FrameLog
from .streams import Stream

__all__ = ["Outbox"]

class ErrorObserver(Protocol):
    def error(self, code: str) -> None: ...


_DELTA = 0  # answer text: (_DELTA, stream, text)
_FRAME = 1  # (_FRAME, stream, model, fields)
_RAW = 2  # an encoded frame that carries no seq (pong, channel traffic)
_PART = 3  # reasoning text or tool-call arguments: (_PART, stream, text, part, call)
_CALL = 4  # stream.tool_call: (_CALL, stream, call, name)


class Outbox:
    """Args:
    max_log_messages, max_log_bytes: bounds of the replay log; beyond them
        the oldest frames are dropped, acknowledged or not.
    coalesce: merge a stream's pending deltas when the socket lags.
    on_output: called when output becomes pending (right after the first
        frame is queued: it may take the output at once).
    observer: told the code of every ``error`` frame queued (metrics).
    """

    # One per session, thousands per server: no per-instance __dict__.
    __slots__ = (
        "_log",
        "_log_first",
        "acked",
        "coalesce",
        "journal",
        "log_bytes",
        "max_log_bytes",
        "max_log_messages",
        "observer",
        "on_output",
        "pending",
        "pending_raw_bytes",
        "seq",
    )

    def __init__(
        self,
        *,
        max_log_messages: int = 10_000,
        max_log_bytes: int = 4 << 20,
        coalesce: bool = True,
        on_output: Callable[[], Any] | None = None,
        observer: ErrorObserver | None = None,
    ) -> None:
        self.max_log_messages = max_log_messages
        self.max_log_bytes = max_log_bytes
        self.coalesce = coalesce
        self.on_output = on_output
        self.observer = observer
        #: Last seq handed out (0 before the first frame).
        self.seq = 0
        #: Highest seq the client acknowledged.
        self.acked = 0
        #: Queued items, not yet sequenced (see :meth:`take`).
        self.pending: list[tuple[Any, ...]] = []
        #: Bytes of encoded frames waiting in the queue (channel traffic, pong).
        self.pending_raw_bytes = 0
        # The replay log (see :attr:`log`): the frames, oldest first, and the
        # seq of the first. Frames only, no (seq, frame) tuples: a tuple per
        # frame is a GC-tracked object per token, and their growth alone made
        # the cyclic GC run ~30 times a second under load; and in chunks the
        # collector does not visit (core/framelog.py). An empty tuple until
        # the first frame.
        self._log: FrameLog | tuple[()] = ()
        self._log_first = 1
        self.log_bytes = 0
        #: With a shared backplane: (seq, frame) sequenced but not yet written
        #: there. The transport writes them before it sends the frames.
        self.journal: list[tuple[int, bytes]] | None = None

    # ------------------------------------------------------------------ queue

    def push_delta(self, stream: Stream, text: str) -> None:
        pending = self.pending
        pending.append((_DELTA, stream, text))
        if len(pending) == 1 and self.on_output is not None:
            self.on_output()

    def push_part(self, stream: Stream, text: str, part: str, call: str | None) -> None:
        """Queue a ``stream.delta`` of another part than the answer text
        (``reasoning``, or ``tool_call`` with its ``call``)."""
        pending = self.pending
        pending.append((_PART, stream, text, part, call))
        if len(pending) == 1 and self.on_output is not None:
            self.on_output()

    def push_call(self, stream: Stream, call: str, name: str) -> None:
        """Queue a ``stream.tool_call`` (it takes the stream's next index)."""
        pending = self.pending
        pending.append((_CALL, stream, call, name))
        if len(pending) == 1 and self.on_output is not None:
            self.on_output()

    def push(self, stream: Stream | None, model: type[BaseModel], fields: dict[str, Any]) -> None:
        """Queue a sequenced frame (of ``stream``, which keeps it in order with
        that stream's deltas); it is built from ``model(seq=…, **fields)``."""
        pending = self.pending
        pending.append((_FRAME, stream, model, fields))
        if len(pending) == 1 and self.on_output is not None:
            self.on_output()

    def push_raw(self, frame: bytes) -> None:
        """Queue a frame that carries no ``seq`` (``pong``, channel traffic) in order with the rest."""
        pending = self.pending
        pending.append((_RAW, None, frame))
        self.pending_raw_bytes += len(frame)
        if len(pending) == 1 and self.on_output is not None:
            self.on_output()

    def error(self, code: str, message: str, **fields: Any) -> None:
        """Queue an ``error`` frame (fields that are None are left out)."""
        if self.observer is not None:
            self.observer.error(str(code))
        fields = {k: v for k, v in fields.items() if v is not None}
        self.push(None, Error, {"code": str(code), "message": message, **fields})

    def rate_limited(self, message: str, ref: str | None, wait_s: float) -> None:
        """Queue ``error rate_limited`` with ``retry_after_ms`` (at least 1)."""
        self.error(ErrorCode.RATE_LIMITED, message, ref=ref, retry_after_ms=max(1, int(wait_s * 1000)))

    @property
    def has_output(self) -> bool:
        return bool(self.pending)

    @property
    def backlog(self) -> int:
        return len(self.pending)

    # ------------------------------------------------------------------- take

    def take(self) -> list[bytes]:
        """Sequence and encode everything pending, in order."""
        pending = self.pending
        if not pending:
            return []
        self.pending = []
        self.pending_raw_bytes = 0
        if self.coalesce and len(pending) > 1:
            pending = _coalesce(pending)
        out: list[bytes] = []
        seq = self.seq
        log, log_bytes = self._log, self.log_bytes
        if not isinstance(log, FrameLog):
            log = self._log = FrameLog()
        journal = self.journal
        for item in pending:
            if item[0] == _RAW:
                out.append(item[2])
                continue
            seq += 1
            kind = item[0]
            if kind == _DELTA:
                stream = item[1]
                text = item[2] if isinstance(item[2], str) else "".join(item[2])
                frame = encode_delta(seq, stream.id, stream.next_index, text)
                stream.next_index += 1
            elif kind == _PART:
                stream = item[1]
                text = item[2] if isinstance(item[2], str) else "".join(item[2])
                frame = encode_delta(seq, stream.id, stream.next_index, text, item[3], item[4])
                stream.next_index += 1
            elif kind == _CALL:
                stream = item[1]
                frame = encode_tool_call(seq, stream.id, stream.next_index, item[2], item[3])
                stream.next_index += 1
            else:
                frame = encode(item[2](seq=seq, **item[3]))
            frame = compact(frame)  # kept in the log: count the bytes actually held
            out.append(frame)
            log.append(frame)
            log_bytes += len(frame)
            if journal is not None:
                journal.append((seq, frame))
        dropped = 0
        while log and (len(log) > self.max_log_messages or log_bytes > self.max_log_bytes):
            log_bytes -= len(log.popleft())
            dropped += 1
        self._log_first += dropped
        self.seq = seq
        self.log_bytes = log_bytes
        return out

    def take_journal(self) -> list[tuple[int, bytes]]:
        """The journal's entries (and an empty journal left behind)."""
        entries = self.journal
        if not entries:
            return []
        self.journal = []
        return entries

    # ------------------------------------------------------------- replay log

    def ack(self, seq: int) -> None:
        """The client has everything up to ``seq`` (not beyond the last seq
        sent; a backwards ack changes nothing): trim the log."""
        if seq > self.acked:
            self.acked = seq
            log = self._log
            drop = min(len(log), seq - self._log_first + 1)
            if drop > 0:
                assert isinstance(log, FrameLog)
                for _ in range(drop):
                    self.log_bytes -= len(log.popleft())
                self._log_first += drop

    def replay_after(self, last_seq: int) -> list[bytes] | None:
        """The frames after ``last_seq``, or None if the log cannot provide them.

        Call :meth:`take` first if frames are pending: the replay covers what
        has been sequenced, and later frames follow it live.
        """
        if last_seq > self.seq or last_seq < self.acked:
            return None  # claims frames never sent, or goes back behind an ack
        log = self._log
        first = self._log_first if log else self.seq + 1
        if first > last_seq + 1:
            return None  # trimmed by the bounds
        if not log or self.seq <= last_seq:  # the log ends at self.seq
            return []
        assert isinstance(log, FrameLog)
        return list(log.frames_from(last_seq + 1 - first))

    @property
    def log_first(self) -> int:
        """The seq of the oldest frame in the replay log (``seq + 1`` when it is empty)."""
        return self._log_first if self._log else self.seq + 1

    @property
    def log(self) -> list[tuple[int, bytes]]:
        """The replay log: ``(seq, frame)`` of every sequenced frame not yet
        acknowledged, oldest first, within the bounds (a copy)."""
        first = self._log_first
        return [(first + i, frame) for i, frame in enumerate(self._log)]

    def restore(self, seq: int, acked: int, first: int, frames: list[bytes]) -> None:
        """Take over a replay log kept elsewhere: ``frames`` are seqs ``first`` on."""
        self.seq, self.acked = seq, min(acked, seq)
        self._log = FrameLog(frames) if frames else ()
        self._log_first = first if frames else seq + 1
        self.log_bytes = sum(map(len, frames))


def _coalesce(pending: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Merge each stream's consecutive deltas of one part and call (no other
    frame of that stream in between)."""
    merged: list[tuple[Any, ...]] = []
    open_delta: dict[Stream, int] = {}
    for item in pending:
        stream = item[1]
        kind = item[0]
        if kind == _DELTA or kind == _PART:
            j = open_delta.get(stream)
            if j is not None:
                prev = merged[j]
                if prev[0] == kind and (kind == _DELTA or prev[3:] == item[3:]):
                    parts = prev[2] if isinstance(prev[2], list) else [prev[2]]
                    parts.append(item[2])
                    merged[j] = (kind, stream, parts, *item[3:])
                    continue
            open_delta[stream] = len(merged)
            merged.append(item)
        else:
            if stream is not None:
                open_delta.pop(stream, None)
            merged.append(item)
    return merged
