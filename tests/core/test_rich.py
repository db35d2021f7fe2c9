"""Rich generations in the core: reasoning, tool calls, stream.end.message, snapshot, steer (PROTOCOL.md 4.3)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.core.drive import feed, frames, make_session, start
from tests.core.test_messaging import RemoteChannels
from wsserver.core.actions import StartGeneration
from wsserver.core.session import Session
from wsserver.core.streams import Stream
from wsserver.wire.messages import ChatMessage

TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "get_time"},
]


def tool_stream(s: Session, **fields: Any) -> Stream:
    return start(s, tools=TOOLS, tool_choice="auto", **fields)


def deltas(out: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The delta-like frames of ``out``: (type, index, part or name, call, text)."""
    return [
        (f["type"], f["index"], f.get("part", f.get("name")), f.get("call"), f.get("text"))
        for f in out
        if f["type"] in ("stream.delta", "stream.tool_call")
    ]


def call_twice(s: Session, a: Stream) -> None:
    """Two parallel calls, each with its arguments in fragments."""
    s.stream_tool_call(a, "c1", "get_weather")
    s.stream_tool_delta(a, "c1", '{"ci')
    s.stream_tool_delta(a, "c1", 'ty": "Oslo"}')
    s.stream_tool_call(a, "c2", "get_time")
    s.stream_tool_delta(a, "c2", "{}")


class TestFrames:
    def test_reasoning_then_text_and_one_index_for_all(self) -> None:
        s = make_session(coalesce=False)
        a = start(s, params={"reasoning": {"effort": "low"}})
        s.stream_reasoning(a, "Think", 1)
        s.stream_reasoning(a, "ing.", 1)
        s.stream_reasoning_done(a, signature="sig")
        s.stream_delta(a, "Hi", 1)
        assert deltas(frames(s)) == [
            ("stream.delta", 0, "reasoning", None, "Think"),
            ("stream.delta", 1, "reasoning", None, "ing."),
            ("stream.delta", 2, None, None, "Hi"),
        ]

    def test_tool_call_frames_count_in_the_index(self) -> None:
        s = make_session(coalesce=False)
        a = tool_stream(s)
        s.stream_delta(a, "Let me look.", 3)
        call_twice(s, a)
        assert deltas(frames(s)) == [
            ("stream.delta", 0, None, None, "Let me look."),
            ("stream.tool_call", 1, "get_weather", "c1", None),
            ("stream.delta", 2, "tool_call", "c1", '{"ci'),
            ("stream.delta", 3, "tool_call", "c1", 'ty": "Oslo"}'),
            ("stream.tool_call", 4, "get_time", "c2", None),
            ("stream.delta", 5, "tool_call", "c2", "{}"),
        ]

    def test_coalescing_merges_only_neighbours_of_one_part_and_call(self) -> None:
        s = make_session()
        a = tool_stream(s)
        b = start(s)
        frames(s)
        s.stream_reasoning(a, "r1")
        s.stream_delta(b, "other stream")  # another stream's frame does not separate a's
        s.stream_reasoning(a, "r2")
        s.stream_delta(a, "t1")
        s.stream_delta(a, "t2")
        s.stream_reasoning(a, "r3")
        s.stream_tool_call(a, "c1", "get_weather")
        s.stream_tool_delta(a, "c1", "{")
        s.stream_tool_delta(a, "c1", "}")
        s.stream_tool_call(a, "c2", "get_time")
        s.stream_tool_delta(a, "c2", "{")
        s.stream_tool_delta(a, "c2", "}")
        out = frames(s)
        assert [f["seq"] for f in out] == list(range(3, 3 + len(out)))
        assert deltas([f for f in out if f["stream"] == a.id]) == [
            ("stream.delta", 0, "reasoning", None, "r1r2"),
            ("stream.delta", 1, None, None, "t1t2"),
            ("stream.delta", 2, "reasoning", None, "r3"),
            ("stream.tool_call", 3, "get_weather", "c1", None),
            ("stream.delta", 4, "tool_call", "c1", "{}"),
            ("stream.tool_call", 5, "get_time", "c2", None),
            ("stream.delta", 6, "tool_call", "c2", "{}"),
        ]

    def test_a_provider_bug_is_loud(self) -> None:
        s = make_session()
        a = tool_stream(s)
        with pytest.raises(ValueError):
            s.stream_tool_delta(a, "never-opened", "{}")
        s.stream_tool_call(a, "c1", "get_time")
        with pytest.raises(ValueError):
            s.stream_tool_call(a, "c1", "get_time")

    def test_events_after_the_end_are_ignored(self) -> None:
        s = make_session()
        a = tool_stream(s)
        feed(s, {"type": "cancel", "stream": a.id})
        frames(s)
        s.stream_reasoning(a, "late")
        s.stream_tool_call(a, "c1", "get_time")
        s.stream_tool_delta(a, "c9", "{}")  # not even checked: the stream is over
        s.stream_reasoning_done(a, "sig")
        assert frames(s) == []


class TestEndMessage:
    def test_plain_text_is_a_string(self) -> None:
        s = make_session()
        a = start(s)
        s.stream_delta(a, "Hello", 1)
        s.stream_end(a, "complete")
        assert frames(s)[-1]["message"] == {"role": "assistant", "content": "Hello"}

    def test_before_any_token_the_message_is_empty(self) -> None:
        s = make_session()
        a = start(s)
        feed(s, {"type": "cancel", "stream": a.id})
        assert frames(s)[-1]["message"] == {"role": "assistant", "content": ""}

    def test_reasoning_text_and_calls_in_order(self) -> None:
        s = make_session()
        a = tool_stream(s)
        s.stream_reasoning(a, "Need the weather.")
        s.stream_reasoning_done(a, signature="sig-1")
        s.stream_reasoning_done(a, redacted="opaque==")
        s.stream_delta(a, "Checking.")
        call_twice(s, a)
        s.stream_end(a, "tool_calls")
        end = frames(s)[-1]
        assert end["reason"] == "tool_calls"
        assert end["message"] == {
            "role": "assistant",
            "content": [
                {"type": "reasoning", "text": "Need the weather.", "signature": "sig-1"},
                {"type": "reasoning", "text": "", "redacted": "opaque=="},
                {"type": "text", "text": "Checking."},
            ],
            "tool_calls": [
                {"id": "c1", "name": "get_weather", "arguments": {"city": "Oslo"}},
                {"id": "c2", "name": "get_time", "arguments": {}},
            ],
        }
        # exactly what goes back into messages
        ChatMessage.model_validate(end["message"])

    def test_reasoning_between_text_keeps_its_place(self) -> None:
        s = make_session()
        a = start(s)
        s.stream_delta(a, "First. ")
        s.stream_reasoning(a, "hmm")
        s.stream_delta(a, "Then.")
        s.stream_end(a, "complete")
        assert frames(s)[-1]["message"]["content"] == [
            {"type": "text", "text": "First. "},
            {"type": "reasoning", "text": "hmm"},
            {"type": "text", "text": "Then."},
        ]

    def test_complete_with_calls_is_tool_calls(self) -> None:
        s = make_session()
        a = tool_stream(s)
        s.stream_tool_call(a, "c1", "get_time")
        s.stream_end(a, "complete")  # an OpenAI-compatible server that says "stop"
        end = frames(s)[-1]
        assert end["reason"] == "tool_calls"
        assert end["message"]["tool_calls"] == [{"id": "c1", "name": "get_time", "arguments": {}}]

    @pytest.mark.parametrize("arguments", ['{"city": "Os', "[1, 2]", "nope"])
    def test_arguments_that_are_not_a_json_object_are_provider_error(self, arguments: str) -> None:
        s = make_session()
        a = tool_stream(s)
        s.stream_reasoning(a, "plan")
        s.stream_delta(a, "Looking it up.")
        s.stream_tool_call(a, "c1", "get_weather")
        s.stream_tool_delta(a, "c1", arguments)
        s.stream_end(a, "tool_calls")
        end = frames(s)[-1]
        assert (end["reason"], end["error"]["code"]) == ("error", "provider_error")
        assert "c1" in end["error"]["message"]
        assert end["message"] == {
            "role": "assistant",
            "content": [{"type": "reasoning", "text": "plan"}, {"type": "text", "text": "Looking it up."}],
        }

    def test_length_drops_a_call_cut_short(self) -> None:
        s = make_session()
        a = tool_stream(s)
        s.stream_tool_call(a, "c1", "get_time")
        s.stream_tool_delta(a, "c1", "{}")
        s.stream_tool_call(a, "c2", "get_weather")
        s.stream_tool_delta(a, "c2", '{"ci')
        s.stream_end(a, "length")
        end = frames(s)[-1]
        assert end["reason"] == "length"
        assert [c["id"] for c in end["message"]["tool_calls"]] == ["c1"]

    def test_an_error_drops_partial_calls_and_open_reasoning(self) -> None:
        s = make_session()
        a = tool_stream(s)
        s.stream_delta(a, "Text. ")
        s.stream_reasoning(a, "unfinished thought")
        s.stream_end(a, "error", ("provider_error", "upstream went away"))
        assert frames(s)[-1]["message"] == {"role": "assistant", "content": "Text. "}


class TestInterruptWithTools:
    def test_a_partial_call_is_dropped_and_the_steer_inherits_tools(self) -> None:
        s = make_session()
        a = tool_stream(s, params={"max_tokens": 50})
        s.stream_reasoning(a, "Weather first.")
        s.stream_reasoning_done(a, signature="sig")
        s.stream_delta(a, "Checking.")
        s.stream_tool_call(a, "c1", "get_weather")
        s.stream_tool_delta(a, "c1", '{"city": "Os')
        actions = feed(s, {"type": "interrupt", "stream": a.id, "input": "Bergen, not Oslo", "id": "i1"})
        steered = next(x.stream for x in actions if isinstance(x, StartGeneration))
        out = frames(s)
        end = next(f for f in out if f["type"] == "stream.end")
        prefix = {
            "role": "assistant",
            "content": [
                {"type": "reasoning", "text": "Weather first.", "signature": "sig"},
                {"type": "text", "text": "Checking."},
            ],
        }
        assert end["reason"] == "interrupted" and end["message"] == prefix  # no such call
        assert [m.model_dump(exclude_none=True) for m in steered.messages[1:]] == [
            prefix,
            {"role": "user", "content": "Bergen, not Oslo"},
        ]
        assert steered.tools == a.tools and steered.tool_choice == "auto"
        assert (steered.params, steered.provider, steered.model) == (a.params, a.provider, a.model)

    def test_a_steer_after_tool_calls_ended_leaves_the_calls_out(self) -> None:
        s = make_session()
        a = tool_stream(s)
        s.stream_delta(a, "Calling.")
        s.stream_tool_call(a, "c1", "get_time")
        s.stream_end(a, "tool_calls")
        actions = feed(s, {"type": "interrupt", "stream": a.id, "input": "never mind"})
        assert actions[0].stream.messages[-2:] == (
            ChatMessage(role="assistant", content="Calling."),
            ChatMessage(role="user", content="never mind"),
        )

    def test_only_reasoning_so_far_is_a_prefix_when_finished(self) -> None:
        s = make_session()
        a = start(s)
        s.stream_reasoning(a, "still thinking")
        actions = feed(s, {"type": "interrupt", "stream": a.id, "input": "go on"})
        assert [m.role for m in actions[1].stream.messages] == ["user", "user"]  # unfinished: dropped


class TestSnapshotAndChannel:
    def test_snapshot_carries_reasoning_and_calls(self) -> None:
        s = make_session()
        a = tool_stream(s)
        s.stream_reasoning(a, "Think.")
        s.stream_delta(a, "Text")
        s.stream_tool_call(a, "c1", "get_weather")
        s.stream_tool_delta(a, "c1", '{"city":')
        frames(s)
        s.snapshot()
        (snap,) = frames(s)
        assert snap == {
            "type": "stream.snapshot",
            "seq": snap["seq"],
            "stream": a.id,
            "text": "Text",
            "index": 4,
            "reasoning": "Think.",
            "calls": [{"call": "c1", "name": "get_weather", "arguments": '{"city":'}],
        }

    def test_channel_copies_of_the_new_frames(self) -> None:
        sink = RemoteChannels()
        s = make_session(channels=sink)
        a = tool_stream(s, channel="watch")
        s.stream_reasoning(a, "r")
        s.stream_delta(a, "t")
        s.stream_tool_call(a, "c1", "get_time")
        s.stream_tool_delta(a, "c1", "{}")
        s.stream_end(a, "tool_calls")
        copies = [orjson.loads(data) for channel, _, data in sink.published if channel == "watch"]
        assert [(c["type"], c.get("index"), c.get("part"), c.get("call")) for c in copies] == [
            ("stream.start", None, None, None),
            ("stream.delta", 0, "reasoning", None),
            ("stream.delta", 1, None, None),
            ("stream.tool_call", 2, None, "c1"),
            ("stream.delta", 3, "tool_call", "c1"),
            ("stream.end", None, None, None),
        ]
        assert copies[-1]["message"]["tool_calls"] == [{"id": "c1", "name": "get_time", "arguments": {}}]
        assert "seq" not in copies[-1] and "ref" not in copies[0]
