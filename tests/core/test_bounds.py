"""What a session may be made to keep, in bytes (no network): a stream's
output, its ended streams, the conversation an interrupt continues, the
direct messages that wait while it is away, the channels' history; and the
limits and rights a steer or a resume must meet."""

from __future__ import annotations

import orjson

from tests.core.drive import feed, frames, make_session, start
from tests.core.test_channels import feed as feed_channels
from tests.core.test_channels import make, session
from tests.helpers import FakeClock
from wsserver.core.actions import StartGeneration, StopGeneration
from wsserver.core.channels import HISTORY_ENTRY_OVERHEAD
from wsserver.core.limits import ChannelRules, GenerationQuota, MessagingLimits, StreamLimits, TokenBucket, TokenBudget
from wsserver.core.streams import STREAM_OVERHEAD, StreamState, bounded, message_bytes
from wsserver.wire.messages import ChatMessage

TOOLS = [{"name": "get_weather"}]


class TestOutput:
    def test_a_stream_ends_length_at_its_bound_with_the_text_cut_there(self) -> None:
        s = make_session(stream_limits=StreamLimits(answer_bytes=10))
        a = start(s)
        s.stream_delta(a, "12345", 1)
        s.stream_delta(a, "67890abc", 1)
        assert a.state is StreamState.ENDED and a.reason == "length"
        assert a.text == "1234567890" and a.kept_bytes == 10
        s.stream_delta(a, "more", 1)  # ignored: ended
        out = frames(s)
        assert "".join(f["text"] for f in out if f["type"] == "stream.delta") == "1234567890"
        end = out[-1]
        assert (end["type"], end["reason"], end["usage"]["estimated"]) == ("stream.end", "length", True)
        assert end["message"]["content"] == "1234567890"

    def test_reasoning_and_tool_calls_count_and_a_call_cut_in_its_arguments_is_dropped(self) -> None:
        s = make_session(stream_limits=StreamLimits(answer_bytes=40))
        a = start(s, tools=TOOLS)
        s.stream_reasoning(a, "think " * 3, 1)  # 18
        s.stream_tool_call(a, "c1", "get_weather")  # 2 + 11
        s.stream_tool_delta(a, "c1", '{"city": "Oslo"}')  # 16: 47 > 40, cut
        assert a.reason == "length" and a.kept_bytes == 40
        end = frames(s)[-1]
        assert end["reason"] == "length" and "tool_calls" not in end["message"]  # cut short: dropped

    def test_a_long_answer_is_kept_in_few_objects(self) -> None:
        s = make_session()
        a = start(s)
        tokens = [f" w{i}" for i in range(10_000)]
        for token in tokens:
            s.stream_delta(a, token, 1)
        assert a.text == "".join(tokens) and a.kept_bytes == len(a.text)
        assert len(a.parts) < 300  # merged: a str object per token costs ~50 bytes

    def test_a_multibyte_character_is_never_split(self) -> None:
        assert bounded("aé€", 4) == ("aé", 3, True)  # € (3 bytes) does not fit in the last byte
        assert bounded("aé€", 6) == ("aé€", 6, True)  # exactly full
        assert bounded("aé", 6) == ("aé", 3, False)
        s = make_session(stream_limits=StreamLimits(answer_bytes=4))
        a = start(s)
        s.stream_delta(a, "aé€", 1)
        assert a.text == "aé" and a.reason == "length"

    def test_snapshot_and_interrupt_work_within_the_bound(self) -> None:
        s = make_session(stream_limits=StreamLimits(answer_bytes=8))
        a = start(s)
        s.stream_delta(a, "abcdefghij", 1)
        s.take_output()
        actions = feed(s, {"type": "interrupt", "stream": a.id, "input": "go on", "id": "i"})
        steered = actions[0].stream
        assert [m.content for m in steered.messages] == ["hi", "abcdefgh", "go on"]
        s.stream_delta(steered, "xyz", 1)
        s.snapshot()
        snap = frames(s)[-1]
        assert (snap["type"], snap["text"], snap["index"]) == ("stream.snapshot", "xyz", 1)

    def test_what_a_message_weighs(self) -> None:
        plain = ChatMessage(role="user", content="hé")
        rich = ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "ab"}, {"type": "reasoning", "text": "r", "signature": "sig"}],
                "tool_calls": [{"id": "c1", "name": "t", "arguments": {"a": 1}}],
            }
        )
        assert message_bytes(plain) == 3
        assert message_bytes(rich) == 2 + 1 + 3 + len("c1") + len("t") + len('{"a":1}')


class TestEndedStreams:
    def test_the_ended_streams_kept_are_bounded_in_bytes_oldest_first(self) -> None:
        one = STREAM_OVERHEAD + 2 + 1000  # messages "hi", an answer of 1000 bytes
        s = make_session(stream_limits=StreamLimits(recent_bytes=3 * one))
        for i in range(6):
            a = start(s, stream=f"s{i}")
            s.stream_delta(a, "x" * 1000, 1)
            s.stream_end(a, "complete")
        assert [i for i in range(6) if s.book.find(f"s{i}") is not None] == [3, 4, 5]
        assert s.book.recent_bytes == 3 * one
        assert feed(s, {"type": "interrupt", "stream": "s2", "id": "k"}) == []
        assert frames(s)[-1]["code"] == "unknown_stream"

    def test_the_newest_ended_stream_is_kept_whatever_its_size(self) -> None:
        s = make_session(stream_limits=StreamLimits(recent_bytes=10))
        a = start(s)
        s.stream_delta(a, "y" * 100, 1)
        s.stream_end(a, "complete")
        assert s.book.find(a.id) is a  # an interrupt racing the natural end still finds it


class TestSteer:
    def test_the_conversation_an_interrupt_continues_is_bounded(self) -> None:
        s = make_session(stream_limits=StreamLimits(conversation_bytes=30))
        a = start(s)  # "hi": 2 bytes
        s.stream_delta(a, "0123456789", 1)  # 12
        refused = feed(s, {"type": "interrupt", "stream": a.id, "input": "x" * 19, "id": "i"})  # 31
        assert refused == [] and a.state is StreamState.RUNNING  # refused as a whole: nothing interrupted
        err = frames(s)[-1]
        assert (err["code"], err["ref"], err["stream"]) == ("conversation_too_large", "i", a.id)
        actions = feed(s, {"type": "interrupt", "stream": a.id, "input": "x" * 18})  # 30: fits
        assert actions[0] == StopGeneration(a.id) and actions[1].stream.input_bytes == 30

    def test_a_chain_counts_its_conversation_without_reading_it_again(self) -> None:
        s = make_session()
        stream = start(s)
        for i in range(5):
            s.stream_delta(stream, "é" * 10, 1)  # 20 bytes
            actions = feed(s, {"type": "interrupt", "stream": stream.id, "input": f"step {i}"})
            stream = actions[-1].stream
        assert stream.input_bytes == sum(map(message_bytes, stream.messages))

    def test_a_steer_meets_the_generation_rate_like_a_generate(self) -> None:
        s = make_session(quota=GenerationQuota(starts=TokenBucket(1 / 60, 1)))
        a = start(s)  # the one generation of the burst
        assert feed(s, {"type": "interrupt", "stream": a.id, "input": "no", "id": "i"}) == []
        err = frames(s)[-1]
        assert (err["code"], err["ref"]) == ("rate_limited", "i") and err["retry_after_ms"] > 1000
        assert a.state is StreamState.RUNNING  # nothing interrupted
        assert feed(s, {"type": "interrupt", "stream": a.id, "id": "j"}) == [StopGeneration(a.id)]  # no input: no generation

    def test_a_steer_meets_the_token_budget(self) -> None:
        clock = FakeClock()
        s = make_session(quota=GenerationQuota(tokens=TokenBudget(10)), clock=clock)
        a = start(s)
        for _ in range(20):
            s.stream_delta(a, "w", 1)
        s.stream_end(a, "complete")
        assert feed(s, {"type": "interrupt", "stream": a.id, "input": "more", "id": "i"}) == []
        assert frames(s)[-1]["code"] == "rate_limited"
        clock.now += 120
        actions = feed(s, {"type": "interrupt", "stream": a.id, "input": "more"})
        assert isinstance(actions[0], StartGeneration)


# ------------------------------------------------------------- messaging


class TestInbox:
    def test_direct_messages_wait_while_away_bounded_and_follow_the_replay(self) -> None:
        hub, _ = make()
        limits = MessagingLimits(inbox_messages=3, inbox_bytes=100)
        agent = session(hub, "agent", limits=limits, max_log_messages=4)
        sender = session(hub, "sender")
        mine = start(agent)
        agent.take_output()
        agent.members.away = True
        answers = [feed_channels(sender, {"type": "send", "to": "agent", "data": "m" * 20, "id": f"d{i}"})[0] for i in range(5)]
        assert [a.get("code", a["type"]) for a in answers] == ["ok", "ok", "ok", "inbox_full", "inbox_full"]
        assert agent.log_first == 1 and agent.seq == 1  # nothing entered its log: its stream.start is there
        agent.stream_delta(mine, "own", 1)
        agent.take_output()
        assert agent.replay_after(0) is not None  # its own frames, all of them
        agent.members.present()
        out = [orjson.loads(f) for f in agent.take_output()]
        assert [(f["type"], f["seq"]) for f in out] == [("message", 3), ("message", 4), ("message", 5)]
        assert feed_channels(sender, {"type": "send", "to": "agent", "data": 1, "id": "n"})[0]["type"] == "ok"  # back
        assert agent.members.inbox is None and agent.members.inbox_bytes == 0

    def test_the_inbox_counts_bytes_too(self) -> None:
        hub, _ = make()
        agent = session(hub, "agent", limits=MessagingLimits(inbox_messages=100, inbox_bytes=50))
        sender = session(hub, "sender")
        agent.members.away = True
        assert feed_channels(sender, {"type": "send", "to": "agent", "data": "x" * 40, "id": "a"})[0]["type"] == "ok"
        assert feed_channels(sender, {"type": "send", "to": "agent", "data": "x" * 40, "id": "b"})[0]["code"] == "inbox_full"


class TestChannelHistory:
    def test_all_histories_together_are_bounded_oldest_first(self) -> None:
        frame = len(b'{"type":"message","channel":"c0","offset":1,"from":"p","data":' + b"1" * 100 + b"}")
        entry = frame + HISTORY_ENTRY_OVERHEAD
        hub, _ = make(history_bytes=5 * entry)
        for i in range(8):
            hub.publish(f"c{i}", "p", b"1" * 100)
        assert hub.held_bytes == 5 * entry and hub.held_entries == 5
        assert [name for name, c in hub.channels.items() if c.history] == ["c3", "c4", "c5", "c6", "c7"]

    def test_one_publishers_share_is_bounded_and_recovery_stays_exact(self) -> None:
        hub, _ = make(history_bytes=1 << 20, history_bytes_per_publisher=4000)
        for i in range(10):
            hub.publish("shared", "good", orjson.dumps(i), publisher="good")
        for _ in range(60):  # a flood, ~200 bytes a message
            hub.publish("flood", "bad", b'"' + b"z" * 100 + b'"', publisher="bad")
        assert hub.publishers["bad"][0] <= 4000
        assert len(hub.channels["shared"].history) == 10  # the others' history untouched
        reader = session(hub, "reader")
        first = hub.channels["flood"].history[0][0]
        out = feed_channels(reader, {"type": "subscribe", "channel": "flood", "since": first - 1})
        assert out[0]["recovered"] is True and [f["offset"] for f in out[1:-1]] == list(range(first, 61))
        assert out[-1] == {"type": "presence", "channel": "flood", "offset": 61, "joined": "reader"}
        out = feed_channels(reader, {"type": "subscribe", "channel": "flood", "since": first - 2})
        assert out[0]["recovered"] is False  # gone from the front: said, never skipped silently

    def test_the_counts_follow_every_way_out_of_a_history(self) -> None:
        clock = FakeClock()
        hub, _ = make(history_size=3, history_ttl=10, clock=clock)
        for _ in range(5):
            hub.publish("c", "p", b"1", publisher="p")
        assert hub.held_entries == 3 and hub.publishers["p"][1] == 3
        clock.now += 11
        hub.sweep()
        assert hub.held_bytes == 0 and hub.held_entries == 0 and not hub.publishers and not hub.channels

    def test_a_sessions_publications_and_streams_count_against_its_account(self) -> None:
        hub, _ = make(history_bytes_per_publisher=10_000)
        s = session(hub, "p", account="ip:10.0.0.1")
        feed_channels(s, {"type": "publish", "channel": "c", "data": 1})
        mirrored = start(s, channel="c")
        s.stream_delta(mirrored, "x", 1)
        assert hub.publishers["ip:10.0.0.1"][1] == 3  # the publication, stream.start, stream.delta


class TestRights:
    def test_a_resume_with_narrower_rights_drops_what_they_forbid(self) -> None:
        hub, _ = make()
        s = session(hub, "w")
        for name in ("secret", "public"):
            feed_channels(s, {"type": "subscribe", "channel": name})
        mirrored = start(s, channel="secret")
        s.take_output()
        calls = s.members.restrict(ChannelRules(("public",), ("public",)), s.streams.values())
        assert [(c.kind, c.msg.channel) for c in calls] == [("unsubscribe", "secret")]
        for call in calls:
            hub.carry_out(s, call)
        assert s.subscriptions == {"public"} and s not in hub.channels["secret"].subscribers
        assert mirrored.channel is None  # it publishes there no more
        (err,) = frames(s)
        assert (err["code"], err["channel"]) == ("forbidden", "secret")
        assert feed_channels(s, {"type": "publish", "channel": "secret", "data": 1})[0]["code"] == "forbidden"
        assert s.members.restrict(ChannelRules(("public",), ("public",))) == []  # the same rights: nothing
