"""Finished sessions parked as bytes (server/sessions.py, core/dormant.py): what
the garbage collector sees of them, and that a client sees no difference."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection

from tests.helpers import RawClient, until
from wsserver.server import Server

HI = [{"role": "user", "content": "benchmark"}]


async def one_user(server: Server, **generate: Any) -> tuple[str, list[dict[str, Any]]]:
    """Connect, take one reply of 100 tokens, disconnect (the service bench's user)."""
    async with connect(server.url, compression=None) as ws:
        c = RawClient(ws)
        welcome = await c.hello()
        await c.send({"type": "generate", "messages": HI, "params": {"reply_tokens": 100}, **generate})
        frames = await c.recv_until(lambda f: f["type"] == "stream.end")
    return welcome["session"], frames


def no_connection_objects() -> bool:
    """websockets has let go of every server-side connection (its handler tasks finished)."""
    # (issubclass of the type: isinstance on a dead weak proxy raises, on a lazy one imports)
    return not any(issubclass(type(o), ServerConnection) for o in gc.get_objects())


def tracked() -> Counter[str]:
    """GC-tracked objects by type; cancelled timers (and the contexts handles
    carry) wait in asyncio's heap until it is cleaned: the loop's, not a session's.
    (By type, never isinstance: a lazy proxy of the SDKs would import numpy.)"""
    gc.collect()
    counts: Counter[str] = Counter()
    for o in gc.get_objects():
        name = type(o).__name__
        if name == "Context" or (type(o) is asyncio.TimerHandle and o.cancelled()):
            continue
        counts[name] += 1
    return counts


async def test_a_retained_session_leaves_no_tracked_objects(server: Server) -> None:
    """Before parking, each retained session was ~25 GC-tracked containers
    (session, outbox, book, membership, stream and its request models, sets,
    dicts, runtime, timer) plus a reference per frame and per token."""
    def settled(count: int) -> bool:  # all retained, none attached, no stream running
        attached, detached, streams = server.sessions.counts()[:3]
        return (attached, detached, streams) == (0, count, 0)

    for _ in range(5):  # first-call paths, caches
        await one_user(server)
    await until(lambda: settled(5) and no_connection_objects(), timeout=20)
    before = tracked()
    n = 100
    for _ in range(n):
        await one_user(server)
    await until(lambda: settled(5 + n) and no_connection_objects(), timeout=20)
    assert len(server.sessions) == 5 + n
    grown = tracked() - before
    per_session = sum(grown.values()) / n
    assert per_session < 1.0, f"{per_session:.2f} tracked objects per retained session: {grown.most_common(8)}"


async def test_a_parked_session_resumes_exactly(server: Server) -> None:
    sid, frames = await one_user(server, id="g1", stream="a")
    await until(lambda: server.sessions.parked == 1)
    assert sid in server.sessions and server.sessions.active(sid) is None
    async with connect(server.url, compression=None) as ws:
        c = RawClient(ws)
        welcome = await c.hello(session=sid, last_seq=0)
        assert welcome["resumed"] is True and server.sessions.parked == 0
        replay = await c.recv_until(lambda f: f["type"] == "stream.end")
        assert replay == frames  # byte for byte the same frames, same seqs
        await c.send({"type": "generate", "id": "g1", "messages": HI})  # answered before it was parked
        await c.send({"type": "generate", "id": "g2", "stream": "a", "messages": HI})  # a used stream id
        await c.send({"type": "interrupt", "id": "i", "stream": "a", "input": "more", "new_stream": "b"})
        dup, exists, steered = await c.recv(), await c.recv(), await c.recv()
        assert (dup["code"], dup["stream"]) == ("duplicate_request", "a")
        assert exists["code"] == "stream_exists"
        assert (steered["type"], steered["steered_from"], steered["seq"]) == ("stream.start", "a", frames[-1]["seq"] + 3)


async def test_a_stream_that_ends_while_detached_is_parked_after_its_end(server: Server) -> None:
    async with connect(server.url, compression=None) as ws:
        c = RawClient(ws)
        welcome = await c.hello()
        await c.send({"type": "generate", "messages": HI, "params": {"reply_tokens": 40, "tokens_per_s": 200}})
        await c.recv_until(lambda f: f["type"] == "stream.delta")
        ws.transport.abort()
    sid = welcome["session"]
    assert server.sessions.active(sid) is not None  # its stream still runs
    await until(lambda: server.sessions.parked == 1, timeout=10)
    async with connect(server.url, compression=None) as ws:
        c = RawClient(ws)
        await c.hello(session=sid, last_seq=0)
        replay = await c.recv_until(lambda f: f["type"] == "stream.end")
    assert replay[-1]["reason"] == "complete" and replay[-1]["usage"]["output_tokens"] == 40
    assert [f["seq"] for f in replay] == list(range(1, len(replay) + 1))


async def test_parked_sessions_expire_and_are_counted(make_server: Any) -> None:
    async with make_server(session_ttl=0.5) as server:
        sid, _ = await one_user(server)
        await until(lambda: server.sessions.parked == 1)
        attached, detached, streams, parked, held = server.sessions.counts()
        assert (attached, detached, streams, parked) == (0, 1, 0, 1) and held > 500  # the log, compressed
        await until(lambda: not server.sessions, timeout=5)
        assert sid not in server.sessions and server.sessions.parked == 0 and server.sessions.parked_bytes == 0
        async with connect(server.url, compression=None) as ws:  # too late: a fresh session
            welcome = await RawClient(ws).hello(session=sid, last_seq=0)
        assert welcome["resumed"] is False


async def test_looking_a_parked_session_up_wakes_it_and_it_parks_again(server: Server) -> None:
    sid, frames = await one_user(server)
    await until(lambda: server.sessions.parked == 1)
    live = server.sessions[sid]  # woken: detached, with its log
    assert live.conn is None and live.session.log[-1][0] == frames[-1]["seq"]
    await until(lambda: server.sessions.parked == 1)
    await asyncio.sleep(0)
    assert server.sessions.active(sid) is None


async def test_a_session_is_not_parked_while_a_backplane_call_of_its_own_is_under_way(server: Server) -> None:
    """The answer goes to the session object the call holds: a session parked
    meanwhile would lose it (a shared backplane answers after a round trip)."""
    from wsserver.core.actions import MessagingCall
    from wsserver.server.runtime import carry_out
    from wsserver.wire.messages import Send

    sid, _ = await one_user(server)
    live = server.sessions[sid]  # woken; detached, idle
    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    server.backplane.call = lambda session, call: answer  # type: ignore[method-assign]

    class Conn:  # what carry_out uses of a connection
        proto = type("P", (), {"session": live.session})()
        server = None

    conn = Conn()
    conn.server, conn.live = server, live  # type: ignore[attr-defined]
    msg = Send(type="send", id="s1", to="bob", data=1)
    call = asyncio.ensure_future(carry_out(conn, [MessagingCall("send", msg, b"1")]))  # type: ignore[arg-type]
    for _ in range(10):  # loop turns: a park would have happened (it is a call_soon away)
        await asyncio.sleep(0)
    assert server.sessions.active(sid) is live  # not parked: its call is under way
    live.session.members.sent(msg, True)  # the backplane's answer, into this session
    answer.set_result(None)
    await call
    await until(lambda: server.sessions.parked == 1)
    async with connect(server.url, compression=None) as ws:
        c = RawClient(ws)
        await c.hello(session=sid, last_seq=0)
        ok = (await c.recv_until(lambda f: f.get("ref") == "s1"))[-1]
    assert ok["type"] == "ok"


async def test_listing_the_session_ids_leaves_them_parked(server: Server) -> None:
    """A node that missed a heartbeat asks Redis who owns its sessions: that
    needs their ids only, not 12,000 sessions rebuilt from their bytes."""
    sid, _ = await one_user(server)
    await until(lambda: server.sessions.parked == 1)
    assert server.local_session_ids() == [sid]
    assert server.sessions.parked == 1
    assert [s.id for s in server.local_sessions()] == [sid]  # the sessions themselves: woken
    assert server.sessions.parked == 0
