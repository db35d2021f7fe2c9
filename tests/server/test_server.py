"""End-to-end tests of the server on 127.0.0.1, through raw JSON frames."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wsserver import __version__
from wsserver.wire.messages import ChatMessage, decode_server
from wsserver.providers import simulated_reply
from wsserver.server import Server

from tests.helpers import USER_HI, RawClient

# ----------------------------------------------------------------- helpers


def reply_text(messages: list[dict[str, str]], reply_tokens: int | None = None) -> str:
    """The simulated provider's deterministic answer to ``messages``."""
    return "".join(simulated_reply([ChatMessage(**m) for m in messages], reply_tokens))


def generate(
    messages: list[dict[str, str]] = USER_HI,
    *,
    id: str | None = None,
    stream: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "generate", "messages": messages}
    if id is not None:
        msg["id"] = id
    if stream is not None:
        msg["stream"] = stream
    if params:
        msg["params"] = params
    return msg


@contextlib.asynccontextmanager
async def open_raw(srv: Server, *, hello: bool = True, path: str = "/", **kwargs: Any) -> AsyncIterator[RawClient]:
    """A RawClient against any server (``raw_client`` is bound to the ``server`` fixture)."""
    url = f"ws://127.0.0.1:{srv.port}{path}"
    async with asyncio.timeout(5):
        ws = await connect(url, compression=None, **kwargs)
    try:
        client = RawClient(ws)
        if hello:
            await client.hello()
        yield client
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await ws.close()


async def wait_closed(client: RawClient, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Read until the server closes the connection; returns the frames read."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionClosed):
            while True:
                frames.append(orjson.loads(await client.ws.recv()))
    return frames


async def frames_for(client: RawClient, seconds: float) -> list[dict[str, Any]]:
    """Every frame that arrives within ``seconds``."""
    frames: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                frames.append(orjson.loads(await client.ws.recv()))
    return frames


async def assert_alive(client: RawClient) -> None:
    """The connection still answers an application ping."""
    await client.send({"type": "ping", "id": "alive?"})
    frames = await client.recv_until(lambda f: f["type"] == "pong", timeout=5)
    assert frames[-1] == {"type": "pong", "ref": "alive?"}


async def assert_server_serves(srv: Server) -> None:
    """A brand-new client can connect, say hello and run a short stream."""
    async with open_raw(srv) as c:
        await c.send(generate(id="probe", reply_tokens=5))
        frames = await c.recv_until(lambda f: f["type"] == "stream.end", timeout=5)
        assert frames[-1]["reason"] == "complete"
        assert "".join(f["text"] for f in frames if f["type"] == "stream.delta") == reply_text(USER_HI, 5)


def assert_seq_contiguous(frames: Iterable[dict[str, Any]], first: int = 1) -> int:
    """The frames' seq are first, first+1, ...; returns the last one."""
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(first, first + len(seqs))), seqs[:50]
    return seqs[-1] if seqs else first - 1


def stream_frames(frames: list[dict[str, Any]], stream: str) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("stream") == stream and f["type"].startswith("stream.")]


def check_stream(frames: list[dict[str, Any]], stream: str) -> tuple[str, dict[str, Any]]:
    """One stream's frames are start, deltas (index 0..n-1), one end; returns text and end."""
    mine = stream_frames(frames, stream)
    assert mine[0]["type"] == "stream.start", mine[0]
    ends = [f for f in mine if f["type"] == "stream.end"]
    assert len(ends) == 1, ends
    assert mine[-1]["type"] == "stream.end", "a frame of the stream follows its stream.end"
    deltas = mine[1:-1]
    assert all(f["type"] == "stream.delta" for f in deltas)
    assert [f["index"] for f in deltas] == list(range(len(deltas)))
    for f in mine:  # every frame is a valid server message
        decode_server(orjson.dumps(f))
    return "".join(f["text"] for f in deltas), ends[0]


def error_of(frame: dict[str, Any], code: str) -> dict[str, Any]:
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    assert isinstance(frame["message"], str) and frame["message"]
    return frame


# --------------------------------------------------------- hello / welcome


async def test_hello_welcome_fields(server: Server, raw_client: Any) -> None:
    async with raw_client() as c:
        welcome = await c.hello()
    assert welcome["protocol"] == 1
    assert isinstance(welcome["session"], str) and len(welcome["session"]) >= 16
    assert welcome["resumed"] is False
    assert welcome["heartbeat_ms"] == 0  # TEST_CONFIG turns keepalive pings off
    limits = welcome["limits"]
    assert limits["max_streams"] == 8
    assert limits["max_message_bytes"] == 1 << 20
    assert limits["max_id_length"] == 64
    assert welcome["server"] == f"wsserver/{__version__}"
    assert "seq" not in welcome
    decode_server(orjson.dumps(welcome))


async def test_sessions_are_distinct(raw_client: Any) -> None:
    async with raw_client() as a, raw_client() as b:
        assert (await a.hello())["session"] != (await b.hello())["session"]


async def test_subprotocol_selected_when_offered(raw_client: Any) -> None:
    async with raw_client(subprotocols=["wsserver.v1"]) as c:
        assert c.ws.subprotocol == "wsserver.v1"
        await c.hello()
        await assert_alive(c)


async def test_client_offering_no_subprotocol_is_accepted(raw_client: Any) -> None:
    async with raw_client() as c:
        assert c.ws.subprotocol is None
        await c.hello()
        await assert_alive(c)


async def test_limits_follow_config(make_server: Any) -> None:
    async with make_server(max_streams=3, max_size=4096, ping_interval=5.0) as srv:
        async with open_raw(srv, hello=False) as c:
            welcome = await c.hello()
    assert welcome["limits"]["max_streams"] == 3
    assert welcome["limits"]["max_message_bytes"] == 4096
    assert welcome["heartbeat_ms"] == 5000


async def test_ping_pong_has_no_seq(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send({"type": "ping", "id": "p1"})
        assert await c.recv() == {"type": "pong", "ref": "p1"}
        await c.send({"type": "ping"})
        assert await c.recv() == {"type": "pong"}
        # the first session-bound frame after pings still has seq 1
        await c.send(generate(id="g", reply_tokens=3))
        start = await c.recv()
        assert start["type"] == "stream.start" and start["seq"] == 1


# ----------------------------------------------------------------- streams


async def test_single_stream(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send(generate(id="r1", reply_tokens=50))
        frames = await c.recv_until(lambda f: f["type"] == "stream.end")
    assert_seq_contiguous(frames)
    start = frames[0]
    assert start["type"] == "stream.start"
    assert start["ref"] == "r1"
    assert start["provider"] == "simulated" and start["model"] == "sim-1"
    text, end = check_stream(frames, start["stream"])
    assert text == reply_text(USER_HI, 50)
    assert text.startswith('You said "hi".')
    assert end["reason"] == "complete"
    assert end["usage"]["output_tokens"] == 50
    assert isinstance(end["usage"]["input_tokens"], int) and end["usage"]["input_tokens"] > 0
    assert end["ttft_ms"] is not None and end["ttft_ms"] >= 0
    assert end["duration_ms"] >= end["ttft_ms"]


async def test_default_reply_and_max_tokens(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send(generate(id="a"))
        frames = await c.recv_until(lambda f: f["type"] == "stream.end")
        text, end = check_stream(frames, frames[0]["stream"])
        assert text == reply_text(USER_HI)
        assert end["reason"] == "complete"
        await c.send(generate(id="b", max_tokens=7, reply_tokens=100))
        frames = await c.recv_until(lambda f: f["type"] == "stream.end")
        text, end = check_stream(frames, frames[0]["stream"])
        assert text == reply_text(USER_HI, 7)
        assert end["reason"] == "length"
        assert end["usage"]["output_tokens"] == 7


@pytest.mark.both_loops
async def test_two_concurrent_streams_interleave(raw_client: Any) -> None:
    msgs_a = [{"role": "user", "content": "first question about sockets"}]
    msgs_b = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "second question about streams"},
    ]
    async with raw_client(hello=True) as c:
        await c.send(generate(msgs_a, id="ra", stream="alpha", reply_tokens=300))
        await c.send(generate(msgs_b, id="rb", stream="beta", reply_tokens=300))
        frames: list[dict[str, Any]] = []
        ended: set[str] = set()
        async with asyncio.timeout(15):
            while ended != {"alpha", "beta"}:
                frame = await c.recv()
                frames.append(frame)
                if frame["type"] == "stream.end":
                    ended.add(frame["stream"])
        # nothing else follows
        assert await frames_for(c, 0.1) == []

    assert_seq_contiguous(frames)
    first_end = next(i for i, f in enumerate(frames) if f["type"] == "stream.end")
    before_end = {f["stream"] for f in frames[:first_end] if f["type"] == "stream.delta"}
    assert before_end == {"alpha", "beta"}, "the two streams did not interleave"

    text_a, end_a = check_stream(frames, "alpha")
    text_b, end_b = check_stream(frames, "beta")
    assert text_a == reply_text(msgs_a, 300)
    assert text_b == reply_text(msgs_b, 300)
    assert text_a != text_b
    for end in (end_a, end_b):
        assert end["reason"] == "complete"
        assert end["usage"]["output_tokens"] == 300
    starts = {f["stream"]: f["ref"] for f in frames if f["type"] == "stream.start"}
    assert starts == {"alpha": "ra", "beta": "rb"}


async def test_server_assigns_distinct_stream_ids(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        for i in range(3):
            await c.send(generate(id=f"g{i}", reply_tokens=2))
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while sum(f["type"] == "stream.end" for f in frames) < 3:
                frames.append(await c.recv())
    assert_seq_contiguous(frames)
    ids = [f["stream"] for f in frames if f["type"] == "stream.start"]
    assert len(set(ids)) == 3
    for sid in ids:
        text, end = check_stream(frames, sid)
        assert text == reply_text(USER_HI, 2) and end["reason"] == "complete"


@contextlib.asynccontextmanager
async def lagging_client(srv: Server) -> AsyncIterator[RawClient]:
    """A client whose connection holds little data in flight (small socket buffers),
    so that the server's writer blocks as soon as the client stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(
        asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port)), 5
    )
    async with open_raw(srv, sock=sock, max_queue=1) as c:
        (conn,) = srv.connections
        server_sock = conn.ws.transport.get_extra_info("socket")
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        yield c


async def test_slow_reader_gets_merged_deltas(server: Server) -> None:
    """A reader that lags gets fewer, larger deltas; seq and index stay contiguous."""
    msgs = [{"role": "user", "content": "lots please"}]
    async with lagging_client(server) as c:
        await c.send(generate(msgs, id="big", stream="big", reply_tokens=20_000))
        await asyncio.sleep(0.3)  # don't read: the socket lags, pending deltas merge
        frames = await c.recv_until(lambda f: f["type"] == "stream.end", timeout=20)
    assert_seq_contiguous(frames)
    text, end = check_stream(frames, "big")
    assert end["reason"] == "complete"
    assert text == reply_text(msgs, 20_000)
    assert end["usage"]["output_tokens"] == 20_000
    assert len(frames) - 2 < 20_000  # some deltas were merged


async def test_cancel_while_reader_lags(server: Server) -> None:
    """Cancel with merged deltas pending: nothing of the stream follows its end."""
    msgs = [{"role": "user", "content": "lag then cancel"}]
    async with lagging_client(server) as c:
        await c.send(generate(msgs, id="g", stream="lag", tokens_per_s=20_000, reply_tokens=100_000))
        await asyncio.sleep(0.3)
        await c.send({"type": "cancel", "stream": "lag", "id": "stop"})
        frames = await c.recv_until(lambda f: f["type"] == "ok", timeout=20)
        frames += await frames_for(c, 0.3)
    assert_seq_contiguous(frames)
    text, end = check_stream(frames, "lag")
    assert end["reason"] == "cancelled"
    delivered = end["usage"]["output_tokens"]
    assert 0 < delivered < 100_000
    assert len(frames) - 3 < delivered  # some deltas were merged
    tokens = simulated_reply([ChatMessage(**m) for m in msgs], 100_000)
    assert text == "".join(tokens[:delivered])
    assert frames[-1] == {"type": "ok", "seq": end["seq"] + 1, "ref": "stop"}


# ------------------------------------------------------------------ cancel


@pytest.mark.both_loops
async def test_cancel_mid_stream(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send(generate(id="g", stream="long", tokens_per_s=200, reply_tokens=1000))
        frames = await c.recv_until(
            lambda f: f["type"] == "stream.delta" and f["index"] >= 4, timeout=5
        )
        t0 = time.monotonic()
        await c.send({"type": "cancel", "stream": "long", "id": "stop"})
        frames += await c.recv_until(lambda f: f["type"] == "stream.end", timeout=5)
        elapsed = time.monotonic() - t0
        frames += await c.recv_until(lambda f: f["type"] == "ok", timeout=5)
        after = await frames_for(c, 0.3)
        await assert_alive(c)

    assert elapsed < 2.0, elapsed
    assert after == [], after  # no delta (or anything) after the end
    assert_seq_contiguous(frames)
    text, end = check_stream(frames, "long")
    assert end["reason"] == "cancelled"
    delivered = end["usage"]["output_tokens"]
    assert 5 <= delivered < 1000
    tokens = simulated_reply([ChatMessage(**m) for m in USER_HI], 1000)
    assert text == "".join(tokens[:delivered])
    ok = frames[-1]
    assert ok == {"type": "ok", "seq": end["seq"] + 1, "ref": "stop"}


async def test_cancel_before_first_token(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send(generate(id="g", stream="slow", ttft_ms=10_000, reply_tokens=10))
        start = await c.recv()
        assert start["type"] == "stream.start"
        t0 = time.monotonic()
        await c.send({"type": "cancel", "stream": "slow", "id": "stop"})
        frames = await c.recv_until(lambda f: f["type"] == "ok", timeout=5)
        assert time.monotonic() - t0 < 2.0
        frames += await frames_for(c, 0.2)
    assert [f["type"] for f in frames] == ["stream.end", "ok"]
    end = frames[0]
    assert end["reason"] == "cancelled"
    assert end["usage"]["output_tokens"] == 0
    assert end.get("ttft_ms") is None  # no token ever came
    assert_seq_contiguous([start, *frames])


async def test_cancel_without_id_has_no_ok(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send(generate(stream="s", tokens_per_s=100, reply_tokens=1000))
        await c.recv_until(lambda f: f["type"] == "stream.delta")
        await c.send({"type": "cancel", "stream": "s"})
        frames = await c.recv_until(lambda f: f["type"] == "stream.end")
        assert frames[-1]["reason"] == "cancelled"
        after = await frames_for(c, 0.3)
    assert after == []


async def test_cancel_unknown_stream(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send({"type": "cancel", "stream": "nope", "id": "c1"})
        err = error_of(await c.recv(), "unknown_stream")
        assert err["stream"] == "nope"
        assert err["ref"] == "c1"
        assert err["seq"] == 1
        await assert_alive(c)


async def test_cancel_finished_stream(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send(generate(id="g", stream="done", reply_tokens=3))
        frames = await c.recv_until(lambda f: f["type"] == "stream.end")
        await c.send({"type": "cancel", "stream": "done", "id": "c2"})
        err = error_of(await c.recv(), "unknown_stream")
        assert err["stream"] == "done" and err["ref"] == "c2"
        assert err["seq"] == frames[-1]["seq"] + 1
        await assert_alive(c)
        # and a later stream still works
        await c.send(generate(id="g2", reply_tokens=3))
        more = await c.recv_until(lambda f: f["type"] == "stream.end")
        assert more[-1]["reason"] == "complete"
        assert_seq_contiguous(frames + [err] + more)


# ----------------------------------------------------------- request rules


async def test_duplicate_request_id(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send(generate(id="same", tokens_per_s=100, reply_tokens=1000))
        start = await c.recv()
        assert start["type"] == "stream.start"
        first = start["stream"]
        await c.send(generate(id="same", reply_tokens=3))
        frames = await c.recv_until(lambda f: f["type"] == "error")
        await c.send({"type": "cancel", "stream": first, "id": "stop"})
        frames += await c.recv_until(lambda f: f["type"] == "ok")
        frames += await frames_for(c, 0.2)
    err = error_of(frames[[f["type"] for f in frames].index("error")], "duplicate_request")
    assert err["ref"] == "same"
    assert err["stream"] == first
    assert [f for f in frames if f["type"] == "stream.start"] == []  # no second stream
    assert {f["stream"] for f in frames if f["type"].startswith("stream.")} == {first}
    assert_seq_contiguous([start, *frames])


async def test_duplicate_id_of_a_failed_cancel(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send({"type": "cancel", "stream": "x", "id": "dup"})
        error_of(await c.recv(), "unknown_stream")
        await c.send(generate(id="dup", reply_tokens=2))
        err = error_of(await c.recv(), "duplicate_request")
        assert err["ref"] == "dup"
        assert await frames_for(c, 0.2) == []


async def test_too_many_streams(make_server: Any) -> None:
    async with make_server(max_streams=2) as srv, open_raw(srv) as c:
        for i in range(2):
            await c.send(generate(id=f"g{i}", stream=f"s{i}", tokens_per_s=50, reply_tokens=1000))
        frames = await c.recv_until(
            lambda f: f["type"] == "stream.start" and f["stream"] == "s1"
        )
        await c.send(generate(id="g2", stream="s2", reply_tokens=3))
        frames += await c.recv_until(lambda f: f["type"] == "error")
        err = error_of(frames[-1], "too_many_streams")
        assert err["ref"] == "g2"
        assert not any(f["type"] == "stream.start" and f["stream"] == "s2" for f in frames)
        # once one ends, there is room again (and the refused id s2 is still free)
        await c.send({"type": "cancel", "stream": "s0", "id": "c"})
        frames += await c.recv_until(lambda f: f["type"] == "ok")
        await c.send(generate(id="g3", stream="s2", reply_tokens=3))
        frames += await c.recv_until(lambda f: f["type"] == "stream.end" and f["stream"] == "s2")
        text, end = check_stream(frames, "s2")
        assert end["reason"] == "complete" and text == reply_text(USER_HI, 3)
        assert_seq_contiguous(frames)


async def test_stream_exists(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send(generate(id="a", stream="mine", tokens_per_s=100, reply_tokens=1000))
        assert (await c.recv())["type"] == "stream.start"
        # while it runs
        await c.send(generate(id="b", stream="mine", reply_tokens=3))
        frames = await c.recv_until(lambda f: f["type"] == "error")
        err = error_of(frames[-1], "stream_exists")
        assert err["stream"] == "mine" and err["ref"] == "b"
        await c.send({"type": "cancel", "stream": "mine", "id": "c"})
        await c.recv_until(lambda f: f["type"] == "ok")
        # and after it ended: stream ids are never reused in a session
        await c.send(generate(id="d", stream="mine", reply_tokens=3))
        frames = await c.recv_until(lambda f: f["type"] == "error")
        err = error_of(frames[-1], "stream_exists")
        assert err["stream"] == "mine" and err["ref"] == "d"
        assert await frames_for(c, 0.2) == []


async def test_unknown_provider(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send({**generate(id="p"), "provider": "nope"})
        err = error_of(await c.recv(), "provider_unavailable")
        assert err["ref"] == "p"
        assert "simulated" in err["message"]
        assert await frames_for(c, 0.1) == []


# --------------------------------------------------------------- bad input


async def test_invalid_json(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send('{"type": "ping",')
        err = error_of(await c.recv(), "bad_json")
        assert err["seq"] == 1
        await assert_alive(c)


async def test_invalid_json_before_hello(raw_client: Any) -> None:
    async with raw_client() as c:
        await c.send("nope")
        err = error_of(await c.recv(), "bad_json")
        assert "seq" not in err
        await c.hello()  # still waiting for hello
        await assert_alive(c)


@pytest.mark.parametrize("raw", ["[1, 2]", '"hello"', "42", "null"])
async def test_json_not_an_object(raw_client: Any, raw: str) -> None:
    async with raw_client(hello=True) as c:
        await c.send(raw)
        err = error_of(await c.recv(), "bad_message")
        assert err["field"] == ""
        await assert_alive(c)


async def test_missing_type(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send({"id": "x1", "stream": "s"})
        err = error_of(await c.recv(), "bad_message")
        assert err["field"] == "type"
        assert err["ref"] == "x1"
        await assert_alive(c)


async def test_type_not_a_string(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send({"type": 7, "id": "x2"})
        err = error_of(await c.recv(), "bad_message")
        assert err["field"] == "type" and err["ref"] == "x2"
        await assert_alive(c)


async def test_unknown_type(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send({"type": "dance", "id": "x3"})
        err = error_of(await c.recv(), "unknown_type")
        assert err["ref"] == "x3"
        assert "dance" in err["message"] and "generate" in err["message"]
        await assert_alive(c)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (generate([{"role": "user", "content": 1}]), "messages.0.content"),
        (generate([{"role": "robot", "content": "x"}]), "messages.0.role"),
        ({"type": "generate", "messages": "hi"}, "messages"),
        ({"type": "generate", "messages": []}, "messages"),
        ({"type": "generate"}, "messages"),
        (generate(max_tokens="5"), "params.max_tokens"),
        (generate(tokens_per_s=-1), "params.tokens_per_s"),
        ({**generate(), "stream": "bad id!"}, "stream"),
        ({"type": "cancel"}, "stream"),
        ({"type": "cancel", "stream": 3}, "stream"),
        ({"type": "ping", "id": 5}, "id"),
        ({"type": "ping", "id": "x" * 65}, "id"),
        ({"type": "ack", "seq": -1}, "seq"),
    ],
)
async def test_wrong_field_types(raw_client: Any, message: dict[str, Any], field: str) -> None:
    async with raw_client(hello=True) as c:
        await c.send(message)
        err = error_of(await c.recv(), "bad_message")
        assert err["field"] == field, err
        assert f"'{field}'" in err["message"]
        assert err["seq"] == 1
        assert await frames_for(c, 0.05) == []  # no stream started
        await assert_alive(c)


async def test_bad_message_carries_ref(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send({"type": "generate", "id": "myref", "messages": [{"role": "user"}]})
        err = error_of(await c.recv(), "bad_message")
        assert err["ref"] == "myref"
        assert err["field"] == "messages.0.content"


@pytest.mark.parametrize("extra", ["NaN", "Infinity", "1e400"])
async def test_bad_message_with_non_finite_number(raw_client: Any, extra: str) -> None:
    # Valid for the decoder's JSON parser but not for orjson, which the error
    # path re-parses with: the answer must still be an error frame.
    async with raw_client(hello=True) as c:
        await c.send('{"type": "generate", "id": "n", "messages": [], "x": %s}' % extra)
        err = error_of(await c.recv(), "bad_message")
        assert err["field"] == "messages"
        await assert_alive(c)


async def test_generate_before_hello(raw_client: Any) -> None:
    async with raw_client() as c:
        await c.send(generate(id="early"))
        frames = await wait_closed(c)
        assert len(frames) == 1
        err = error_of(frames[0], "not_hello")
        assert err["ref"] == "early"
        assert "seq" not in err
        assert c.ws.close_code == 4400


async def test_ping_before_hello(raw_client: Any) -> None:
    async with raw_client() as c:
        await c.send({"type": "ping"})
        frames = await wait_closed(c)
        assert [f["code"] for f in frames] == ["not_hello"]
        assert c.ws.close_code == 4400


async def test_second_hello(raw_client: Any) -> None:
    async with raw_client() as c:
        welcome = await c.hello()
        await c.send({"type": "hello", "protocol": 1, "id": "h2"})
        err = error_of(await c.recv(), "duplicate_hello")
        assert err["ref"] == "h2"
        assert err["seq"] == 1
        await assert_alive(c)
        await c.send(generate(id="g", reply_tokens=3))
        frames = await c.recv_until(lambda f: f["type"] == "stream.end")
        assert frames[0]["seq"] == 2
        assert frames[-1]["reason"] == "complete"
    assert welcome["session"]


async def test_binary_frame(raw_client: Any) -> None:
    async with raw_client(hello=True) as c:
        await c.send(b'{"type": "ping"}')
        err = error_of(await c.recv(), "binary_frame")
        assert err["seq"] == 1
        await assert_alive(c)


async def test_binary_frame_before_hello(raw_client: Any) -> None:
    async with raw_client() as c:
        await c.send(b"\x00\x01")
        err = error_of(await c.recv(), "binary_frame")
        assert "seq" not in err
        await c.hello()
        await assert_alive(c)


async def test_frame_over_max_size(make_server: Any) -> None:
    async with make_server(max_size=1024) as srv:
        async with open_raw(srv) as c:
            await c.send('{"type": "ping", "pad": "' + "x" * 2048 + '"}')
            frames = await wait_closed(c)
            assert frames == []
            assert c.ws.close_code == 1009
        # a message just under the limit is fine
        async with open_raw(srv) as c:
            await c.send('{"type": "ping", "id": "p", "pad": "' + "x" * 900 + '"}')
            assert await c.recv() == {"type": "pong", "ref": "p"}
        await assert_server_serves(srv)


async def test_unsupported_protocol(raw_client: Any) -> None:
    async with raw_client() as c:
        await c.send({"type": "hello", "protocol": 2, "id": "h"})
        frames = await wait_closed(c)
        assert len(frames) == 1
        err = error_of(frames[0], "unsupported_protocol")
        assert err["supported"] == [1]
        assert err["ref"] == "h"
        assert c.ws.close_code == 4001


async def test_hello_protocol_not_an_int(raw_client: Any) -> None:
    async with raw_client() as c:
        await c.send({"type": "hello", "protocol": "1"})
        err = error_of(await c.recv(), "bad_message")
        assert err["field"] == "protocol"
        await c.hello()


async def test_hello_timeout(make_server: Any) -> None:
    async with make_server(hello_timeout=0.3) as srv:
        async with open_raw(srv, hello=False) as c:
            t0 = time.monotonic()
            frames = await wait_closed(c, timeout=5)
            elapsed = time.monotonic() - t0
        assert frames == []
        assert c.ws.close_code == 4008
        assert 0.2 < elapsed < 3.0
        # a client that says hello in time is not affected
        async with open_raw(srv) as c:
            await asyncio.sleep(0.5)
            await assert_alive(c)


# ------------------------------------------------------------------- abuse


MALFORMED: list[str | dict[str, Any]] = [
    "{",
    "[]",
    '"x"',
    {"no": "type"},
    {"type": "dance"},
    {"type": 1},
    {"type": "generate", "messages": []},
    {"type": "generate", "messages": [{"role": "user", "content": 5}]},
    {"type": "cancel", "stream": "ghost"},
    {"type": "hello", "protocol": 1},
    {"type": "ack", "seq": 10**9},
]


@pytest.mark.both_loops
async def test_malformed_flood_does_not_disturb_others(server: Server) -> None:
    msgs = [{"role": "user", "content": "tell me a long story"}]
    async with open_raw(server) as victim, open_raw(server) as abuser:

        async def flood() -> int:
            sent = 0
            with contextlib.suppress(ConnectionClosed):
                for i in range(1000):
                    await abuser.send(MALFORMED[i % len(MALFORMED)])
                    sent += 1
            return sent

        async def drain() -> int:
            errors = 0
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                async with asyncio.timeout(10):
                    while errors < 1000:
                        frame = orjson.loads(await abuser.ws.recv())
                        errors += frame["type"] == "error"
            return errors

        drainer = asyncio.ensure_future(drain())
        flooder = asyncio.ensure_future(flood())
        try:
            await asyncio.sleep(0)  # let the flood begin
            await victim.send(generate(msgs, id="story", stream="story", reply_tokens=2000))
            frames = await victim.recv_until(lambda f: f["type"] == "stream.end", timeout=15)
            sent = await asyncio.wait_for(flooder, 10)
            errors = await asyncio.wait_for(drainer, 15)
        finally:
            flooder.cancel()
            drainer.cancel()

    # past the abuse threshold (100 refused messages in 10 s) the abuser is closed
    assert sent >= 100 and errors >= 99
    assert abuser.ws.close_code == 1008
    assert_seq_contiguous(frames)
    text, end = check_stream(frames, "story")
    assert end["reason"] == "complete"
    assert end["usage"]["output_tokens"] == 2000
    assert text == reply_text(msgs, 2000)
    await assert_server_serves(server)


async def test_malformed_flood_concurrent_with_stream(server: Server) -> None:
    """Same, with the flood running while the other stream is in flight."""
    msgs = [{"role": "user", "content": "another story"}]
    async with open_raw(server) as victim, open_raw(server) as abuser:
        await victim.send(generate(msgs, id="s", stream="s", tokens_per_s=2000, reply_tokens=1000))
        await victim.recv_until(lambda f: f["type"] == "stream.start")

        async def flood() -> None:
            with contextlib.suppress(ConnectionClosed):
                for i in range(1000):
                    await abuser.send(MALFORMED[i % len(MALFORMED)])

        async def drain() -> None:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                async with asyncio.timeout(10):
                    while True:
                        await abuser.ws.recv()

        drainer = asyncio.ensure_future(drain())
        flooder = asyncio.ensure_future(flood())
        try:
            frames = await victim.recv_until(lambda f: f["type"] == "stream.end", timeout=15)
            await asyncio.wait_for(flooder, 10)
        finally:
            drainer.cancel()
            flooder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
    assert_seq_contiguous(frames, first=2)
    text, end = check_stream([{"type": "stream.start", "stream": "s", "seq": 1, "ref": "s", "provider": "simulated", "model": "sim-1"}, *frames], "s")
    assert end["reason"] == "complete"
    assert text == reply_text(msgs, 1000)
    await assert_server_serves(server)


# -------------------------------------------------------------- plain HTTP


def _http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_http_healthz(server: Server) -> None:
    status, _, body = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{server.port}/healthz")
    assert status == 200
    assert body.strip() == b"OK"


async def test_http_index_page(server: Server) -> None:
    status, headers, body = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{server.port}/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"wsserver" in body
    assert int(headers["Content-Length"]) == len(body)


async def test_http_not_found(server: Server) -> None:
    status, _, _ = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{server.port}/nope")
    assert status == 404


async def test_websocket_on_ws_path(server: Server) -> None:
    async with open_raw(server, path="/ws") as c:
        await assert_alive(c)
    async with open_raw(server, path="/?token=x") as c:
        await assert_alive(c)


async def test_websocket_on_other_path_refused(server: Server) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with asyncio.timeout(5):
            await connect(f"ws://127.0.0.1:{server.port}/other", compression=None)
    assert info.value.response.status_code == 404
    await assert_server_serves(server)


# ------------------------------------------------------------ dropped peer


async def test_client_dropping_tcp_mid_stream(server: Server) -> None:
    async with open_raw(server) as c:
        await c.send(generate(id="g", reply_tokens=100_000))
        await c.recv_until(lambda f: f["type"] == "stream.delta")
        assert len(server.connections) == 1
        c.ws.transport.abort()  # no closing handshake
    async with asyncio.timeout(1.0):
        while server.connections:
            await asyncio.sleep(0.01)
    await assert_server_serves(server)
    async with asyncio.timeout(1.0):
        while server.connections:
            await asyncio.sleep(0.01)


async def test_client_closing_mid_stream_detaches_and_expiry_stops(make_server: Any) -> None:
    async with make_server(session_ttl=0.3) as server:
        async with open_raw(server) as c:
            await c.send(generate(id="g", tokens_per_s=500, reply_tokens=10_000))
            await c.recv_until(lambda f: f["type"] == "stream.delta")
        # a closed socket cancels nothing: the session and its stream go on ...
        async with asyncio.timeout(1.0):
            while server.connections:
                await asyncio.sleep(0.01)
        (live,) = server.sessions.values()
        assert live.conn is None and len(live.tasks) == 1
        # ... until session_ttl passes with nothing attached
        async with asyncio.timeout(2.0):
            while server.sessions or any(
                t.get_name().startswith("stream:") for t in asyncio.all_tasks()
            ):
                await asyncio.sleep(0.01)
        await assert_server_serves(server)


async def test_static_files_and_no_traversal(server: Server) -> None:
    status, headers, body = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{server.port}/client/index.js")
    assert status == 200 and "javascript" in headers.get("Content-Type", "")
    for bad in ("/client/../../pyproject.toml", "/static/../server.py", "/client/.hidden.js", "/static/nope.js"):
        status, _, _ = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{server.port}{bad}")
        assert status == 404, bad


async def test_a_stalled_reader_closed_as_slow_consumer_is_aborted_after_close_timeout(make_server: Any) -> None:
    # Regression: ws.close() waits for the write buffer to drain before its
    # close_timeout starts, so a peer that had stopped reading kept its
    # connection (and every frame queued for it) forever.
    import socket

    # (one stream's answer unbounded: within max_stream_bytes all of it fits in the kernel's socket buffers)
    async with make_server(slow_consumer_bytes=256 * 1024, close_timeout=1.0, max_stream_bytes=1 << 30) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: stalls fast
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        async with connect(server.url, compression=None, max_queue=1, sock=sock) as ws:
            await ws.send('{"type":"hello","protocol":1}')
            await ws.recv()
            await ws.send('{"type":"generate","stream":"a","messages":[{"role":"user","content":"x"}],"params":{"reply_tokens":1000000}}')
            async with asyncio.timeout(30):  # then read nothing
                while server.stats["slow_consumer_disconnects"] == 0:
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(10):  # close_timeout is 1 s
                while server.connections:
                    await asyncio.sleep(0.05)
            ws.transport.abort()
        assert len(server.sessions) == 1  # detached, resumable
