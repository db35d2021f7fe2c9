"""Sequencing and coalescing: seq 1, 2, 3… per session, a lagging socket gets merged deltas (PROTOCOL.md 3)."""

from __future__ import annotations

import orjson
import pytest

from tests.core.drive import feed, frames, make_session, start
from wsserver.wire.errors import ProtocolError
from wsserver.wire.messages import decode_client


class TestSequencing:
    def test_seq_starts_at_one_and_is_contiguous(self) -> None:
        s = make_session(coalesce=False)
        a = start(s, id="r1")
        s.stream_delta(a, "x", 1)
        feed(s, {"type": "cancel", "stream": "nope", "id": "r2"})
        s.stream_delta(a, "y", 1)
        out = frames(s)
        assert [f["seq"] for f in out] == [1, 2, 3, 4]
        assert s.seq == 4

    def test_seq_continues_across_takes(self) -> None:
        s = make_session()
        a = start(s)
        assert [f["seq"] for f in frames(s)] == [1]
        s.stream_delta(a, "x", 1)
        s.stream_end(a, "complete")
        assert [f["seq"] for f in frames(s)] == [2, 3]

    def test_errors_after_hello_carry_seq(self) -> None:
        s = make_session()
        with pytest.raises(ProtocolError) as exc:
            decode_client(b"{")
        s.reject(exc.value)
        (frame,) = frames(s)
        assert frame == {"type": "error", "seq": 1, "code": "bad_json", "message": frame["message"]}

    def test_on_output_fires_once_per_batch(self) -> None:
        calls = []
        s = make_session(on_output=lambda: calls.append(1))
        a = start(s)
        s.stream_delta(a, "x", 1)
        s.stream_delta(a, "y", 1)
        assert len(calls) == 1
        s.take_output()
        s.stream_delta(a, "z", 1)
        assert len(calls) == 2

class TestCoalescing:
    def test_pending_deltas_of_a_stream_merge(self) -> None:
        s = make_session()
        a = start(s)
        frames(s)
        for text in ("a", "b", "c"):
            s.stream_delta(a, text, 1)
        (delta,) = frames(s)
        assert (delta["index"], delta["text"], delta["seq"]) == (0, "abc", 2)

    def test_merge_never_crosses_a_frame_of_the_same_stream(self) -> None:
        s = make_session()
        a, b = start(s), start(s)
        frames(s)
        s.stream_delta(a, "a1", 1)
        s.stream_delta(b, "b1", 1)
        s.stream_delta(a, "a2", 1)
        s.stream_end(a, "complete")
        s.stream_delta(b, "b2", 1)
        out = frames(s)
        summary = [(f["type"], f["stream"], f.get("text")) for f in out]
        assert summary == [
            ("stream.delta", "s1", "a1a2"),
            ("stream.delta", "s2", "b1b2"),
            ("stream.end", "s1", None),
        ]
        assert [f["seq"] for f in out] == [3, 4, 5]

    def test_no_coalescing_when_disabled(self) -> None:
        s = make_session(coalesce=False)
        a = start(s)
        s.stream_delta(a, "a", 1)
        s.stream_delta(a, "b", 1)
        assert len(frames(s)) == 3


def test_unsequenced_frames_keep_their_place() -> None:
    s = make_session()
    feed(s, {"type": "cancel", "stream": "ghost"})
    s.emit_unsequenced(b'{"type":"pong","ref":"p"}')
    feed(s, {"type": "ack", "seq": 0, "id": "k"})
    out = [orjson.loads(f) for f in s.take_output()]
    assert [(f["type"], f.get("seq")) for f in out] == [("error", 1), ("pong", None), ("ok", 2)]
