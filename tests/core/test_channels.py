"""Channels, presence and agent names in memory (core.channels) with sessions (no network)."""

from __future__ import annotations

from typing import Any

import orjson

from tests.helpers import FakeClock
from wsserver.core.actions import MessagingCall
from wsserver.core.channels import Channels
from wsserver.core.limits import MessagingLimits
from wsserver.core.session import Session
from wsserver.providers import Providers, SimulatedProvider
from wsserver.wire.messages import decode_client


class RecordingChannels(Channels):
    """Channels whose deliveries, once flushed, are queued on the subscribers'
    sessions (what the transport does for a busy connection) and recorded."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent: list[tuple[bytes, list[Session]]] = []

    def flush(self) -> None:
        for _, _, frame, sessions in self.take_deliveries():
            self.sent.append((frame, sessions))
            for s in sessions:
                s.emit_unsequenced(frame)


def make(**hub_kwargs: Any) -> tuple[RecordingChannels, list[tuple[bytes, list[Session]]]]:
    hub = RecordingChannels(**hub_kwargs)
    return hub, hub.sent


def session(hub: Channels, agent: str | None = None, **kwargs: Any) -> Session:
    s = Session(
        f"id-{agent}",
        providers=Providers([SimulatedProvider()], default="simulated"),
        channels=hub,
        agent=agent,
        **kwargs,
    )
    if agent:
        assert hub.claim_agent(agent, s)
    return s


def feed(s: Session, message: dict[str, Any]) -> list[dict[str, Any]]:
    """Handle ``message``, carry out its messaging call (the memory backplane
    answers at once), flush the channel traffic, and return ``s``'s frames."""
    hub = s.members.sink
    assert isinstance(hub, RecordingChannels)
    for action in s.handle(decode_client(orjson.dumps(message))):
        if isinstance(action, MessagingCall):
            hub.carry_out(s, action)
    hub.flush()
    return [orjson.loads(f) for f in s.take_output()]


def test_offsets_start_at_one_and_frames_are_encoded_once() -> None:
    hub, sent = make()
    a, b = session(hub, "a"), session(hub, "b")
    feed(a, {"type": "subscribe", "channel": "c"})
    feed(b, {"type": "subscribe", "channel": "c"})
    sent.clear()
    a.take_output()  # b's join
    out = feed(a, {"type": "publish", "channel": "c", "data": {"x": 1}, "id": "p"})
    assert out[0] == {"type": "ok", "seq": 2, "ref": "p", "offset": 3}  # offsets 1, 2: the joins
    assert out[1]["offset"] == 3  # a is subscribed: its own copy, after the ok
    (frame, targets), = sent
    assert targets == [a, b]
    assert orjson.loads(frame) == {"type": "message", "channel": "c", "offset": 3, "from": "a", "data": {"x": 1}}


def test_subscribe_reports_position_members_and_recovers_since() -> None:
    hub, _ = make()
    a = session(hub, "a")
    for i in range(5):
        hub.publish("c", "x", orjson.dumps(i))
    out = feed(a, {"type": "subscribe", "channel": "c", "since": 2, "id": "s"})
    sub = out[0]
    assert (sub["type"], sub["offset"], sub["recovered"], sub["members"], sub["ref"]) == ("subscribed", 5, True, ["a"], "s")
    assert [f["data"] for f in out[1:4]] == [2, 3, 4]  # offsets 3..5
    assert out[4] == {"type": "presence", "channel": "c", "offset": 6, "joined": "a"}


def test_recovery_fails_when_history_is_short_or_epoch_differs() -> None:
    hub, _ = make(history_size=3)
    a = session(hub, "a")
    for i in range(10):
        hub.publish("c", "x", orjson.dumps(i))
    out = feed(a, {"type": "subscribe", "channel": "c", "since": 2})
    assert out[0]["recovered"] is False and out[0]["offset"] == 10
    assert [f["type"] for f in out[1:]] == ["presence"]
    out = feed(a, {"type": "subscribe", "channel": "c", "since": 9, "epoch": "other"})
    assert out[0]["recovered"] is False
    epoch = hub.channels["c"].epoch
    out = feed(a, {"type": "subscribe", "channel": "c", "since": 9, "epoch": epoch})
    assert out[0]["recovered"] is True
    assert [f["offset"] for f in out[1:]] == [10, 11]  # a message and a's own join; no second join


def test_history_expires_by_age() -> None:
    clock = FakeClock(1000.0)
    hub, _ = make(history_ttl=10, clock=clock)
    hub.publish("c", "x", b"1")
    clock.now += 11
    a = session(hub, "a")
    assert feed(a, {"type": "subscribe", "channel": "c", "since": 0})[0]["recovered"] is False


def test_presence_leave_and_sweep() -> None:
    hub, sent = make()
    a, b = session(hub, "a"), session(hub, "b")
    feed(a, {"type": "subscribe", "channel": "c"})
    feed(b, {"type": "subscribe", "channel": "c"})
    sent.clear()
    feed(b, {"type": "unsubscribe", "channel": "c"})
    assert orjson.loads(sent[0][0]) == {"type": "presence", "channel": "c", "offset": 3, "left": "b"}
    hub.leave_all(a)
    hub.flush()
    assert "a" not in hub.agents and not hub.channels["c"].subscribers
    hub.history_ttl = -1
    assert hub.sweep() == 1 and not hub.channels


def test_direct_messages_are_sequenced_for_the_recipient() -> None:
    hub, _ = make()
    a, b = session(hub, "a"), session(hub, "b")
    out = feed(a, {"type": "send", "to": "b", "data": None, "id": "m"})
    assert out == [{"type": "ok", "seq": 1, "ref": "m"}]
    (msg,) = [orjson.loads(f) for f in b.take_output()]
    assert msg == {"type": "message", "seq": 1, "from": "a", "data": None}
    assert b.log[-1][0] == 1  # in the replay log


def test_errors_and_limits() -> None:
    hub, _ = make()
    a = session(hub, "a", limits=MessagingLimits(max_subscriptions=1, max_data_bytes=10, publish_rate=1, publish_burst=2))
    assert feed(a, {"type": "subscribe", "channel": "bad name!"})[0]["code"] == "bad_name"
    feed(a, {"type": "subscribe", "channel": "one"})
    assert feed(a, {"type": "subscribe", "channel": "two"})[0]["code"] == "too_many_subscriptions"
    assert feed(a, {"type": "subscribe", "channel": "one"})[0]["type"] == "subscribed"  # renewal is fine
    assert feed(a, {"type": "publish", "channel": "one", "data": "x" * 20})[0]["code"] == "message_too_large"
    assert feed(a, {"type": "send", "to": "nobody", "data": 1})[0]["code"] == "unknown_agent"
    limited = feed(a, {"type": "publish", "channel": "one", "data": 1})
    assert limited[0]["code"] == "rate_limited" and limited[0]["retry_after_ms"] > 0
    assert feed(a, {"type": "send", "to": "bad name", "data": 1})[0]["code"] == "bad_name"


def test_anonymous_sender_gets_a_public_id_not_the_session_id() -> None:
    hub, sent = make()
    anon = session(hub)
    feed(anon, {"type": "publish", "channel": "c", "data": 1})
    sender = orjson.loads(hub.channels["c"].history[-1][2])["from"]
    assert sender.startswith("anon-") and anon.id not in sender


def test_agent_names_are_unique() -> None:
    hub, _ = make()
    a = session(hub, "a")
    other = session(hub)
    assert hub.claim_agent("a", a) is True
    assert hub.claim_agent("a", other) is False
