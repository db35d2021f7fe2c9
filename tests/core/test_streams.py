"""Streams: generate, stream ids, limits, usage, stream.end (PROTOCOL.md 4)."""

from __future__ import annotations

from tests.core.drive import HI, feed, frames, make_session, start
from tests.helpers import FakeClock


class TestStreams:
    def test_start_echoes_ref_and_names_provider(self) -> None:
        s = make_session()
        start(s, id="r1")
        (frame,) = frames(s)
        assert frame == {
            "type": "stream.start",
            "seq": 1,
            "stream": "s1",
            "ref": "r1",
            "provider": "simulated",
            "model": "sim-1",
        }

    def test_server_assigned_ids_skip_client_chosen_ones(self) -> None:
        s = make_session()
        start(s, stream="s1")
        b = start(s)
        assert b.id == "s2"

    def test_client_chosen_id_reused_is_stream_exists(self) -> None:
        s = make_session()
        a = start(s, stream="mine")
        s.stream_end(a, "complete")
        frames(s)
        assert feed(s, {"type": "generate", "stream": "mine", "messages": HI, "id": "r2"}) == []
        (err,) = frames(s)
        assert (err["code"], err["ref"], err["stream"]) == ("stream_exists", "r2", "mine")

    def test_max_streams(self) -> None:
        s = make_session(max_streams=2)
        a = start(s)
        start(s)
        assert feed(s, {"type": "generate", "messages": HI, "id": "r3"}) == []
        assert frames(s)[-1]["code"] == "too_many_streams"
        s.stream_end(a, "complete")  # a slot frees up when a stream ends
        start(s)

    def test_delta_index_counts_frames(self) -> None:
        s = make_session(coalesce=False)
        a = start(s)
        for text in ("a", "b", "c"):
            s.stream_delta(a, text, 1)
        deltas = [f for f in frames(s) if f["type"] == "stream.delta"]
        assert [(d["index"], d["text"]) for d in deltas] == [(0, "a"), (1, "b"), (2, "c")]

    def test_end_reports_usage_ttft_and_duration(self) -> None:
        clock = FakeClock()
        s = make_session(clock=clock)
        a = start(s)
        s.stream_usage(a, input_tokens=7)
        clock.now += 0.25
        s.stream_delta(a, "x", 2)
        clock.now += 0.75
        s.stream_usage(a, output_tokens=2)
        s.stream_end(a, "complete")
        end = frames(s)[-1]
        assert end["reason"] == "complete"
        assert end["usage"] == {"input_tokens": 7, "output_tokens": 2}
        assert end["ttft_ms"] == 250.0
        assert end["duration_ms"] == 1000.0

    def test_usage_without_provider_report_is_estimated(self) -> None:
        s = make_session()
        a = start(s)
        s.stream_delta(a, "xyz")  # no token count
        s.stream_end(a, "error", ("provider_error", "boom"))
        end = frames(s)[-1]
        assert end["usage"]["estimated"] is True
        assert end["usage"]["output_tokens"] == 1
        assert end["error"] == {"code": "provider_error", "message": "boom"}

    def test_end_without_tokens_has_no_ttft(self) -> None:
        s = make_session()
        a = start(s)
        s.stream_end(a, "cancelled")
        end = frames(s)[-1]
        assert "ttft_ms" not in end
        assert end["usage"]["output_tokens"] == 0

    def test_exactly_one_end_and_nothing_after_it(self) -> None:
        s = make_session()
        a = start(s)
        assert s.stream_end(a, "complete") is True
        assert s.stream_end(a, "error", ("internal", "x")) is False
        s.stream_delta(a, "late", 1)
        s.stream_usage(a, output_tokens=99)
        out = frames(s)
        assert [f["type"] for f in out] == ["stream.start", "stream.end"]
        assert out[-1]["usage"]["output_tokens"] == 0
