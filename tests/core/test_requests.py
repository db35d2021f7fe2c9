"""Request ids (duplicate_request), ack, and a session without messaging."""

from __future__ import annotations

from typing import Any

import pytest

from tests.core.drive import HI, feed, frames, make_session, start


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
