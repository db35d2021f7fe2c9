"""Interrupt and steer: stop a stream, continue its conversation (PROTOCOL.md 6)."""

from __future__ import annotations

from tests.core.drive import feed, frames, make_session, start
from wsserver.core.actions import StartGeneration, StopGeneration
from wsserver.core.streams import StreamState
from wsserver.wire.messages import ChatMessage


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
