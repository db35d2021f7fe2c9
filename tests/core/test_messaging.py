"""A session's messaging requests as calls to a shared backplane, answered later (PROTOCOL.md 7)."""

from __future__ import annotations

from tests.core.drive import feed, frames, make_session, start
from wsserver.core.actions import MessagingCall
from wsserver.core.session import Session


class RemoteChannels:
    """What a session sees of a shared backplane: somewhere to publish a stream's frames."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes]] = []

    def publish_nowait(self, channel: str, sender: str, data: bytes, publisher: str = "") -> None:
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
        s.members.subscribed(call.msg, "e", 6, True, ["me", "x"], missed)
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
        s.members.published(call.msg, 9)
        out = frames(s)
        assert out[0] == {"type": "ok", "seq": 1, "ref": "p", "offset": 9}
        assert out[1]["offset"] == 9 and len(out) == 2

    def test_send_to_nobody_and_a_failed_call(self) -> None:
        s = self.remote()
        (call,) = feed(s, {"type": "send", "id": "m", "to": "ghost", "data": 1})
        s.members.sent(call.msg, False)
        (call2,) = feed(s, {"type": "subscribe", "id": "s", "channel": "team"})
        s.members.failed(call2, "redis is down")
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
