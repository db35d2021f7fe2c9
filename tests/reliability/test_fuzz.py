"""Fuzzing with hypothesis: the decoder and the sans-I/O core.

* ``decode_client`` gets arbitrary bytes, arbitrary text, arbitrary JSON,
  message-shaped JSON and mutated protocol vectors: it returns a client
  message or raises ``ProtocolError`` with a documented decoding code, never
  anything else.
* ``ServerProtocol`` gets arbitrary frames after ``hello``: it answers with
  valid server messages and documented error codes, and never raises.
* :class:`SessionMachine` drives random sequences of client requests,
  provider events, dropped connections (also in the middle of a write),
  resumes and expiry into :class:`~wsserver.core.session.Session` and
  :class:`~wsserver.core.protocol.ServerProtocol`, and checks after every step:
  seq is contiguous on the server and at the client, each stream ends exactly
  once and sends nothing after its end, a resume replays exactly the frames
  after the client's ``last_seq`` (the unacknowledged suffix), and what the
  provider produced while no connection was attached reaches the client
  intact, neither lost nor doubled.

Example counts are hypothesis' defaults (the whole file takes seconds);
``HYPOTHESIS_PROFILE=long`` runs 20x as many, 200-step machines (see
tests/helpers.py): ``HYPOTHESIS_PROFILE=long pytest tests/reliability/test_fuzz.py --timeout 0``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from tests.helpers import FakeClock
from wsserver.wire.errors import ErrorCode, ProtocolError
from wsserver.wire.codec import encode
from wsserver.wire.messages import CLIENT_TYPES, Error, decode_client, decode_server
from wsserver.core.protocol import ConnState, Opened, ServerProtocol
from wsserver.providers import Providers, SimulatedProvider
from wsserver.core.actions import StartGeneration, StopGeneration
from wsserver.core.session import Session
from wsserver.core.streams import StreamState

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"
DECODING_CODES = {ErrorCode.BAD_JSON, ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_TYPE}
DOCUMENTED = {code.value for code in ErrorCode}
WELCOME = {"heartbeat_ms": 0, "limits": {}, "server": "fuzz"}
FIELDS = [
    "type", "id", "protocol", "session", "last_seq", "snapshot", "token", "agent", "messages",
    "stream", "provider", "model", "params", "channel", "input", "new_stream", "seq", "since",
    "epoch", "data", "to", "role", "content", "max_tokens", "temperature", "stop",
]  # fmt: skip


def check_decode(data: str | bytes) -> None:
    try:
        msg = decode_client(data)
    except ProtocolError as exc:
        assert exc.code in DECODING_CODES, exc.code
        assert isinstance(exc.message, str) and exc.message
        if exc.code == ErrorCode.BAD_MESSAGE:
            assert exc.field is not None
        # (an empty id is echoed too: not a valid id, but the client's own words)
        assert exc.ref is None or (isinstance(exc.ref, str) and len(exc.ref) <= 64)
        # the answer the server would send is itself a valid server message
        frame = encode(Error(code=exc.code.value, message=exc.message, ref=exc.ref, field=exc.field))
        decode_server(frame)
    else:
        assert msg.type in CLIENT_TYPES


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(sorted(CLIENT_TYPES))
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), kids, max_size=6),
    max_leaves=20,
)
message_shaped = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(CLIENT_TYPES)) | json_scalars},
    optional={name: json_values for name in FIELDS if name != "type"},
)


def _vectors() -> list[bytes]:
    found = []
    for path in sorted(VECTORS.glob("client-*/*.json")):
        vector = json.loads(path.read_text())
        if "message" in vector:
            found.append(orjson.dumps(vector["message"]))
        elif isinstance(vector.get("raw"), str):
            found.append(vector["raw"].encode())
    return found


@st.composite
def mutated_vectors(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_vectors())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from([b"{", b"}", b"[", b'"', b"\\", b"\\u", b"1e999", b"\xff", b"null", b","]))
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


class TestDecodeClient:
    @given(st.binary(max_size=512))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        check_decode(data)

    @given(st.text(max_size=256))
    def test_arbitrary_text(self, data: str) -> None:
        check_decode(data)

    @given(json_values)
    def test_arbitrary_json(self, value: Any) -> None:
        check_decode(json.dumps(value))

    @given(message_shaped)
    def test_message_shaped_json(self, value: dict[str, Any]) -> None:
        check_decode(json.dumps(value))

    @given(mutated_vectors())
    def test_mutated_vectors(self, data: bytes) -> None:
        check_decode(data)


def _fresh_protocol() -> tuple[ServerProtocol, list[Session]]:
    sessions: list[Session] = []

    def open_session(hello: Any) -> Opened:
        session = Session("fuzz", providers=Providers([SimulatedProvider()], default="simulated"))
        sessions.append(session)
        return Opened(session, False)

    return ServerProtocol(open_session=open_session, welcome=WELCOME), sessions


@given(st.lists(st.binary(max_size=200) | st.text(max_size=200) | message_shaped.map(json.dumps), max_size=20))
def test_protocol_answers_any_frames_with_valid_messages(frames: list[Any]) -> None:
    proto, _ = _fresh_protocol()
    proto.receive_text('{"type":"hello","protocol":1}')
    for frame in frames:
        if isinstance(frame, bytes) and frame[:1] == b"\x00":
            proto.receive_binary(frame)
        else:
            proto.receive_text(frame)
    for raw in proto.data_to_send():
        out = decode_server(raw)
        if out.type == "error":
            assert out.code in DOCUMENTED


# --------------------------------------------------------------------------
# The stateful machine


STREAM_IDS = ["a", "b", "c", "d"]
REQUEST_IDS = ["r1", "r2", "r3", "r4", "r5", "r6"]
TEXT = st.text(alphabet="abcxyz é🙂", min_size=1, max_size=6)


class RecordingSession(Session):
    """A session that shows every batch it sequences to ``recorder`` (the test's truth)."""

    recorder: Any = None

    def take_output(self) -> list[bytes]:
        out = super().take_output()
        if self.recorder is not None:
            self.recorder(self, out)
        return out


class SessionMachine(RuleBasedStateMachine):
    """One client, one server-side session at a time, and a provider per stream.

    The transport is modelled the way wsserver/server/ runs the core: a
    *writer* takes every pending frame with ``data_to_send()`` and sends it;
    a socket may drop between two frames of a batch; a detached session has
    its pending output sequenced into the replay log (``take_output``); a
    ``hello {session, last_seq}`` on a new connection resumes it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(1000.0)
        self.log_bound = 10_000
        self.session: Session | None = None
        self.proto: ServerProtocol | None = None  # None: no connection
        self.generation = 0
        self.client_session: str | None = None  # the id from the last welcome
        self._new_client_view()
        self._new_server_view()
        self._connect(resume=False)

    # ------------------------------------------------------------ the models

    def _new_client_view(self) -> None:
        self.client_seq = 0  # last seq the client received
        self.client_acked = 0
        self.client_text: dict[str, str] = {}
        self.client_reasoning: dict[str, str] = {}
        self.client_calls: dict[str, dict[str, str]] = {}  # stream -> call -> arguments
        self.client_index: dict[str, int] = {}
        self.client_ended: set[str] = set()
        self.sent_ids: dict[str, int] = {}  # id -> times sent (sequenced replies expected)
        self.replies: dict[str, int] = {}

    def _new_server_view(self) -> None:
        self.truth: dict[int, bytes] = {}  # every sequenced frame of this session
        self.ended_in_truth: set[str] = set()
        self.provider: dict[str, Any] = {}  # stream id -> Stream (as the runner holds it)
        self.provider_text: dict[str, str] = {}
        self.provider_reasoning: dict[str, str] = {}
        self.provider_calls: dict[str, dict[str, str]] = {}

    def _make_session(self) -> Session:
        self.generation += 1
        session = RecordingSession(
            f"s{self.generation}",
            providers=Providers([SimulatedProvider()], default="simulated"),
            clock=self.clock,
            max_log_messages=self.log_bound,
            max_streams=3,
        )
        session.recorder = self._record
        return session

    def _record(self, session: Session, frames: list[bytes]) -> None:
        """Server-side truth: every sequenced frame, checked as it is sequenced."""
        if session is not self.session:
            return  # an ended session's last frames, never delivered
        for raw in frames:
            frame = orjson.loads(raw)
            if "seq" not in frame:
                continue
            seq = frame["seq"]
            assert seq == len(self.truth) + 1, ("server seq not contiguous", seq, len(self.truth))
            self.truth[seq] = raw
            stream = frame.get("stream")
            if frame["type"] == "stream.end":
                assert stream not in self.ended_in_truth, ("second stream.end", stream)
                self.ended_in_truth.add(stream)
            elif frame["type"] in ("stream.delta", "stream.tool_call", "stream.start"):
                assert stream not in self.ended_in_truth, ("frame after stream.end", frame)

    def _open_session(self, hello: Any) -> Opened:
        """What Server._open_session does, minus the transport."""
        before: list[bytes] = []
        session = self.session
        if hello.session is not None and session is not None and hello.session == session.id:
            session.take_output()  # sequence what is pending: the replay covers it
            replay = session.replay_after(hello.last_seq or 0)
            if replay is not None:
                suffix = [self.truth[s] for s in range(hello.last_seq + 1, session.seq + 1)]
                assert replay == suffix, "replay is not exactly the frames after last_seq"
                return Opened(session, True, after=replay)
            # the log no longer reaches back: only possible with a small bound
            first = session.log[0][0] if session.log else session.seq + 1
            assert first > hello.last_seq + 1, "resume refused although the log covers it"
            before.append(encode(Error(code=ErrorCode.RESUME_FAILED.value, message="resume failed")))
            self._apply(session.close("cancelled"))
        self.session = self._make_session()
        self._new_server_view()
        return Opened(self.session, False, before=before)

    def _connect(self, resume: bool) -> None:
        if self.proto is not None:  # takeover: the old connection lets go
            self.proto.release()
        self.proto = ServerProtocol(open_session=self._open_session, welcome=WELCOME, clock=self.clock)
        hello: dict[str, Any] = {"type": "hello", "protocol": 1}
        if resume and self.client_session is not None:  # (maybe expired meanwhile)
            hello.update(session=self.client_session, last_seq=self.client_seq)
        self.proto.receive_text(orjson.dumps(hello))
        assert self.proto.state is ConnState.OPEN
        self._flush()

    def _deliver(self, raw: bytes) -> None:
        """The client reads one frame."""
        frame = orjson.loads(raw)
        decode_server(raw)
        kind = frame["type"]
        if kind == "welcome":
            assert frame["resumed"] == (frame["session"] == self.client_session)
            self.client_session = frame["session"]
            if not frame["resumed"]:
                self._new_client_view()
            return
        if kind == "error":
            assert frame["code"] in DOCUMENTED
        if "seq" not in frame:
            if kind == "pong":
                self.replies[frame["ref"]] = self.replies.get(frame["ref"], 0) + 1
            return
        assert frame["seq"] == self.client_seq + 1, ("client seq gap or repeat", frame["seq"], self.client_seq)
        self.client_seq = frame["seq"]
        ref = frame.get("ref")
        if ref in REQUEST_IDS and kind in ("stream.start", "ok", "error"):
            self.replies[ref] = self.replies.get(ref, 0) + 1
            assert self.replies[ref] <= self.sent_ids.get(ref, 0), ("reply without a request", frame)
        sid = frame.get("stream")
        if kind == "stream.start":
            assert sid not in self.client_text
            self.client_text[sid], self.client_index[sid] = "", 0
            self.client_reasoning[sid], self.client_calls[sid] = "", {}
        elif kind in ("stream.delta", "stream.tool_call"):
            assert sid not in self.client_ended
            assert frame["index"] == self.client_index[sid]  # one index for every delta-like frame
            self.client_index[sid] += 1
            part = frame.get("part")
            if kind == "stream.tool_call":
                assert frame["call"] not in self.client_calls[sid]
                self.client_calls[sid][frame["call"]] = ""
            elif part is None:
                self.client_text[sid] += frame["text"]
            elif part == "reasoning":
                self.client_reasoning[sid] += frame["text"]
            else:
                self.client_calls[sid][frame["call"]] += frame["text"]  # opened before
        elif kind == "stream.end":
            assert sid not in self.client_ended, ("second stream.end at the client", sid)
            self.client_ended.add(sid)
            # nothing lost or doubled, also what arrived while detached
            assert self.client_text[sid] == self.provider_text[sid], sid
            assert self.client_reasoning[sid] == self.provider_reasoning[sid], sid
            assert self.client_calls[sid] == self.provider_calls[sid], sid
            self._check_message(frame)

    def _check_message(self, end: dict[str, Any]) -> None:
        """stream.end.message tells the answer the frames told."""
        sid, message = end["stream"], end["message"]
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        assert "".join(p["text"] for p in parts if p["type"] == "text") == self.provider_text[sid]
        assert self.provider_reasoning[sid].startswith("".join(p["text"] for p in parts if p["type"] == "reasoning"))
        calls = message.get("tool_calls", [])
        if end["reason"] == "tool_calls":
            assert [c["id"] for c in calls] == list(self.provider_calls[sid])
            for call in calls:
                assert call["arguments"] == orjson.loads(self.provider_calls[sid][call["id"]] or "{}")
        else:
            assert calls == [], ("calls in the message of a stream ended", end["reason"])

    def _flush(self, deliver: int | None = None) -> None:
        """The writer: take every pending frame, send ``deliver`` of them (all)."""
        assert self.proto is not None
        frames = self.proto.data_to_send()
        for raw in frames[:deliver]:
            self._deliver(raw)

    def _apply(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, StartGeneration):
                self.provider[action.stream.id] = action.stream
                self.provider_text[action.stream.id] = ""
                self.provider_reasoning[action.stream.id] = ""
                self.provider_calls[action.stream.id] = {}
            elif isinstance(action, StopGeneration):
                stream = self.provider[action.stream_id]
                # the runner's task is cancelled: its stream_end comes too late
                assert self.session is not None
                assert self.session.stream_end(stream, "cancelled") is False

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proto is not None
        request_id = message.get("id")
        if request_id is not None and message["type"] != "ping":
            self.sent_ids[request_id] = self.sent_ids.get(request_id, 0) + 1
        elif request_id is not None:
            self.sent_ids["ping:" + request_id] = 1
        self._apply(self.proto.receive_text(orjson.dumps(message)))

    @property
    def connected(self) -> bool:
        return self.proto is not None

    # ----------------------------------------------------------------- rules

    @precondition(lambda self: self.connected)
    @rule(stream=st.none() | st.sampled_from(STREAM_IDS), request=st.none() | st.sampled_from(REQUEST_IDS))
    def generate(self, stream: str | None, request: str | None) -> None:
        msg: dict[str, Any] = {"type": "generate", "messages": [{"role": "user", "content": "hi"}]}
        if stream is not None:
            msg["stream"] = stream
        if request is not None:
            msg["id"] = request
        self._send(msg)

    @precondition(lambda self: self.connected)
    @rule(stream=st.sampled_from(STREAM_IDS + ["s1", "s2"]), request=st.none() | st.sampled_from(REQUEST_IDS))
    def cancel(self, stream: str, request: str | None) -> None:
        self._send({"type": "cancel", "stream": stream, **({"id": request} if request else {})})

    @precondition(lambda self: self.connected)
    @rule(
        stream=st.sampled_from(STREAM_IDS + ["s1"]),
        text=st.none() | TEXT,
        new_stream=st.none() | st.sampled_from(STREAM_IDS),
        request=st.none() | st.sampled_from(REQUEST_IDS),
    )
    def interrupt(self, stream: str, text: str | None, new_stream: str | None, request: str | None) -> None:
        msg: dict[str, Any] = {"type": "interrupt", "stream": stream}
        for key, value in (("input", text), ("new_stream", new_stream), ("id", request)):
            if value is not None:
                msg[key] = value
        self._send(msg)

    @precondition(lambda self: self.connected)
    @rule(back=st.integers(-2, 5), request=st.none() | st.sampled_from(REQUEST_IDS))
    def ack(self, back: int, request: str | None) -> None:
        seq = max(0, self.client_seq - back)  # back < 0: beyond what was sent
        self._send({"type": "ack", "seq": seq, **({"id": request} if request else {})})
        if back >= 0:
            self.client_acked = max(self.client_acked, seq)

    @precondition(lambda self: self.connected)
    @rule(request=st.sampled_from(["p1", "p2"]))
    def ping(self, request: str) -> None:
        self._send({"type": "ping", "id": request})

    @precondition(lambda self: self.connected)
    @rule(data=st.binary(max_size=30) | st.sampled_from([b"{", b"[]", b'{"type":"nope","id":"r9"}']))
    def garbage(self, data: bytes) -> None:
        assert self.proto is not None
        assert self.proto.receive_text(data) == []

    @rule(pick=st.integers(0, 7), text=TEXT)
    def provider_delta(self, pick: int, text: str) -> None:
        streams = list(self.provider.values())
        if not streams:
            return
        stream = streams[pick % len(streams)]
        assert self.session is not None
        running = stream.state is StreamState.RUNNING
        self.session.stream_delta(stream, text, 1)  # after the end: ignored
        if running:
            self.provider_text[stream.id] += text

    @rule(pick=st.integers(0, 7), text=TEXT)
    def provider_reasoning_delta(self, pick: int, text: str) -> None:
        stream = self._pick(pick)
        if stream is None:
            return
        running = stream.state is StreamState.RUNNING
        assert self.session is not None
        self.session.stream_reasoning(stream, text, 1)
        if running:
            self.provider_reasoning[stream.id] += text

    @rule(pick=st.integers(0, 7), signed=st.booleans())
    def provider_reasoning_done(self, pick: int, signed: bool) -> None:
        stream = self._pick(pick)
        if stream is not None:
            assert self.session is not None
            self.session.stream_reasoning_done(stream, "sig" if signed else None, None if signed else "opaque")

    @rule(pick=st.integers(0, 7))
    def provider_tool_call(self, pick: int) -> None:
        stream = self._pick(pick)
        if stream is None:
            return
        running = stream.state is StreamState.RUNNING
        call = f"c{len(self.provider_calls[stream.id])}"
        assert self.session is not None
        self.session.stream_tool_call(stream, call, "f")
        if running:
            self.provider_calls[stream.id][call] = ""

    @rule(pick=st.integers(0, 7), which=st.integers(0, 3), text=st.sampled_from(["{", "}", '"a"', ":", "1", ",", '{"b":2}']))
    def provider_arguments(self, pick: int, which: int, text: str) -> None:
        stream = self._pick(pick)
        if stream is None or stream.state is not StreamState.RUNNING or not self.provider_calls[stream.id]:
            return
        calls = list(self.provider_calls[stream.id])
        call = calls[which % len(calls)]  # parallel calls: fragments of several interleave
        assert self.session is not None
        self.session.stream_tool_delta(stream, call, text)
        self.provider_calls[stream.id][call] += text

    def _pick(self, pick: int) -> Any:
        streams = list(self.provider.values())
        return streams[pick % len(streams)] if streams else None

    @rule(pick=st.integers(0, 7), fail=st.booleans())
    def provider_end(self, pick: int, fail: bool) -> None:
        streams = [s for s in self.provider.values() if s.state is StreamState.RUNNING]
        if not streams:
            return
        assert self.session is not None
        stream = streams[pick % len(streams)]
        if fail:
            assert self.session.stream_end(stream, "error", ("provider_error", "upstream failed"))
        else:
            assert self.session.stream_end(stream, "complete")

    @precondition(lambda self: self.connected)
    @rule()
    def flush(self) -> None:
        self._flush()

    @precondition(lambda self: self.connected)
    @rule(sent=st.integers(0, 5))
    def drop_during_write(self, sent: int) -> None:
        """The socket dies after ``sent`` frames of a batch (the rest: lost on the wire)."""
        self._flush(deliver=sent)
        self._drop()

    @precondition(lambda self: self.connected)
    @rule()
    def drop(self) -> None:
        self._drop()

    def _drop(self) -> None:
        assert self.proto is not None
        self.proto.release()
        self.proto = None

    @precondition(lambda self: not self.connected and self.session is not None)
    @rule()
    def detached_drain(self) -> None:
        """What _LiveSession does while detached: sequence output into the log."""
        assert self.session is not None
        self.session.take_output()

    @rule()
    def resume(self) -> None:
        """hello {session, last_seq} on a new connection (a takeover if one is open)."""
        self._connect(resume=True)

    @precondition(lambda self: not self.connected and self.session is not None)
    @rule()
    def expire(self) -> None:
        """session_ttl passed with nothing attached: streams end, the session is gone."""
        assert self.session is not None
        session = self.session
        self._apply(session.close("error", (ErrorCode.EXPIRED.value, "expired")))
        session.take_output()
        assert not session.streams
        self.session = None  # a later resume names an unknown session: fresh one
        self._new_server_view()

    @rule(bound=st.integers(3, 40))
    def shrink_log_bound(self, bound: int) -> None:
        """A small replay log: a long gap then makes a resume fail (resume_failed)."""
        self.log_bound = bound
        if self.session is not None:
            self.session.out.max_log_messages = bound

    @rule(seconds=st.floats(0, 5))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds

    # ------------------------------------------------------------ invariants

    @invariant()
    def log_is_the_unacked_suffix(self) -> None:
        session = self.session
        if session is None:
            return
        seqs = [seq for seq, _ in session.log]
        if seqs:
            assert seqs == list(range(seqs[0], session.seq + 1)), "log not contiguous up to seq"
            assert seqs[0] > session.acked
            if session.out.max_log_messages >= 10_000:
                assert seqs[0] == session.acked + 1, "an unacknowledged frame left the log"
            assert all(self.truth[seq] == frame for seq, frame in session.log)
        assert session.seq == len(self.truth)
        assert session.out.log_bytes == sum(len(frame) for _, frame in session.log)

    @invariant()
    def each_stream_ends_exactly_once(self) -> None:
        session = self.session
        if session is None:
            return
        for sid, stream in self.provider.items():
            assert (sid in session.streams) == (stream.state is StreamState.RUNNING)
        if not session.has_output:  # everything sequenced: running xor ended
            for sid in self.provider:
                assert (sid in session.streams) != (sid in self.ended_in_truth), sid

    @invariant()
    def client_never_ahead(self) -> None:
        if self.session is not None and self.connected:
            assert self.client_seq <= self.session.seq

    def teardown(self) -> None:
        """Resume once more and read everything: every request was answered once."""
        if self.session is None:
            return
        self._connect(resume=True)
        self._flush()
        assert self.session is not None
        assert self.client_seq == self.session.seq
        for request_id, times in self.sent_ids.items():
            if request_id.startswith("ping:"):
                continue  # pong carries no seq: lost with a dropped socket, by design
            assert self.replies.get(request_id, 0) == times, (request_id, times, self.replies)
        for sid in self.client_ended:
            assert self.client_text[sid] == self.provider_text[sid]
            assert self.client_calls[sid] == self.provider_calls[sid]
        note(f"seq={self.session.seq} streams={len(self.provider)} ended={len(self.client_ended)}")


TestSessionMachine = SessionMachine.TestCase
