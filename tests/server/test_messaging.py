"""Channels, presence, direct messages and slow consumers, end to end on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

import wsserver
from tests.helpers import RawClient
from wsserver.client import Backoff, ChannelMessage, Presence
from wsserver.wire.messages import ChatMessage
from wsserver.providers import simulated_reply
from wsserver.server import Server

FAST = Backoff(base=0.01, cap=0.1, give_up_after=10)


@asynccontextmanager
async def raw(server: Server, **kwargs: Any) -> AsyncIterator[RawClient]:
    # max_queue=None: a test that leaves frames unread must still see the close frame
    async with connect(server.url, compression=None, **{"max_queue": None, **kwargs}) as ws:
        yield RawClient(ws)


async def test_500_subscribers_get_every_publication_in_offset_order(make_server: Any) -> None:
    n_subs, n_msgs = 500, 40
    async with make_server(publish_rate=0, message_rate=0, max_connections_per_ip=0) as server:
        conns: list[ClientConnection] = []
        try:
            for _ in range(n_subs):
                ws = await connect(server.url, compression=None, max_queue=None)
                await ws.send(orjson.dumps({"type": "hello", "protocol": 1}).decode())
                await ws.recv()
                await ws.send(orjson.dumps({"type": "subscribe", "channel": "big", "id": "s"}).decode())
                conns.append(ws)

            async def collect(ws: ClientConnection) -> list[dict[str, Any]]:
                got: list[dict[str, Any]] = []
                async with asyncio.timeout(60):
                    while len([f for f in got if f["type"] == "message"]) < n_msgs:
                        got.append(orjson.loads(await ws.recv()))
                return got

            readers = [asyncio.ensure_future(collect(ws)) for ws in conns]
            async with raw(server) as pub:
                await pub.hello()
                for i in range(n_msgs):
                    await pub.send({"type": "publish", "channel": "big", "data": {"i": i}})
            results = await asyncio.gather(*readers)
        finally:
            await asyncio.gather(*(ws.close() for ws in conns))
    for frames in results:
        traffic = [f for f in frames if f["type"] in ("message", "presence")]
        offsets = [f["offset"] for f in traffic]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        assert [f["data"]["i"] for f in traffic if f["type"] == "message"] == list(range(n_msgs))
        # the channel's offsets after this subscriber joined: no gap
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


async def test_python_client_channel_api_and_presence(server: Server) -> None:
    async with asyncio.timeout(10):
        async with wsserver.connect(server.url, hello={"agent": "planner"}) as planner, \
                wsserver.connect(server.url, hello={"agent": "worker-1"}) as worker:
            sub = await planner.subscribe("team")
            assert sub.members == {"planner"} and sub.epoch
            assert await sub.next(5) == Presence("team", 1, joined="planner")
            wsub = await worker.subscribe("team")
            assert wsub.members == {"planner", "worker-1"}
            assert await sub.next(5) == Presence("team", 2, joined="worker-1")
            offset = await worker.publish("team", {"result": 42})
            assert offset == 3
            msg = await sub.next(5)
            assert msg == ChannelMessage("team", 3, "worker-1", {"result": 42})
            assert (await wsub.next(5)).offset == 2  # its own join, then its own publication
            assert (await wsub.next(5)).offset == 3
            await wsub.unsubscribe()
            assert await sub.next(5) == Presence("team", 4, left="worker-1")
            assert sub.members == {"planner"}


async def test_agent_names(server: Server) -> None:
    async with raw(server) as a, raw(server) as b:
        welcome = await a.hello(agent="solo")
        await b.send({"type": "hello", "protocol": 1, "agent": "solo"})
        err = await b.recv()
        assert err["type"] == "error" and err["code"] == "agent_name_taken" and "seq" not in err
        await b.send({"type": "hello", "protocol": 1, "agent": "bad name"})
        assert (await b.recv())["code"] == "bad_name"
        await b.hello(agent="duo")  # the connection may say hello again
        # resuming the session that holds the name is fine (and takes it over)
        async with raw(server) as c:
            again = await c.hello(session=welcome["session"], last_seq=0, agent="solo")
            assert again["resumed"] is True


async def test_direct_message_to_a_detached_agent_arrives_on_resume(server: Server) -> None:
    async with raw(server) as boss:
        await boss.hello(agent="boss")
        async with raw(server) as w:
            welcome = await w.hello(agent="worker")
            w.ws.transport.abort()
        await asyncio.sleep(0.05)
        await boss.send({"type": "send", "to": "worker", "data": {"task": 7}, "id": "m"})
        assert (await boss.recv()) == {"type": "ok", "seq": 1, "ref": "m"}
        async with raw(server) as w2:
            await w2.hello(session=welcome["session"], last_seq=0)
            msg = await w2.recv()
    assert msg == {"type": "message", "seq": 1, "from": "boss", "data": {"task": 7}}


async def test_python_client_send_and_inbox(server: Server) -> None:
    async with asyncio.timeout(10):
        async with wsserver.connect(server.url, hello={"agent": "a1"}) as a, wsserver.connect(server.url) as b:
            await b.send("a1", ["hello", 1])
            msg = await a.inbox.get()
            assert msg.data == ["hello", 1] and msg.sender.startswith("anon-")
            with pytest.raises(wsserver.client.ServerError) as info:
                await b.send("nobody", 1)
            assert info.value.code == "unknown_agent"


async def test_recovery_by_offset_across_reconnects(server: Server) -> None:
    async with asyncio.timeout(20):
        async with wsserver.connect(server.url, backoff=FAST) as watcher, wsserver.connect(server.url) as pub:
            sub = await watcher.subscribe("feed")
            await sub.next(5)  # own join
            received: list[int] = []

            async def read() -> None:
                async for item in sub:
                    if isinstance(item, ChannelMessage):
                        received.append(item.data)
                        if item.data == 199:
                            return

            reader = asyncio.ensure_future(read())
            for i in range(200):
                await pub.publish("feed", i)
                if i % 50 == 25:  # the watcher's network drops now and then
                    for conn in list(server.connections):
                        if conn.live is not None and conn.live.session.id == watcher.session:
                            conn.ws.transport.abort()
                await asyncio.sleep(0.002)
            await reader
            assert received == list(range(200))
            assert watcher.reconnects >= 3 and sub.recovered is True


async def test_recovered_false_when_history_is_too_short(make_server: Any) -> None:
    async with make_server(channel_history=5) as server, raw(server) as c:
        await c.hello()
        for i in range(20):
            await c.send({"type": "publish", "channel": "busy", "data": i})
        await c.send({"type": "subscribe", "channel": "busy", "since": 2, "id": "s"})
        frames = await c.recv_until(lambda f: f["type"] == "subscribed")
        assert frames[-1]["recovered"] is False and frames[-1]["offset"] == 20
        assert (await c.recv())["type"] == "presence"  # own join; nothing replayed


async def test_recovery_races_a_busy_channel(make_server: Any) -> None:
    """Subscribing with since while the channel is busy: nothing lost, duplicated or reordered."""
    async with make_server(publish_rate=0, message_rate=0, channel_history=100_000) as server, raw(server) as pub, raw(server) as sub:
        await pub.hello()
        await sub.hello()
        stop = asyncio.Event()

        async def publish() -> None:
            i = 0
            while not stop.is_set():
                await pub.send({"type": "publish", "channel": "race", "data": i})
                i += 1
                if i % 20 == 0:
                    await asyncio.sleep(0)

        task = asyncio.ensure_future(publish())
        try:
            await asyncio.sleep(0.05)
            await sub.send({"type": "subscribe", "channel": "race", "since": 0, "id": "s"})
            frames = await sub.recv_until(
                lambda f: f.get("offset", 0) >= 300 and f["type"] == "message", timeout=20
            )
        finally:
            stop.set()
            await task
    assert frames[0]["type"] == "subscribed" and frames[0]["recovered"] is True
    offsets = [f["offset"] for f in frames[1:]]
    assert offsets == list(range(1, len(offsets) + 1))


async def test_stream_published_into_a_channel(server: Server) -> None:
    messages = [{"role": "user", "content": "think out loud"}]
    async with raw(server) as watcher, raw(server) as planner:
        await watcher.hello()
        await planner.hello(agent="planner")
        await watcher.send({"type": "subscribe", "channel": "thoughts", "id": "s"})
        await watcher.recv_until(lambda f: f["type"] == "presence")
        await planner.send({"type": "generate", "channel": "thoughts", "messages": messages, "params": {"reply_tokens": 30}})
        frames = await watcher.recv_until(lambda f: f["type"] == "message" and f["data"]["type"] == "stream.end")
    data = [f["data"] for f in frames]
    assert all(f["from"] == "planner" for f in frames)
    assert data[0]["type"] == "stream.start" and data[0]["stream"] == "s1" and "ref" not in data[0]
    deltas = [d for d in data if d["type"] == "stream.delta"]
    assert [d["index"] for d in deltas] == list(range(len(deltas)))
    assert "".join(d["text"] for d in deltas) == "".join(simulated_reply([ChatMessage(**messages[0])], 30))
    assert data[-1]["reason"] == "complete" and data[-1]["usage"]["output_tokens"] == 30
    offsets = [f["offset"] for f in frames]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


async def test_limits_reach_the_wire(make_server: Any) -> None:
    async with make_server(max_subscriptions=2, max_data_bytes=100, publish_rate=5) as server, raw(server) as c:
        await c.hello()
        for ch in ("a", "b"):
            await c.send({"type": "subscribe", "channel": ch})
        await c.send({"type": "subscribe", "channel": "c", "id": "x"})
        err = (await c.recv_until(lambda f: f["type"] == "error"))[-1]
        assert err["code"] == "too_many_subscriptions" and err["ref"] == "x"
        await c.send({"type": "publish", "channel": "a", "data": "y" * 200, "id": "big"})
        assert (await c.recv_until(lambda f: f["type"] == "error"))[-1]["code"] == "message_too_large"
        codes = []
        for i in range(15):
            await c.send({"type": "publish", "channel": "z", "data": i, "id": f"p{i}"})
        frames = await c.recv_until(lambda f: f.get("ref") == "p14")
        codes = [f.get("code") for f in frames if f.get("ref", "").startswith("p")]
        assert "rate_limited" in codes
        limited = next(f for f in frames if f.get("code") == "rate_limited")
        assert limited["retry_after_ms"] > 0


async def test_one_stalled_reader_does_not_slow_the_others(make_server: Any) -> None:
    """The stalled subscriber is closed (1013, counted); the others' delivery rate holds."""
    n_msgs, payload = 300, "x" * 2000

    async def run(stalled: bool) -> tuple[float, int]:
        async with make_server(publish_rate=0, message_rate=0, slow_consumer_bytes=256 * 1024) as server:
            readers: list[ClientConnection] = []
            for _ in range(99):
                ws = await connect(server.url, compression=None, max_queue=None)
                await ws.send('{"type":"hello","protocol":1}')
                await ws.recv()
                await ws.send('{"type":"subscribe","channel":"fan"}')
                readers.append(ws)
            stall_ws = None
            if stalled:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
                stall_ws = await connect(server.url, sock=sock, compression=None, max_queue=1)
                await stall_ws.send('{"type":"hello","protocol":1}')
                await stall_ws.recv()
                await stall_ws.send('{"type":"subscribe","channel":"fan"}')
                # it never reads again; keep the kernel from absorbing the backlog
                local = sock.getsockname()
                for conn in server.connections:
                    if conn.ws.transport.get_extra_info("peername") == local:
                        server_sock = conn.ws.transport.get_extra_info("socket")
                        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await asyncio.sleep(0.2)

            async def drain(ws: ClientConnection) -> float:
                count = 0
                async with asyncio.timeout(60):
                    while count < n_msgs:
                        frame = orjson.loads(await ws.recv())
                        if frame["type"] == "message":
                            count += 1
                return time.perf_counter()

            tasks = [asyncio.ensure_future(drain(ws)) for ws in readers]
            async with raw(server) as pub:
                await pub.hello()
                t0 = time.perf_counter()
                for i in range(n_msgs):
                    await pub.send({"type": "publish", "channel": "fan", "data": payload})
                    if i % 10 == 0:
                        await asyncio.sleep(0.001)
                ends = await asyncio.gather(*tasks)
            elapsed = max(ends) - t0
            if stalled:
                async with asyncio.timeout(15):  # the monitor runs every 0.25 s; close_timeout aborts
                    while server.stats["slow_consumer_disconnects"] == 0:
                        await asyncio.sleep(0.05)
            disconnects = server.stats["slow_consumer_disconnects"]
            for ws in readers:
                await ws.close()
            if stall_ws is not None:
                stall_ws.transport.abort()
            return elapsed, disconnects

    base, base_disconnects = await run(stalled=False)
    with_stall, disconnects = await run(stalled=True)
    print(f"fan-out to 99 readers: {base:.3f} s alone, {with_stall:.3f} s beside a stalled reader")
    assert base_disconnects == 0 and disconnects == 1
    # generous: the machine is shared and noisy; a blocked fan-out would be 10x+
    assert with_stall < max(3 * base, base + 1.0), (base, with_stall)


async def test_resumed_session_gets_channel_traffic_only_after_resubscribing(server: Server) -> None:
    """Live traffic must not overtake the recovery of what was missed while detached."""
    async with raw(server) as pub:
        await pub.hello()
        async with raw(server) as a:
            welcome = await a.hello()
            await a.send({"type": "subscribe", "channel": "news", "id": "s"})
            frames = await a.recv_until(lambda f: f["type"] == "presence")
            a.ws.transport.abort()
        for i in range(3):
            await pub.send({"type": "publish", "channel": "news", "data": i})
        async with raw(server) as b:
            await b.hello(session=welcome["session"], last_seq=frames[0]["seq"])
            for i in range(3, 5):
                await pub.send({"type": "publish", "channel": "news", "data": i})
            await pub.send({"type": "ping", "id": "barrier"})
            await pub.recv_until(lambda f: f["type"] == "pong")
            with pytest.raises(TimeoutError):
                await b.recv(timeout=0.2)  # nothing channel-borne before the re-subscribe
            await b.send({"type": "subscribe", "channel": "news", "since": frames[-1]["offset"], "epoch": frames[0]["epoch"], "id": "again"})
            got = await b.recv_until(lambda f: f.get("data") == 4)
    assert got[0]["type"] == "subscribed" and got[0]["recovered"] is True
    assert [f["data"] for f in got[1:]] == [0, 1, 2, 3, 4]


async def test_python_client_generate_into_channel(server: Server) -> None:
    async with asyncio.timeout(10):
        async with wsserver.connect(server.url, hello={"agent": "planner"}) as planner, \
                wsserver.connect(server.url) as dashboard:
            watch = await dashboard.subscribe("thoughts")
            await watch.next(5)  # own join
            stream = await planner.generate([{"role": "user", "content": "plan"}], channel="thoughts", params={"reply_tokens": 10})
            result = await stream.wait()
            seen = []
            while not seen or seen[-1]["type"] != "stream.end":
                item = await watch.next(5)
                assert isinstance(item, ChannelMessage) and item.sender == "planner"
                seen.append(item.data)
            assert "".join(d["text"] for d in seen if d["type"] == "stream.delta") == result.text
