"""The replay log: bounds, ack trimming, resume, a log taken over from a lost node (PROTOCOL.md 5)."""

from __future__ import annotations

import orjson

from tests.core.drive import HI, feed, frames, make_session, start
from wsserver.core.streams import Stream
from wsserver.core.takeover import end_lost, restore_log


class TestReplayLog:
    def test_every_sequenced_frame_is_logged(self) -> None:
        s = make_session(coalesce=False)
        a = start(s)
        s.stream_delta(a, "x", 1)
        s.emit_unsequenced(b'{"type":"pong"}')
        out = s.take_output()
        assert [seq for seq, _ in s.log] == [1, 2]
        assert [f for _, f in s.log] == [out[0], out[1]]
        assert s.out.log_bytes == len(out[0]) + len(out[1])

    def test_ack_trims_the_log(self) -> None:
        s = make_session(coalesce=False)
        a = start(s)
        for t in "abc":
            s.stream_delta(a, t, 1)
        s.take_output()
        feed(s, {"type": "ack", "seq": 3})
        s.take_output()
        assert [seq for seq, _ in s.log] == [4]
        assert s.out.log_bytes == len(s.log[0][1])

    def test_bounds_drop_the_oldest(self) -> None:
        s = make_session(coalesce=False, max_log_messages=3)
        a = start(s)
        for t in "abcde":
            s.stream_delta(a, t, 1)
        s.take_output()
        assert [seq for seq, _ in s.log] == [4, 5, 6]
        s2 = make_session(coalesce=False, max_log_bytes=200)
        b = start(s2)
        for t in "abcdefgh":
            s2.stream_delta(b, t, 1)
        s2.take_output()
        assert s2.out.log_bytes <= 200 and s2.log[-1][0] == 9

    def test_replay_after(self) -> None:
        s = make_session(coalesce=False, max_log_messages=4)
        a = start(s)
        for t in "abc":
            s.stream_delta(a, t, 1)
        out = s.take_output()  # seq 1..4, all in the log
        assert s.replay_after(0) == out
        assert s.replay_after(2) == out[2:]
        assert s.replay_after(4) == []
        assert s.replay_after(5) is None  # never sent
        s.stream_delta(a, "d", 1)
        s.take_output()  # seq 5 pushes seq 1 out
        assert s.replay_after(0) is None
        assert s.replay_after(1) is not None

    def test_replay_behind_an_ack_fails(self) -> None:
        s = make_session()
        start(s)
        s.take_output()
        feed(s, {"type": "ack", "seq": 1})
        s.take_output()
        assert s.replay_after(0) is None
        assert s.replay_after(1) == []

    def test_snapshot_holds_everything_so_far(self) -> None:
        s = make_session(coalesce=False)
        a = start(s)
        s.stream_delta(a, "one", 1)
        s.take_output()
        s.stream_delta(a, " two", 1)  # pending, not yet sequenced
        s.snapshot()
        (snap,) = frames(s)
        assert snap == {"type": "stream.snapshot", "seq": 4, "stream": "s1", "text": "one two", "index": 2}
        s.stream_delta(a, " three", 1)
        (delta,) = frames(s)
        assert delta["index"] == 2

def test_a_log_taken_over_from_a_lost_node_keeps_what_its_frames_tell() -> None:
    """restore_log + end_lost, as a node adopting a lost node's session uses them."""
    from wsserver.wire.messages import GenerateParams

    first = make_session(coalesce=False)
    stream = start(first, id="g", stream="a")
    first.stream_delta(stream, "Hel", 1)
    first.stream_delta(stream, "lo", 1)
    frames = first.take_output()  # what the lost node had written: start + 2 deltas
    s = make_session()
    answers = restore_log(s, 3, 1, 1, frames)
    assert [f["text"] for f in answers["a"]] == ["Hel", "lo"] and s.seq == 3 and s.acked == 1
    assert s.replay_after(1) == frames[1:]
    lost = Stream(
        id="a", ref=None, provider="simulated", model="sim-1", messages=(), params=GenerateParams(), started_at=0
    )
    end_lost(s, lost, answers["a"], ("node_lost", "gone"))
    feed(s, {"type": "generate", "id": "g", "messages": HI})  # its id was answered before
    out = [orjson.loads(f) for f in s.take_output()]
    assert out[0]["type"] == "stream.end" and out[0]["seq"] == 4 and out[0]["error"]["code"] == "node_lost"
    assert out[0]["usage"]["output_tokens"] == 2 and out[0]["usage"]["estimated"] is True
    assert out[1]["code"] == "duplicate_request" and out[1]["stream"] == "a"
    assert s.book.find("a").text == "Hello"  # an interrupt continues from the partial answer


def test_a_lost_streams_reasoning_and_calls_are_rebuilt_from_the_log() -> None:
    """Text, reasoning and calls come back from the frames (a snapshot in the
    log starts afresh); the partial calls and their unknown signatures are not
    in the lost stream's message."""
    from wsserver.wire.messages import GenerateParams

    first = make_session(coalesce=False)
    stream = start(first, stream="a", tools=[{"name": "f"}])
    first.stream_reasoning(stream, "think", 1)
    first.stream_reasoning_done(stream, signature="sig")
    first.stream_delta(stream, "Hi", 1)
    first.take_output()
    first.snapshot()  # a refreshed page: the log now holds a snapshot of everything so far
    first.stream_delta(stream, " there", 1)
    first.stream_tool_call(stream, "c1", "f")
    first.stream_tool_delta(stream, "c1", '{"x"')
    assert len(first.log) == 3
    log = first.take_output()  # the client acked up to seq 3: the log starts at the snapshot (seq 4)
    s = make_session()
    answers = restore_log(s, first.seq, 3, 4, log)
    lost = Stream(id="a", ref=None, provider="simulated", model="sim-1", messages=(), params=GenerateParams(), started_at=0)
    end_lost(s, lost, answers["a"], ("node_lost", "gone"))
    (end,) = [orjson.loads(f) for f in s.take_output()]
    assert end["message"] == {
        "role": "assistant",
        "content": [{"type": "reasoning", "text": "think"}, {"type": "text", "text": "Hi there"}],
    }
    assert end["usage"]["output_tokens"] == 5  # 2 frames before the snapshot (its index), 3 after
    assert s.book.find("a").calls["c1"].arguments == '{"x"'


def test_arguments_whose_call_was_acked_away_are_skipped() -> None:
    from wsserver.wire.messages import GenerateParams

    first = make_session(coalesce=False)
    stream = start(first, stream="a", tools=[{"name": "f"}])
    first.stream_tool_call(stream, "c1", "f")
    first.stream_tool_delta(stream, "c1", "{")
    first.stream_tool_delta(stream, "c1", "}")
    log = first.take_output()[2:]  # start and stream.tool_call acked away
    s = make_session()
    answers = restore_log(s, first.seq, 2, 3, log)
    lost = Stream(id="a", ref=None, provider="simulated", model="sim-1", messages=(), params=GenerateParams(), started_at=0)
    end_lost(s, lost, answers["a"], ("node_lost", "gone"))
    (end,) = [orjson.loads(f) for f in s.take_output()]
    assert end["error"]["code"] == "node_lost" and end["message"] == {"role": "assistant", "content": ""}
