"""The session core, driven with no socket (PROTOCOL.md sections 3 and 5)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from wsserver.wire.errors import ProtocolError
from wsserver.wire.messages import ChatMessage, decode_client, decode_server
from wsserver.providers import Providers, SimulatedProvider
from wsserver.core.actions import MessagingCall, StartGeneration, StopGeneration
from wsserver.core.session import Session
from wsserver.core.streams import Stream, StreamState

HI = [{"role": "user", "content": "hi"}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_session(**kwargs: Any) -> Session:
    providers = Providers([SimulatedProvider()], default="simulated")
    kwargs.setdefault("clock", FakeClock())
    return Session("sess", providers=providers, **kwargs)


def feed(session: Session, message: dict[str, Any]) -> list[Any]:
    return session.handle(decode_client(orjson.dumps(message)))


def frames(session: Session) -> list[dict[str, Any]]:
    out = [orjson.loads(f) for f in session.take_output()]
    for frame in out:
        decode_server(orjson.dumps(frame))  # every frame is a valid server message
    return out


def start(session: Session, **fields: Any) -> Any:
    actions = feed(session, {"type": "generate", "messages": HI, **fields})
    assert len(actions) == 1 and isinstance(actions[0], StartGeneration)
    return actions[0].stream


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


class TestIdempotency:
    def test_repeated_generate_id_starts_nothing(self) -> None:
        s = make_session()
        start(s, id="g1")
        assert feed(s, {"type": "generate", "messages": HI, "id": "g1"}) == []
        err = frames(s)[-1]
        assert (err["code"], err["ref"], err["stream"]) == ("duplicate_request", "g1", "s1")
        assert len(s.streams) == 1

    def test_repeated_id_of_a_failed_request_is_still_duplicate(self) -> None:
        s = make_session()
        feed(s, {"type": "cancel", "stream": "ghost", "id": "x"})
        feed(s, {"type": "cancel", "stream": "ghost", "id": "x"})
        codes = [f["code"] for f in frames(s)]
        assert codes == ["unknown_stream", "duplicate_request"]

    def test_remembered_ids_are_bounded(self) -> None:
        s = make_session(remember_ids=3)
        for i in range(5):
            feed(s, {"type": "ack", "seq": 0, "id": f"a{i}"})
        assert list(s._answered) == ["a2", "a3", "a4"]


class TestAck:
    def test_ack_moves_forward_only(self) -> None:
        s = make_session()
        start(s)
        frames(s)
        feed(s, {"type": "ack", "seq": 1, "id": "k1"})
        feed(s, {"type": "ack", "seq": 0})
        assert s.acked == 1
        assert frames(s)[0] == {"type": "ok", "seq": 2, "ref": "k1"}

    def test_ack_beyond_last_seq_is_bad_message(self) -> None:
        s = make_session()
        feed(s, {"type": "ack", "seq": 5})
        err = frames(s)[0]
        assert (err["code"], err["field"]) == ("bad_message", "seq")


class TestWithoutMessaging:
    """A session built without channels (no messaging) says so."""

    @pytest.mark.parametrize(
        "message",
        [
            {"type": "subscribe", "channel": "c"},
            {"type": "unsubscribe", "channel": "c"},
            {"type": "publish", "channel": "c", "data": 1},
            {"type": "send", "to": "a", "data": 1},
        ],
    )
    def test_answered_not_implemented(self, message: dict[str, Any]) -> None:
        s = make_session()
        assert feed(s, {**message, "id": "q"}) == []
        err = frames(s)[0]
        assert (err["code"], err["ref"]) == ("not_implemented", "q")

    def test_generate_into_channel_not_implemented(self) -> None:
        s = make_session()
        assert feed(s, {"type": "generate", "messages": HI, "channel": "c"}) == []
        assert frames(s)[0]["code"] == "not_implemented"


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


class TestInterrupt:
    def test_interrupt_with_input_steers(self) -> None:
        s = make_session()
        a = start(s, params={"max_tokens": 9})
        s.stream_delta(a, "partial", 1)
        actions = feed(s, {"type": "interrupt", "stream": a.id, "input": "shorter", "id": "i1"})
        assert actions[0] == StopGeneration(a.id)
        steered = actions[1].stream
        out = frames(s)
        end, start_frame = out[-2], out[-1]
        assert (end["type"], end["reason"], end["usage"]["output_tokens"]) == ("stream.end", "interrupted", 1)
        assert start_frame["type"] == "stream.start"
        assert (start_frame["stream"], start_frame["ref"], start_frame["steered_from"]) == ("s2", "i1", "s1")
        assert [(m.role, m.content) for m in steered.messages] == [
            ("user", "hi"),
            ("assistant", "partial"),
            ("user", "shorter"),
        ]
        assert steered.params == a.params and steered.provider == a.provider

    def test_interrupt_before_first_token_adds_no_empty_message(self) -> None:
        s = make_session()
        a = start(s)
        actions = feed(s, {"type": "interrupt", "stream": a.id, "input": "again", "new_stream": "b"})
        steered = actions[1].stream
        assert steered.id == "b"
        assert [(m.role, m.content) for m in steered.messages] == [("user", "hi"), ("user", "again")]

    def test_interrupt_without_input_stops_and_answers_ok(self) -> None:
        s = make_session()
        a = start(s)
        assert feed(s, {"type": "interrupt", "stream": a.id, "id": "i"}) == [StopGeneration(a.id)]
        assert [(f["type"], f.get("reason")) for f in frames(s)[1:]] == [
            ("stream.end", "interrupted"),
            ("ok", None),
        ]

    def test_interrupt_racing_the_natural_end_still_steers(self) -> None:
        s = make_session()
        a = start(s)
        s.stream_delta(a, "done.", 1)
        s.stream_end(a, "complete")
        actions = feed(s, {"type": "interrupt", "stream": a.id, "input": "more"})
        assert len(actions) == 1 and isinstance(actions[0], StartGeneration)
        assert actions[0].stream.messages[-2:] == (
            ChatMessage(role="assistant", content="done."),
            ChatMessage(role="user", content="more"),
        )
        assert feed(s, {"type": "interrupt", "stream": a.id, "id": "k"}) == []
        assert frames(s)[-1]["type"] == "ok"

    def test_interrupt_of_unknown_stream(self) -> None:
        s = make_session()
        assert feed(s, {"type": "interrupt", "stream": "ghost", "input": "x", "id": "i"}) == []
        err = frames(s)[0]
        assert (err["code"], err["stream"], err["ref"]) == ("unknown_stream", "ghost", "i")

    def test_new_stream_id_taken_does_nothing(self) -> None:
        s = make_session()
        a = start(s)
        start(s, stream="taken")
        assert feed(s, {"type": "interrupt", "stream": a.id, "input": "x", "new_stream": "taken"}) == []
        assert a.state is StreamState.RUNNING
        assert frames(s)[-1]["code"] == "stream_exists"


class RemoteChannels:
    """What a session sees of a shared backplane: somewhere to publish a stream's frames."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes]] = []

    def publish_nowait(self, channel: str, sender: str, data: bytes) -> None:
        self.published.append((channel, sender, data))


class TestSharedBackplane:
    """Subscribe, publish and send with a remote hub, still without a network."""

    def remote(self) -> Session:
        return make_session(channels=RemoteChannels())

    def test_subscribe_is_handed_over_and_its_answer_keeps_order(self) -> None:
        s = self.remote()
        (call,) = feed(s, {"type": "subscribe", "id": "s1", "channel": "team", "since": 4, "epoch": "e"})
        assert isinstance(call, MessagingCall) and call.kind == "subscribe"
        assert frames(s) == []  # nothing until the backplane answered
        # live traffic while the call runs is held back, including a copy of a recovered one
        s.members.held["team"].append((6, b'{"type":"message","channel":"team","offset":6,"from":"x","data":6}'))
        s.members.held["team"].append((7, b'{"type":"message","channel":"team","offset":7,"from":"x","data":7}'))
        missed = [b'{"type":"message","channel":"team","offset":5,"from":"x","data":5}',
                  b'{"type":"message","channel":"team","offset":6,"from":"x","data":6}']
        s.subscribed(call.msg, "e", 6, True, ["me", "x"], missed)
        out = frames(s)
        assert out[0]["type"] == "subscribed" and out[0]["offset"] == 6 and out[0]["recovered"] is True
        assert [f["offset"] for f in out[1:]] == [5, 6, 7]  # recovered, then what arrived meanwhile, once each
        assert "team" not in s.members.held and s.members.channel_offsets["team"] == 7

    def test_publish_ok_comes_before_the_own_copy(self) -> None:
        s = self.remote()
        s.subscriptions.add("team")
        (call,) = feed(s, {"type": "publish", "id": "p", "channel": "team", "data": 1})
        own = b'{"type":"message","channel":"team","offset":9,"from":"me","data":1}'
        s.members.held["team"].append((9, own))  # the pub/sub copy overtook the script's reply
        s.published(call.msg, 9)
        out = frames(s)
        assert out[0] == {"type": "ok", "seq": 1, "ref": "p", "offset": 9}
        assert out[1]["offset"] == 9 and len(out) == 2

    def test_send_to_nobody_and_a_failed_call(self) -> None:
        s = self.remote()
        (call,) = feed(s, {"type": "send", "id": "m", "to": "ghost", "data": 1})
        s.sent(call.msg, False)
        (call2,) = feed(s, {"type": "subscribe", "id": "s", "channel": "team"})
        s.failed(call2, "redis is down")
        out = frames(s)
        assert out[0]["code"] == "unknown_agent" and out[0]["ref"] == "m"
        assert out[1]["code"] == "backplane_unavailable" and out[1]["retry_after_ms"] == 1000
        assert "team" not in s.members.held and "team" not in s.subscriptions

    def test_sequenced_frames_are_kept_for_the_backplane(self) -> None:
        s = self.remote()
        s.out.journal = []
        start(s, id="g")
        out = s.take_output()
        assert s.out.journal == [(1, out[0])]  # written there before it is sent


def test_a_log_taken_over_from_a_lost_node_keeps_what_its_frames_tell() -> None:
    """restore_log + end_lost, as a node adopting a lost node's session uses them."""
    from wsserver.wire.messages import GenerateParams

    first = make_session(coalesce=False)
    stream = start(first, id="g", stream="a")
    first.stream_delta(stream, "Hel", 1)
    first.stream_delta(stream, "lo", 1)
    frames = first.take_output()  # what the lost node had written: start + 2 deltas
    s = make_session()
    texts = s.restore_log(3, 1, 1, frames)
    assert texts == {"a": ["Hel", "lo"]} and s.seq == 3 and s.acked == 1
    assert s.replay_after(1) == frames[1:]
    lost = Stream(
        id="a", ref=None, provider="simulated", model="sim-1", messages=(), params=GenerateParams(), started_at=0
    )
    s.end_lost(lost, texts["a"], ("node_lost", "gone"))
    feed(s, {"type": "generate", "id": "g", "messages": HI})  # its id was answered before
    out = [orjson.loads(f) for f in s.take_output()]
    assert out[0]["type"] == "stream.end" and out[0]["seq"] == 4 and out[0]["error"]["code"] == "node_lost"
    assert out[0]["usage"]["output_tokens"] == 2 and out[0]["usage"]["estimated"] is True
    assert out[1]["code"] == "duplicate_request" and out[1]["stream"] == "a"
    assert s.book.find("a").text == "Hello"  # an interrupt continues from the partial answer
