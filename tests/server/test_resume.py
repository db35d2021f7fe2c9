"""Resume, snapshot, takeover, expiry and steering, end to end on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import RawClient, until
from wsserver.wire.messages import ChatMessage
from wsserver.providers import simulated_reply
from wsserver.server import Server


def conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def expected_text(messages: list[dict[str, str]], tokens: int) -> str:
    return "".join(simulated_reply([ChatMessage(**m) for m in messages], tokens))


@asynccontextmanager
async def raw(server: Server) -> AsyncIterator[RawClient]:
    async with connect(server.url, compression=None) as ws:
        yield RawClient(ws)


def drop(client: RawClient) -> None:
    """An abrupt loss: no closing handshake."""
    client.ws.transport.abort()


def stream_text(frames: list[dict[str, Any]], stream: str) -> str:
    text = ""
    for f in frames:
        if f.get("stream") == stream:
            if f["type"] == "stream.snapshot":
                text = f["text"]
            elif f["type"] == "stream.delta":
                text += f["text"]
    return text


def assert_contiguous(frames: list[dict[str, Any]]) -> None:
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


@pytest.mark.parametrize("cut", [0, 1, 2, 5, 17, 60, 150])
async def test_abrupt_drop_at_any_point_then_resume_is_exactly_once(server: Server, cut: int) -> None:
    messages = conversation(f"drop after {cut}")
    async with raw(server) as a:
        welcome = await a.hello()
        await a.send({"type": "generate", "id": "g", "messages": messages, "params": {"reply_tokens": 200, "tokens_per_s": 1000}})
        before = [await a.recv() for _ in range(cut)]
        drop(a)
    last_seq = max((f["seq"] for f in before), default=0)
    async with raw(server) as b:
        again = await b.hello(session=welcome["session"], last_seq=last_seq)
        assert again["resumed"] is True and again["session"] == welcome["session"]
        after = await b.recv_until(lambda f: f["type"] == "stream.end")
    frames = before + after
    assert_contiguous(frames)
    assert frames[0]["type"] == "stream.start" and frames[0]["ref"] == "g"
    assert stream_text(frames, "s1") == expected_text(messages, 200)
    indexes = [f["index"] for f in frames if f["type"] == "stream.delta"]
    assert indexes == list(range(len(indexes)))
    assert frames[-1]["reason"] == "complete"


async def test_resume_while_a_fast_stream_keeps_producing(server: Server) -> None:
    """The replay and the live frames produced meanwhile meet without gap or duplicate."""
    messages = conversation("race")
    for cut in (3, 40, 120):  # frames (deltas may hold several tokens when unpaced)
        async with raw(server) as a:
            welcome = await a.hello()
            await a.send({"type": "generate", "messages": messages, "params": {"reply_tokens": 3000}})
            before = [await a.recv() for _ in range(cut)]
            assert before[-1]["type"] != "stream.end"
            drop(a)
        async with raw(server) as b:
            await b.hello(session=welcome["session"], last_seq=before[-1]["seq"])
            after = await b.recv_until(lambda f: f["type"] == "stream.end")
        frames = before + after
        assert_contiguous(frames)
        assert stream_text(frames, "s1") == expected_text(messages, 3000)


async def test_replies_sent_while_detached_are_replayed(server: Server) -> None:
    async with raw(server) as a:
        welcome = await a.hello()
        await a.send({"type": "generate", "id": "g", "messages": conversation("x"), "params": {"reply_tokens": 5, "ttft_ms": 200}})
        drop(a)  # the stream.start (the reply) may not have arrived
    await asyncio.sleep(0.4)  # the stream ends while nobody is attached
    async with raw(server) as b:
        await b.hello(session=welcome["session"], last_seq=0)
        frames = await b.recv_until(lambda f: f["type"] == "stream.end")
    assert frames[0]["type"] == "stream.start" and frames[0]["ref"] == "g"
    assert_contiguous(frames)


async def test_a_resent_generate_after_resume_is_not_run_twice(server: Server) -> None:
    async with raw(server) as a:
        welcome = await a.hello()
        await a.send({"type": "generate", "id": "g", "messages": conversation("x"), "params": {"reply_tokens": 5}})
        drop(a)
    async with raw(server) as b:
        await b.hello(session=welcome["session"], last_seq=0)
        await b.send({"type": "generate", "id": "g", "messages": conversation("x"), "params": {"reply_tokens": 5}})
        frames = await b.recv_until(lambda f: f["type"] == "error")
    assert frames[-1]["code"] == "duplicate_request" and frames[-1]["stream"] == "s1"
    assert sum(f["type"] == "stream.start" for f in frames) == 1


async def test_resume_after_ack_trimming(server: Server) -> None:
    async with raw(server) as a:
        welcome = await a.hello()
        await a.send({"type": "generate", "messages": conversation("ack"), "params": {"reply_tokens": 50, "tokens_per_s": 500}})
        first = [await a.recv() for _ in range(10)]
        await a.send({"type": "ack", "seq": first[-1]["seq"], "id": "k"})
        await a.recv_until(lambda f: f["type"] == "ok")
        drop(a)
    live = server.sessions[welcome["session"]]
    assert live.session.log[0][0] > first[-1]["seq"]  # acknowledged frames were dropped
    async with raw(server) as b:
        resumed = await b.hello(session=welcome["session"], last_seq=first[-1]["seq"])
        assert resumed["resumed"] is True
        rest = await b.recv_until(lambda f: f["type"] == "stream.end")
    assert rest[0]["seq"] == first[-1]["seq"] + 1
    # going back behind the ack is impossible
    async with raw(server) as c:
        await c.send({"type": "hello", "protocol": 1, "session": welcome["session"], "last_seq": 1})
        err = await c.recv()
        fresh = await c.recv()
    assert err["type"] == "error" and err["code"] == "resume_failed" and "seq" not in err
    assert fresh["type"] == "welcome" and fresh["resumed"] is False
    assert fresh["session"] != welcome["session"]
    assert welcome["session"] not in server.sessions  # the old session was ended


async def test_resume_failed_when_the_log_fell_short(make_server: Any) -> None:
    async with make_server(replay_max_messages=20, coalesce=False) as server:
        async with raw(server) as a:
            welcome = await a.hello()
            await a.send({"type": "generate", "messages": conversation("long"), "params": {"reply_tokens": 100, "tokens_per_s": 2000}})
            await a.recv()
            drop(a)
        live = server.sessions[welcome["session"]]
        await until(lambda: not live.session.streams)  # the whole answer went to the log, past its bound
        async with raw(server) as b:
            await b.send({"type": "hello", "protocol": 1, "session": welcome["session"], "last_seq": 1})
            err, fresh = await b.recv(), await b.recv()
            assert err["code"] == "resume_failed"
            assert (fresh["type"], fresh["resumed"]) == ("welcome", False)
            # the fresh session works
            await b.send({"type": "ping", "id": "p"})
            assert (await b.recv())["type"] == "pong"


async def test_unknown_session_gets_a_fresh_one_without_error(server: Server) -> None:
    async with raw(server) as a:
        await a.send({"type": "hello", "protocol": 1, "session": "no-such-session", "last_seq": 7})
        welcome = await a.recv()
    assert welcome["type"] == "welcome" and welcome["resumed"] is False
    assert welcome["session"] != "no-such-session"


async def test_snapshot_after_a_page_refresh(server: Server) -> None:
    messages = conversation("refresh me")
    async with raw(server) as a:
        welcome = await a.hello()
        await a.send({"type": "generate", "messages": messages, "params": {"reply_tokens": 300, "tokens_per_s": 1000}})
        await a.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= 10)
        drop(a)  # the page is gone, and with it the text
    async with raw(server) as b:
        resumed = await b.hello(session=welcome["session"], last_seq=0, snapshot=True)
        assert resumed["resumed"] is True
        frames = await b.recv_until(lambda f: f["type"] == "stream.end")
    snap = frames[0]
    assert snap["type"] == "stream.snapshot" and snap["stream"] == "s1"
    assert len(snap["text"]) > 0
    deltas = [f for f in frames if f["type"] == "stream.delta"]
    assert [d["index"] for d in deltas] == list(range(snap["index"], snap["index"] + len(deltas)))
    assert stream_text(frames, "s1") == expected_text(messages, 300)
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_snapshot_keeps_cancel_working(server: Server) -> None:
    async with raw(server) as a:
        welcome = await a.hello()
        await a.send({"type": "generate", "messages": conversation("x"), "params": {"reply_tokens": 5000, "tokens_per_s": 500}})
        await a.recv_until(lambda f: f["type"] == "stream.delta")
        drop(a)
    async with raw(server) as b:
        await b.hello(session=welcome["session"], last_seq=0, snapshot=True)
        assert (await b.recv())["type"] == "stream.snapshot"
        await b.send({"type": "cancel", "stream": "s1", "id": "c"})
        frames = await b.recv_until(lambda f: f["type"] == "ok")
    assert [f["reason"] for f in frames if f["type"] == "stream.end"] == ["cancelled"]


async def test_second_hello_takes_the_session_over(server: Server) -> None:
    async with raw(server) as a, raw(server) as b:
        welcome = await a.hello()
        await a.send({"type": "generate", "messages": conversation("x"), "params": {"reply_tokens": 2000, "tokens_per_s": 1000}})
        first = await a.recv_until(lambda f: f["type"] == "stream.delta")
        taken = await b.hello(session=welcome["session"], last_seq=first[-1]["seq"])
        assert taken["resumed"] is True
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await a.ws.recv()
        assert a.ws.close_code == 4000
        # the new connection carries on with the stream
        await b.recv_until(lambda f: f["type"] == "stream.delta")
        assert server.sessions[welcome["session"]].conn is not None


async def test_expiry_cancels_streams_and_frees_memory(make_server: Any) -> None:
    async with make_server(session_ttl=1.5) as server:
        refs = []
        for i in range(30):
            async with raw(server) as a:
                welcome = await a.hello()
                await a.send({"type": "generate", "messages": conversation(f"abandoned {i}"), "params": {"reply_tokens": 100_000, "tokens_per_s": 200}})
                await a.recv_until(lambda f: f["type"] == "stream.delta")
                refs.append(weakref.ref(server.sessions[welcome["session"]].session))
                drop(a)
        assert server.sessions  # (some may have expired already on a loaded machine)
        async with asyncio.timeout(6):
            while server.sessions or any(t.get_name().startswith("stream:") for t in asyncio.all_tasks()):
                await asyncio.sleep(0.02)
        async with asyncio.timeout(3):  # the last task callbacks run on later loop turns
            while any(r() is not None for r in refs):
                gc.collect()
                await asyncio.sleep(0.05)


async def test_dropped_socket_never_cancels(server: Server) -> None:
    messages = conversation("keep going")
    async with raw(server) as a:
        welcome = await a.hello()
        await a.send({"type": "generate", "messages": messages, "params": {"reply_tokens": 100, "tokens_per_s": 1000}})
        await a.recv()
        drop(a)
    live = server.sessions[welcome["session"]]
    await until(lambda: not live.session.streams)  # the whole answer is produced while detached
    assert not live.session.streams
    async with raw(server) as b:
        await b.hello(session=welcome["session"], last_seq=1)
        frames = await b.recv_until(lambda f: f["type"] == "stream.end")
    assert frames[-1]["reason"] == "complete"


class TestSteer:
    async def test_interrupt_with_input_starts_the_steered_stream(self, server: Server) -> None:
        async with raw(server) as c:
            await c.hello()
            await c.send({"type": "generate", "messages": conversation("tell a story"), "params": {"reply_tokens": 200, "tokens_per_s": 300}})
            await c.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= 3)
            await c.send({"type": "interrupt", "id": "i", "stream": "s1", "input": "make it about cats"})
            frames = await c.recv_until(lambda f: f["type"] == "stream.end" and f["stream"] == "s2")
        end1 = next(f for f in frames if f["type"] == "stream.end" and f["stream"] == "s1")
        start2 = next(f for f in frames if f["type"] == "stream.start")
        assert end1["reason"] == "interrupted"
        assert (start2["stream"], start2["steered_from"], start2["ref"]) == ("s2", "s1", "i")
        assert stream_text(frames, "s2").startswith('You said "make it about cats".')
        assert not any(f.get("stream") == "s1" and f["seq"] > end1["seq"] for f in frames)

    async def test_interrupt_racing_the_natural_end(self, server: Server) -> None:
        async with raw(server) as c:
            await c.hello()
            # the steered stream inherits the params: 12 tokens hold the echo
            await c.send({"type": "generate", "messages": conversation("short"), "params": {"reply_tokens": 12}})
            await c.recv_until(lambda f: f["type"] == "stream.end")
            await c.send({"type": "interrupt", "stream": "s1", "input": "and then?", "id": "i"})
            frames = await c.recv_until(lambda f: f["type"] == "stream.end")
        assert frames[0]["type"] == "stream.start" and frames[0]["steered_from"] == "s1"
        assert stream_text(frames, "s2").startswith('You said "and then?".')


async def test_a_long_replay_to_a_reader_that_keeps_reading_is_not_a_slow_consumer(make_server: Any) -> None:
    """A resume's replay is far bigger than slow_consumer_bytes; the client
    reads it at its own pace. The replay is written as the socket takes it,
    so the client gets all of it instead of 1013 (before: written inline at
    once, it sat in the transport's buffer and counted against the client;
    and the one frame bigger than the limit, while the client read it, was
    taken for a slow consumer)."""
    # slow_consumer_bytes stays far below the replay (~4.5 MB) and below its
    # one big frame: stream.end repeats the ~350 KB answer in its message.
    limits = {"slow_consumer_bytes": 64 * 1024, "replay_max_bytes": 16 << 20, "replay_max_messages": 100_000, "coalesce": False}
    async with make_server(**limits) as server:
        messages = conversation("replay")
        async with raw(server) as a:
            welcome = await a.hello()
            await a.send({"type": "generate", "messages": messages, "params": {"reply_tokens": 60_000}})
            await a.recv()
            drop(a)
        live = server.sessions[welcome["session"]]
        await until(lambda: not live.session.streams)  # ~4.5 MB of frames in the log
        sock = socket.socket()  # a small receive window: what the client has not read stays on the server
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        async with connect(server.url, compression=None, max_queue=4, sock=sock) as ws:
            b = RawClient(ws)
            await b.hello(session=welcome["session"], last_seq=1)
            frames: list[dict[str, Any]] = []
            async with asyncio.timeout(60):
                while not frames or frames[-1]["type"] != "stream.end":
                    frames.append(await b.recv())
                    if len(frames) % 5000 == 0:
                        await asyncio.sleep(0.3)  # a reader slower than the 0.25 s monitor
            assert stream_text(frames, frames[-1]["stream"]) == expected_text(messages, 60_000)
            await b.send({"type": "ping", "id": "alive"})  # not closed as a slow consumer
            assert (await b.recv_until(lambda f: f["type"] == "pong"))[-1]["ref"] == "alive"
