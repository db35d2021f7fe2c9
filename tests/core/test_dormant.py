"""A finished session parked as bytes and rebuilt: nothing a client can see changes (core/dormant.py)."""

from __future__ import annotations

import gc
import zlib

import orjson

from tests.core.drive import HI, feed, frames, make_session, start
from wsserver.core import dormant
from wsserver.core.limits import ChannelRules
from wsserver.core.session import Session


def finished(**kwargs: object) -> Session:
    """A session that streamed twice (request ids, an ack) and has nothing running."""
    s = make_session(coalesce=False, **kwargs)
    a = start(s, id="g1", stream="a", params={"temperature": 0.5, "reply_tokens": 3})
    for t in ("one", " two", " three"):
        s.stream_delta(a, t, 1)
    s.stream_end(a, "complete")
    b = start(s, id="g2")
    s.stream_delta(b, "four", 1)
    s.stream_end(b, "cancelled")
    s.take_output()
    feed(s, {"type": "ack", "seq": 2, "id": "k1"})
    s.take_output()
    return s


def rebuilt(s: Session, **extra: str | None) -> tuple[Session, dormant.Parked]:
    blob = dormant.park(s, **extra)
    parked = dormant.read(blob)
    fresh = make_session(coalesce=False, identity=parked.identity, public_id=parked.public_id, rules=parked.rules)
    dormant.restore(fresh, parked)
    return fresh, parked


class TestParkAndRestore:
    def test_only_an_idle_session_without_channels_or_name_parks(self) -> None:
        s = make_session()
        assert dormant.can_park(s)
        a = start(s)
        assert not dormant.can_park(s)  # a stream runs
        s.stream_end(a, "complete")
        assert not dormant.can_park(s)  # its end is not sequenced yet
        s.take_output()
        assert dormant.can_park(s)
        assert not dormant.can_park(make_session(agent="bot"))
        s.members.subscriptions.add("room")
        assert not dormant.can_park(s)

    def test_the_log_seq_and_ack_come_back_byte_for_byte(self) -> None:
        s = finished()
        fresh, _ = rebuilt(s)
        assert fresh.log == s.log and fresh.seq == s.seq and fresh.acked == s.acked
        assert fresh.log_first == s.log_first and fresh.out.log_bytes == s.out.log_bytes
        assert fresh.replay_after(2) == s.replay_after(2)
        assert fresh.replay_after(1) is None  # behind the ack, as before
        feed(fresh, {"type": "ack", "seq": s.seq, "id": "k2"})  # seq continues
        (ok,) = frames(fresh)
        assert ok["seq"] == s.seq + 1

    def test_identity_public_id_rules_and_extra_are_kept(self) -> None:
        rules = ChannelRules(("team:*",), ())
        s = make_session(identity="alice", public_id="anon-1234", rules=rules)
        fresh, parked = rebuilt(s, quota="ip:127.0.0.1")
        assert (fresh.identity, fresh.public_id, fresh.members.rules) == ("alice", "anon-1234", rules)
        assert parked.extra == {"quota": "ip:127.0.0.1"}

    def test_answered_request_ids_and_used_stream_ids_still_count(self) -> None:
        fresh, _ = rebuilt(finished())
        feed(fresh, {"type": "generate", "id": "g1", "messages": HI})
        feed(fresh, {"type": "generate", "id": "g9", "stream": "a", "messages": HI})
        dup, exists = frames(fresh)
        assert (dup["code"], dup["ref"], dup["stream"]) == ("duplicate_request", "g1", "a")
        assert (exists["code"], exists["stream"]) == ("stream_exists", "a")
        assert start(fresh).id not in ("a", "s1")  # auto ids skip the used ones

    def test_an_ended_stream_is_continued_by_interrupt(self) -> None:
        fresh, _ = rebuilt(finished())
        actions = feed(fresh, {"type": "interrupt", "stream": "a", "input": "go on", "new_stream": "c"})
        steered = actions[0].stream
        assert [m.content for m in steered.messages] == ["hi", "one two three", "go on"]
        assert steered.params.temperature == 0.5 and steered.steered_from == "a"
        (start_frame,) = frames(fresh)
        assert start_frame["steered_from"] == "a"

    def test_a_rich_ended_stream_continues_with_the_same_conversation(self) -> None:
        """Reasoning blocks (signed, redacted) among the text, tools and
        tool_choice: a steer after the rebuild sends what it would have sent."""
        s = make_session(coalesce=False)
        tools = [{"name": "get_time", "parameters": {"type": "object"}}]
        a = start(s, stream="r", tools=tools, tool_choice={"name": "get_time"}, params={"reasoning": {"effort": "low"}})
        s.stream_reasoning(a, "Think", 1)
        s.stream_reasoning_done(a, signature="sig")
        s.stream_delta(a, "Half", 1)
        s.stream_reasoning_done(a, signature=None, redacted="opaque")
        s.stream_delta(a, " done.", 1)
        s.stream_tool_call(a, "c1", "get_time")  # partial: left out of the conversation
        s.stream_end(a, "cancelled")
        s.take_output()
        fresh, _ = rebuilt(s)
        (old,) = s.book.recent
        (new,) = fresh.book.recent
        assert new.conversation() == old.conversation()
        assert (new.tools, new.tool_choice, new.params) == (old.tools, old.tool_choice, old.params)
        steered = feed(fresh, {"type": "interrupt", "stream": "r", "input": "and?", "new_stream": "t"})[0].stream
        assert steered.messages == (*old.conversation(), steered.messages[-1])
        assert steered.tools == old.tools and steered.tool_choice == old.tool_choice

    def test_an_ended_run_keeps_its_steps_thread_and_client_messages(self) -> None:
        """A run cancelled in its second step: a steer after the rebuild
        continues the whole run (the first step's call and result included)."""
        s = make_session(coalesce=False)
        weather = {"name": "get_weather", "parameters": {"type": "object"}}
        a = start(s, stream="run", tools=[weather], max_steps=3, thread="t1")
        s.stream_tool_call(a, "c1", "get_weather")
        s.stream_tool_delta(a, "c1", '{"city": "Oslo"}')
        s.step_end(a, "tool_calls")
        feed(s, {"type": "tool_result", "stream": "run", "call": "c1", "content": "cold"})
        s.take_actions()
        s.stream_delta(a, "It is cold", 1)
        s.stream_end(a, "cancelled")
        s.take_output()
        fresh, _ = rebuilt(s)
        (old,) = s.book.recent
        (new,) = fresh.book.recent
        assert new.run is not None and old.run is not None
        assert new.run.state() == old.run.state()
        assert (new.thread, new.client_messages) == ("t1", old.client_messages)
        assert new.conversation() == old.conversation()
        assert [m.role for m in new.conversation()] == ["user", "assistant", "tool", "assistant"]
        steered = feed(fresh, {"type": "interrupt", "stream": "run", "input": "and?", "new_stream": "t"})[0].stream
        assert steered.messages == (*old.conversation(), steered.messages[-1]) and steered.thread == "t1"

    def test_the_publish_bucket_is_kept(self) -> None:
        s = make_session()
        s.members.bucket.tokens, s.members.bucket.stamp = 3.5, 99.0
        fresh, _ = rebuilt(s)
        assert (fresh.members.bucket.tokens, fresh.members.bucket.stamp) == (3.5, 99.0)


def test_a_parked_session_is_one_untracked_bytes_object() -> None:
    """What the collector sees of a retained session: ~25 tracked containers
    and a reference per frame and token as objects, nothing parked."""
    s = finished()
    blob = dormant.park(s)
    assert type(blob) is bytes and not gc.is_tracked(blob)
    parked = {"sess": blob}
    assert not gc.is_tracked(parked)  # a dict of str -> bytes is not tracked either
    raw = zlib.decompress(blob)
    head = orjson.loads(raw[: raw.index(b"\n")])
    assert head["sizes"] == [len(f) for _, f in s.log]
    assert len(blob) < len(raw) / 2  # the log's JSON frames compress
