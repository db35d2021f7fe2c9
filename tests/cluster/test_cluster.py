"""Several nodes on one Redis backplane, in one process: channels, presence,
direct messages, agent names, and sessions resumed on another node
(tunnelled to the node that runs them). Each test starts its own
redis-server on 127.0.0.1 (see the ``redis_server`` fixture)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import TEST_CONFIG, USER_HI, RawClient
from wsserver.config import ServerConfig
from wsserver.server import Server


@asynccontextmanager
async def nodes(redis_url: str | list[str], count: int = 2, **overrides: Any) -> AsyncIterator[list[Server]]:
    """``count`` nodes on one Redis (or node i on ``redis_url[i]``, e.g. through a proxy)."""
    urls = [redis_url] * count if isinstance(redis_url, str) else redis_url
    async with AsyncExitStack() as stack:
        servers = []
        for i in range(count):
            config = ServerConfig(**{**TEST_CONFIG, "redis_url": urls[i], "node_id": f"node{i}", **overrides})
            servers.append(await stack.enter_async_context(Server(config)))
        yield servers


@asynccontextmanager
async def client(server: Server, **hello: Any) -> AsyncIterator[tuple[RawClient, dict[str, Any]]]:
    # (close_timeout: a test client that stopped reading need not wait 10 s to close)
    async with connect(server.url, compression=None, close_timeout=0.5) as ws:
        c = RawClient(ws)
        yield c, await c.hello(**hello)


def of_type(kind: str, **fields: Any) -> Any:
    return lambda f: f["type"] == kind and all(f.get(k) == v for k, v in fields.items())


async def test_publish_on_one_node_reaches_subscribers_on_every_node(redis_server: Any) -> None:
    async with nodes(redis_server.url) as (a, b):
        async with client(a, agent="alice") as (alice, _), client(b, agent="bob") as (bob, _):
            await alice.send({"type": "subscribe", "id": "s", "channel": "team"})
            sub_a = (await alice.recv_until(of_type("subscribed")))[-1]
            await bob.send({"type": "subscribe", "id": "s", "channel": "team"})
            sub_b = (await bob.recv_until(of_type("subscribed")))[-1]
            assert sub_b["epoch"] == sub_a["epoch"]  # one channel, numbered by Redis
            assert sub_b["members"] == ["alice", "bob"]
            # alice sees bob join, from the other node
            joined = (await alice.recv_until(of_type("presence", joined="bob")))[-1]
            assert joined["offset"] == sub_b["offset"] + 1
            await bob.send({"type": "publish", "id": "p", "channel": "team", "data": {"n": 1}})
            frames = await bob.recv_until(of_type("message", channel="team"))
            ok = next(f for f in frames if f["type"] == "ok")
            assert frames.index(ok) < len(frames) - 1  # the ok comes before bob's own copy
            assert frames[-1]["offset"] == ok["offset"]
            got = (await alice.recv_until(of_type("message", channel="team")))[-1]
            assert got == {**frames[-1]} and got["from"] == "bob" and got["data"] == {"n": 1}


async def test_offsets_are_global_and_history_recovers_on_any_node(redis_server: Any) -> None:
    async with nodes(redis_server.url) as (a, b):
        async with client(a) as (pub_a, _), client(b) as (pub_b, _):
            offsets = []
            for i in range(6):
                pub = pub_a if i % 2 else pub_b
                await pub.send({"type": "publish", "id": f"p{i}", "channel": "log", "data": i})
                offsets.append((await pub.recv_until(of_type("ok")))[-1]["offset"])
            assert offsets == list(range(offsets[0], offsets[0] + 6))
        async with client(b) as (late, _):
            await late.send({"type": "subscribe", "id": "s", "channel": "log", "since": offsets[1]})
            frames = await late.recv_until(lambda f: f.get("offset") == offsets[-1] and f["type"] == "message")
            sub = frames[0]
            assert sub["type"] == "subscribed" and sub["recovered"] is True
            assert [f["data"] for f in frames[1:]] == [2, 3, 4, 5]


async def test_direct_message_and_agent_names_across_nodes(redis_server: Any) -> None:
    async with nodes(redis_server.url) as (a, b):
        async with client(a, agent="worker") as (worker, _):
            # the name is taken on the other node too
            async with connect(b.url, compression=None) as ws:
                dup = RawClient(ws)
                await dup.send({"type": "hello", "protocol": 1, "agent": "worker"})
                assert (await dup.recv())["code"] == "agent_name_taken"
            async with client(b, agent="boss") as (boss, _):
                await boss.send({"type": "send", "id": "m1", "to": "worker", "data": {"task": 7}})
                assert (await boss.recv_until(of_type("ok", ref="m1")))[-1]["ref"] == "m1"
                dm = (await worker.recv_until(of_type("message")))[-1]
                assert dm["from"] == "boss" and dm["data"] == {"task": 7} and "seq" in dm
                await boss.send({"type": "send", "id": "m2", "to": "nobody", "data": 1})
                assert (await boss.recv_until(of_type("error")))[-1]["code"] == "unknown_agent"


async def test_resume_on_another_node_and_cancel_there(redis_server: Any) -> None:
    """The session runs on node A; its client comes back through node B and cancels."""
    async with nodes(redis_server.url, sim_tokens_per_s=200.0) as (a, b):
        async with client(a) as (first, welcome):
            await first.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 2000}})
            frames = await first.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= 3)
            stream, last_seq = frames[0]["stream"], frames[-1]["seq"]
        async with client(b, session=welcome["session"], last_seq=last_seq) as (second, resumed):
            assert resumed["resumed"] is True
            frames = await second.recv_until(of_type("stream.delta"))
            assert frames[0]["seq"] == last_seq + 1  # nothing lost, nothing doubled
            await second.send({"type": "cancel", "id": "c", "stream": stream})
            frames = await second.recv_until(of_type("stream.end"))
            assert frames[-1]["reason"] == "cancelled"
            seqs = [f["seq"] for f in frames if "seq" in f]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert (await second.recv_until(of_type("ok", ref="c")))[-1]["seq"] == seqs[-1] + 1
            # served by node A through a tunnel: B holds no session
            assert len(a.tunnels) == 1 and welcome["session"] not in b.sessions
        # the stream really stopped on node A
        live = a.sessions[welcome["session"]]
        assert not live.session.streams and not live.tasks


async def test_takeover_across_nodes_closes_the_old_connection_4000(redis_server: Any) -> None:
    async with nodes(redis_server.url) as (a, b):
        async with client(a) as (first, welcome):
            async with client(b, session=welcome["session"], last_seq=0) as (_second, resumed):
                assert resumed["resumed"] is True
                with pytest.raises(ConnectionClosed) as closed:
                    await first.recv(timeout=5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000


async def test_presence_across_three_nodes(redis_server: Any) -> None:
    async with nodes(redis_server.url, count=3) as (a, b, c):
        async with client(a, agent="a1") as (x, _), client(b, agent="b1") as (y, _):
            for cl in (x, y):
                await cl.send({"type": "subscribe", "id": "s", "channel": "room"})
                await cl.recv_until(of_type("subscribed"))
            await x.recv_until(of_type("presence", joined="b1"))
            async with client(c, agent="c1") as (z, _):
                await z.send({"type": "subscribe", "id": "s", "channel": "room"})
                sub = (await z.recv_until(of_type("subscribed")))[-1]
                assert sub["members"] == ["a1", "b1", "c1"]
                for cl in (x, y):
                    await cl.recv_until(of_type("presence", joined="c1"))
                await z.send({"type": "unsubscribe", "id": "u", "channel": "room"})
                await z.recv_until(of_type("ok", ref="u"))
                left = [(await cl.recv_until(of_type("presence", left="c1")))[-1] for cl in (x, y)]
                assert left[0] == left[1]  # the same event, the same offset, on both nodes


async def test_a_resume_through_a_tunnel_with_snapshot(redis_server: Any) -> None:
    async with nodes(redis_server.url, sim_tokens_per_s=200.0) as (a, b):
        async with client(a) as (first, welcome):
            await first.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 2000}})
            await first.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= 3)
        async with client(b, session=welcome["session"], last_seq=0, snapshot=True) as (page, resumed):
            assert resumed["resumed"] is True
            snap = (await page.recv_until(of_type("stream.snapshot")))[-1]
            assert snap["text"] and snap["index"] >= 4
            nxt = (await page.recv_until(of_type("stream.delta")))[-1]
            assert nxt["index"] == snap["index"]


async def test_credentials_hold_through_a_tunnel(redis_server: Any) -> None:
    async with nodes(redis_server.url, api_keys=("k1",)) as (a, b):
        headers = {"Authorization": "Bearer k1"}
        async with connect(a.url, compression=None, additional_headers=headers) as ws:
            first = RawClient(ws)
            welcome = await first.hello()
        # no credential at B's handshake, none in hello: refused by the owner
        async with connect(b.url, compression=None) as ws:
            c = RawClient(ws)
            await c.send({"type": "hello", "protocol": 1, "session": welcome["session"], "last_seq": 0})
            assert (await c.recv())["code"] == "unauthorized"
        async with connect(b.url, compression=None) as ws:
            c = RawClient(ws)
            resumed = await c.hello(session=welcome["session"], last_seq=0, token="k1")
            assert resumed["resumed"] is True


async def test_a_stream_published_into_a_channel_is_watched_from_another_node(redis_server: Any) -> None:
    async with nodes(redis_server.url) as (a, b):
        async with client(b) as (watcher, _), client(a, agent="planner") as (planner, _):
            await watcher.send({"type": "subscribe", "id": "s", "channel": "thoughts"})
            await watcher.recv_until(of_type("subscribed"))
            await planner.send(
                {"type": "generate", "id": "g", "channel": "thoughts", "messages": USER_HI, "params": {"reply_tokens": 30}}
            )
            await planner.recv_until(of_type("stream.end"))
            frames = await watcher.recv_until(lambda f: f.get("data", {}).get("type") == "stream.end")
            data = [f["data"] for f in frames if f["type"] == "message"]
            assert data[0]["type"] == "stream.start" and data[-1]["type"] == "stream.end"
            deltas = [d for d in data if d["type"] == "stream.delta"]
            assert [d["index"] for d in deltas] == list(range(len(deltas))) and len(deltas) == 30
            offsets = [f["offset"] for f in frames if f["type"] == "message"]
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


async def test_an_expired_session_frees_its_agent_name_on_every_node(redis_server: Any) -> None:
    async with nodes(redis_server.url, session_ttl=0.2) as (a, b):
        async with client(a, agent="solo"):
            pass
        for _ in range(50):  # expires 0.2 s after the drop; the release is written right after
            await asyncio.sleep(0.05)
            async with connect(b.url, compression=None) as ws:
                c = RawClient(ws)
                await c.send({"type": "hello", "protocol": 1, "agent": "solo"})
                if (await c.recv())["type"] == "welcome":
                    return
        raise AssertionError("the agent name was never released")


async def test_metrics_and_readyz_show_the_backplane(redis_server: Any) -> None:
    import urllib.request

    async with nodes(redis_server.url, count=1) as (a,):
        def get(path: str) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{a.port}{path}", timeout=5) as resp:  # noqa: S310
                return resp.read().decode()

        assert await asyncio.to_thread(get, "/readyz") == "ready\n"
        metrics = await asyncio.to_thread(get, "/metrics")
        assert "wsserver_backplane_up 1.0" in metrics and "wsserver_backplane_tunnels 0.0" in metrics
        redis_server.stop()
        for _ in range(100):
            if (await asyncio.to_thread(get, "/readyz")).startswith("degraded"):
                break
            await asyncio.sleep(0.05)
        assert (await asyncio.to_thread(get, "/readyz")).startswith("degraded")
        assert "wsserver_backplane_up 0.0" in await asyncio.to_thread(get, "/metrics")
        redis_server.start()
        for _ in range(200):
            if await asyncio.to_thread(get, "/readyz") == "ready\n":
                break
            await asyncio.sleep(0.05)
        assert "wsserver_backplane_outages 1.0" in await asyncio.to_thread(get, "/metrics")


async def test_a_relayed_client_that_stops_reading_is_closed_as_a_slow_consumer(redis_server: Any) -> None:
    # (max_stream_bytes: an answer that outgrows the kernel's socket buffers)
    slow = {"slow_consumer_bytes": 64 * 1024, "close_timeout": 0.5, "max_stream_bytes": 1 << 30}
    async with nodes(redis_server.url, **slow) as (a, b):
        async with client(a) as (_, welcome):
            pass
        async with connect(b.url, compression=None, max_queue=1, close_timeout=0.5) as ws:
            c = RawClient(ws)
            await c.hello(session=welcome["session"], last_seq=0)
            await c.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 1_000_000}})
            for _ in range(200):  # the client reads nothing more; node B must give up on it
                if b.stats["slow_consumer_disconnects"]:
                    break
                await asyncio.sleep(0.05)
            assert b.stats["slow_consumer_disconnects"] == 1
        for _ in range(100):  # and the session on A is detached again, its stream going on
            if a.sessions[welcome["session"]].conn is None:
                break
            await asyncio.sleep(0.05)
        assert a.sessions[welcome["session"]].conn is None


async def test_bad_input_through_a_tunnel_gets_the_same_errors(redis_server: Any) -> None:
    async with nodes(redis_server.url) as (a, b):
        async with client(a) as (_, welcome):
            pass
        async with client(b, session=welcome["session"], last_seq=0) as (c, resumed):
            assert resumed["resumed"] is True and len(a.tunnels) == 1
            await c.ws.send(b"\x00\x01")
            assert (await c.recv_until(of_type("error")))[-1]["code"] == "binary_frame"
            await c.send("{not json")
            assert (await c.recv_until(of_type("error")))[-1]["code"] == "bad_json"
            await c.send({"type": "explode", "id": "x"})
            assert (await c.recv_until(of_type("error")))[-1]["code"] == "unknown_type"
            await c.send({"type": "ping", "id": "p"})
            assert (await c.recv_until(of_type("pong")))[-1]["ref"] == "p"  # the connection goes on
