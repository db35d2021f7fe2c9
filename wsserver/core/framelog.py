"""The frames of a replay log, kept in chunks the garbage collector need not visit (sans-I/O).

A replay log holds every sequenced frame its client has not acknowledged:
up to ``replay_max_messages`` (10,000) of them per session. In a ``deque``
each is one reference that every full collection of the cyclic garbage
collector follows to a ``bytes`` somewhere in memory, for every live
session: with a few hundred streams running that was most of a full
collection's work (and of its pause, which stops every stream).

:class:`FrameLog` keeps the newest frames (up to :data:`CHUNK`) in a list and
seals older ones into chunks: one ``bytes`` with the frames end to end and an
``array`` of where each ends, neither of which the collector tracks. It
offers what the outbox uses of a deque: ``append``, ``popleft``, ``len``,
truth and iteration (:meth:`FrameLog.frames_from` to start further in).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

__all__ = ["CHUNK", "FrameLog"]

#: Frames kept as separate ``bytes`` before they are sealed into one chunk.
CHUNK = 32


class FrameLog:
    """Frames, oldest first: sealed chunks, then the open tail."""

    __slots__ = ("_blobs", "_count", "_ends", "_head", "_tail")

    def __init__(self, frames: Iterable[bytes] = ()) -> None:
        self._blobs: list[bytes] = []  # sealed chunks, oldest first
        self._ends: list[array] = []  # where each frame of a chunk ends in its blob
        self._head = 0  # frames of the first chunk already dropped
        self._tail: list[bytes] = []
        self._count = 0
        for frame in frames:
            self.append(frame)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def append(self, frame: bytes) -> None:
        tail = self._tail
        tail.append(frame)
        self._count += 1
        if len(tail) >= CHUNK:
            ends, at = array("I"), 0
            for f in tail:
                at += len(f)
                ends.append(at)
            self._blobs.append(b"".join(tail))
            self._ends.append(ends)
            self._tail = []

    def popleft(self) -> bytes:
        """Drop the oldest frame and return it (IndexError when empty)."""
        if not self._count:
            raise IndexError("pop from an empty FrameLog")
        self._count -= 1
        if not self._blobs:
            return self._tail.pop(0)
        blob, ends, head = self._blobs[0], self._ends[0], self._head
        frame = blob[ends[head - 1] if head else 0 : ends[head]]
        if head + 1 == len(ends):
            del self._blobs[0], self._ends[0]
            self._head = 0
        else:
            self._head = head + 1
        return frame

    def __iter__(self) -> Iterator[bytes]:
        return self.frames_from(0)

    def frames_from(self, index: int) -> Iterator[bytes]:
        """The frames from the ``index``-th oldest on."""
        skip = index + self._head
        for blob, ends in zip(self._blobs, self._ends):
            if skip >= len(ends):
                skip -= len(ends)
                continue
            for i in range(skip, len(ends)):
                yield blob[ends[i - 1] if i else 0 : ends[i]]
            skip = 0
        yield from self._tail[skip:]
