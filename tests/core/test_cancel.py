"""Cancel: the stream ends at once, the generation is stopped (PROTOCOL.md 4)."""

from __future__ import annotations

import pytest

from tests.core.drive import feed, frames, make_session, start
from wsserver.core.actions import StopGeneration
from wsserver.core.streams import StreamState


class TestCancel:
    def test_cancel_ends_at_once_then_ok(self) -> None:
        s = make_session()
        a = start(s)
        s.stream_delta(a, "one", 1)
        actions = feed(s, {"type": "cancel", "stream": a.id, "id": "c1"})
        assert actions == [StopGeneration(a.id)]
        assert a.state is StreamState.ENDED
        s.stream_delta(a, "two", 1)  # the task had not noticed yet
        out = frames(s)
        assert [f["type"] for f in out] == ["stream.start", "stream.delta", "stream.end", "ok"]
        assert out[2]["reason"] == "cancelled"
        assert out[2]["usage"]["output_tokens"] == 1  # the partial usage
        assert out[3]["ref"] == "c1"

    def test_cancel_without_id_gets_no_ok(self) -> None:
        s = make_session()
        a = start(s)
        feed(s, {"type": "cancel", "stream": a.id})
        assert [f["type"] for f in frames(s)] == ["stream.start", "stream.end"]

    @pytest.mark.parametrize("finished", [False, True])
    def test_cancel_unknown_or_finished_stream(self, finished: bool) -> None:
        s = make_session()
        a = start(s)
        if finished:
            s.stream_end(a, "complete")
        target = a.id if finished else "ghost"
        assert feed(s, {"type": "cancel", "stream": target, "id": "c1"}) == []
        err = frames(s)[-1]
        assert (err["type"], err["code"], err["stream"], err["ref"]) == (
            "error",
            "unknown_stream",
            target,
            "c1",
        )
        if not finished:
            assert a.state is StreamState.RUNNING  # harms nothing

    def test_close_stops_every_stream(self) -> None:
        s = make_session()
        a, b = start(s), start(s)
        assert s.close() == [StopGeneration(a.id), StopGeneration(b.id)]
        assert not s.streams
