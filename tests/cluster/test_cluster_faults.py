"""Faults between nodes and Redis, one node at a time: a node cut off from
Redis (a TCP proxy that can be cut) while Redis and the other nodes live on,
a node that stops without a word, and races between pub/sub and script
replies. Each was a bug found in review; each test failed before its fix."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import USER_HI, RawClient, until
from tests.cluster.test_cluster import client, nodes, of_type


def kill_node(server: Any) -> None:
    """A node that stops without a word, in-process: no more heartbeats, deaf to pub/sub."""
    backplane = server.backplane
    backplane._watcher.cancel()
    backplane.pubsub._listener.cancel()


class Proxy:
    """A TCP proxy to Redis that can be cut (a network partition of one node)."""

    def __init__(self, port):
        self.target = port
        self.up = True
        self.conns = []
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def _handle(self, r, w):
        if not self.up:
            w.close()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return
        self.conns.append((w, uw))

        async def pipe(a, b):
            try:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            except Exception:
                pass
            finally:
                b.close()

        asyncio.ensure_future(pipe(r, uw))
        asyncio.ensure_future(pipe(ur, w))

    def cut(self):
        self.up = False
        for w, uw in self.conns:
            w.transport.abort()
            uw.transport.abort()
        self.conns = []

    def restore(self):
        self.up = True

    async def close(self):
        self.cut()
        self.server.close()


# A session that ends while its node cannot reach Redis (session_ended / leave / release_agent
# are skipped when not healthy) is never cleaned up after the node reconnects: _resync only
# looks at live sessions. Its hash stays, so the claim script keeps refusing its agent name on
# every node, and its presence stays in the channel's member hash (no 'left').
async def test_session_ending_during_a_blip_frees_its_name_and_presence(redis_server):
    proxy = Proxy(redis_server.port)
    await proxy.start()
    try:
        async with nodes([proxy.url, redis_server.url], count=2, session_ttl=0.5, node_timeout=10.0) as (a, b):
            async with client(a, agent="solo") as (solo, _):
                await solo.send({"type": "subscribe", "id": "s", "channel": "room"})
                await solo.recv_until(of_type("subscribed"))
            proxy.cut()  # node a loses Redis for 2 s (Redis itself is fine)
            await until(lambda: not a.backplane.healthy)
            assert not a.backplane.healthy
            await until(lambda: not a.sessions)  # the detached session expires meanwhile
            assert not a.sessions
            proxy.restore()
            await until(lambda: a.backplane.healthy)
            assert a.backplane.healthy
            r = redis_server.client()  # what the outage deferred is written once a is back
            await until(lambda: not r.exists("wss:agent:solo") and not r.hexists("wss:c:room:m", "solo"))
            async with client(b) as (watch, _):
                await watch.send({"type": "subscribe", "id": "s", "channel": "room"})
                members = (await watch.recv_until(of_type("subscribed")))[-1]["members"]
            async with connect(b.url, compression=None) as ws:
                c = RawClient(ws)
                await c.send({"type": "hello", "protocol": 1, "agent": "solo"})
                reply = await c.recv()
            assert reply["type"] == "welcome", reply
            assert "solo" not in members, members
    finally:
        await proxy.close()


# Node a is cut from Redis for longer than node_timeout (Redis itself up, e.g. a partition,
# or a Redis restart with persistence where a reconnects later than b). b adopts a's sessions.
# When a reconnects, _recover -> _resync calls _heartbeat() but ignores its 'dropped' flag, so a
# is never fenced: both nodes run the session, and a writes its degraded-mode frames into the
# log b already continued (XADD errors are swallowed by raise_on_error=False).
async def test_a_node_declared_lost_is_fenced_when_it_reconnects(redis_server):
    proxy = Proxy(redis_server.port)
    await proxy.start()
    try:
        async with nodes([proxy.url, redis_server.url], count=2, node_timeout=1.0, sim_tokens_per_s=50.0) as (a, b):
            async with client(a) as (c, welcome):
                sid = welcome["session"]
                await c.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 5000}})
                await c.recv_until(of_type("stream.delta"))
                proxy.cut()
                await until(lambda: sid in b.sessions)
                assert sid in b.sessions, "b adopted the session"
                proxy.restore()
                await until(lambda: a.backplane.healthy)
                await asyncio.sleep(2.0)  # several heartbeats of a
                r = redis_server.client()
                log = [(e[0].decode(), orjson.loads(e[1][b"f"])) for e in r.xrange(f"wss:s:{sid}:log")]
                owner = r.hget(f"wss:s:{sid}", "owner")
                r.close()
                ends = [(i, f.get("error", {}).get("code")) for i, f in log if f["type"] == "stream.end"]
                after = [f["type"] for i, f in log if ends and int(i.split("-")[0]) > int(ends[0][0].split("-")[0])]
                assert not (sid in a.sessions and sid in b.sessions), "two nodes own the session"
                assert owner == b"node1" and sid in b.sessions
                assert not after, f"the fenced node wrote {len(after)} frames after the adopter's end"
    finally:
        await proxy.close()


# Only the node that wins adoption calls server.node_lost(); the adopter ZREMs the lost
# node right away, so the other survivors never see it in their heartbeat reply and their
# tunnels to the lost node stay open forever (spec 7.8 promises 1012).
async def test_every_survivor_closes_its_tunnels_to_a_lost_node(redis_server):
    async with nodes(redis_server.url, count=3, node_timeout=1.0) as (a, b, c):
        async with client(c) as (_x, w1), client(c) as (_y, w2):
            pass  # two sessions owned by node2 (c), now detached
        async with connect(a.url, compression=None) as wa, connect(b.url, compression=None) as wb:
            ca, cb = RawClient(wa), RawClient(wb)
            assert (await ca.hello(session=w1["session"], last_seq=0))["resumed"]
            assert (await cb.hello(session=w2["session"], last_seq=0))["resumed"]
            kill_node(c)
            codes = {}
            for name, cl in (("a", ca), ("b", cb)):
                try:
                    while True:
                        await cl.recv(timeout=6)
                except ConnectionClosed as e:
                    codes[name] = e.rcvd.code if e.rcvd else None
                except (TimeoutError, asyncio.TimeoutError):
                    codes[name] = "still open after 6 s"
            assert codes == {"a": 1012, "b": 1012}, codes


# A resumed session's re-subscribe (recovery, spec 7.2): a publication that lands after the
# 'sub' script read the offset but whose pub/sub copy reaches the node before the script reply
# is processed is dropped by Server._deliver (the channel is still in session.paused, which is
# checked before session.held). The same window for a fresh subscription is handled (held).
class SlowSub:
    """The 'sub' reply is processed 0.5 s after the script ran (pub/sub overtakes it)."""

    def __init__(self, script):
        self.script, self.sha = script, script.sha
        self.ran = asyncio.Event()  # a 'sub' script has run in Redis

    async def __call__(self, keys, args):
        result = await self.script(keys=keys, args=args)
        if args[0] == "sub":
            self.ran.set()
            await asyncio.sleep(0.5)
        return result


@pytest.mark.parametrize("resumed", [False, True])
async def test_publication_during_subscribe_reaches_the_subscriber(redis_server, resumed):
    async with nodes(redis_server.url) as (a, b):
        async with client(b) as (keep, _):  # keeps node b listening on the channel
            await keep.send({"type": "subscribe", "id": "k", "channel": "ch"})
            await keep.recv_until(of_type("subscribed"))
            async with client(b) as (sub, welcome):
                since = epoch = None
                if resumed:
                    await sub.send({"type": "subscribe", "id": "s0", "channel": "ch"})
                    first = (await sub.recv_until(of_type("subscribed")))[-1]
                    since, epoch = first["offset"], first["epoch"]
            slow = b.backplane.scripts["channel"] = SlowSub(b.backplane.scripts["channel"])
            hello = {"session": welcome["session"], "last_seq": 0} if resumed else {}
            async with client(b, **hello) as (sub, _), client(a) as (pub, _):
                msg = {"type": "subscribe", "id": "s1", "channel": "ch"}
                if resumed:
                    msg.update(since=since, epoch=epoch)
                await sub.send(msg)
                async with asyncio.timeout(5):
                    await slow.ran.wait()  # the script has run; its reply is not processed yet
                await pub.send({"type": "publish", "id": "p", "channel": "ch", "data": "hello"})
                offset = (await pub.recv_until(of_type("ok", ref="p")))[-1]["offset"]
                subscribed = (await sub.recv_until(of_type("subscribed")))[-1]
                assert subscribed["offset"] < offset
                got = await sub.recv_until(lambda f: f.get("offset") == offset, timeout=3)
                assert got[-1]["data"] == "hello"


# Pub/sub and script replies travel on different connections. A publication whose pub/sub
# copy reaches the node *after* a subscribe's script reply (offset <= subscribed.offset, already
# replayed in `missed`) is delivered again: a duplicate, and out of order (spec 7.2: nothing
# lost, duplicated or reordered). _deliver never compares offsets.
async def test_no_duplicate_when_pubsub_lags_the_script_reply(redis_server):
    async with nodes(redis_server.url) as (a, b):
        bp = b.backplane
        orig = bp.pubsub._dispatch

        def lagging(channel, data):  # node b's pub/sub reader lags 0.3 s behind (load)
            if channel.startswith(b"wss:c:"):
                asyncio.get_running_loop().call_later(0.3, orig, channel, data)
            else:
                orig(channel, data)

        bp.pubsub._dispatch = lagging
        async with client(b) as (keep, _), client(a) as (pub, _), client(b) as (sub, _):
            await keep.send({"type": "subscribe", "id": "k", "channel": "ch"})
            first = (await keep.recv_until(of_type("subscribed")))[-1]
            await pub.send({"type": "publish", "id": "p", "channel": "ch", "data": "m"})
            offset = (await pub.recv_until(of_type("ok", ref="p")))[-1]["offset"]
            await sub.send({"type": "subscribe", "id": "s", "channel": "ch",
                            "since": offset - 1, "epoch": first["epoch"]})
            frames = await sub.recv_until(lambda f: f.get("offset") == offset and f["type"] == "message")
            assert frames[0]["type"] == "subscribed" and frames[0]["recovered"] is True
            await asyncio.sleep(0.6)
            extra = []
            try:
                while True:
                    extra.append(await sub.recv(timeout=0.3))
            except (TimeoutError, asyncio.TimeoutError):
                pass
            dup = [f for f in extra if f.get("offset") is not None and f["offset"] <= frames[0]["offset"]]
            assert not dup, f"delivered again after recovery: {dup}"


# While _resync() walks the sessions (one awaited round trip each, healthy still False),
# frames the writers sequence for sessions it has already passed (or during its last execute)
# go through write_log(), which drops them ('written back by _resync()' - but _resync has
# passed). They are sent to the client yet never reach Redis: holes in the Redis replay log.
async def test_no_holes_in_the_redis_log_after_an_outage(redis_server):
    proxy = Proxy(redis_server.port)
    await proxy.start()
    try:
        async with nodes([proxy.url], count=1, node_timeout=10.0, sim_tokens_per_s=400.0, coalesce=False) as (a,):
            async with AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(client(a)) for _ in range(8)]
                readers = []
                for c, _ in clients:
                    await c.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 100000}})

                    async def drain(c=c):
                        while True:
                            await c.recv(timeout=30)
                    readers.append(asyncio.ensure_future(drain()))
                await asyncio.sleep(0.5)
                proxy.cut()
                await asyncio.sleep(0.5)
                proxy.restore()
                await until(lambda: a.backplane.healthy)
                assert a.backplane.healthy
                await asyncio.sleep(1.0)
                r = redis_server.client()
                holes = {}
                for _, w in clients:
                    seqs = [int(e[0].split(b"-")[0]) for e in r.xrange(f"wss:s:{w['session']}:log")]
                    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
                    if missing:
                        holes[w["session"][:6]] = missing
                r.close()
                for t in readers:
                    t.cancel()
                assert not holes, f"{len(holes)} sessions have seq holes in the Redis log"
    finally:
        await proxy.close()


# Agent-name uniqueness: (1) the claim script accepts a name whose holder's hash is not written
# yet (registration is queued and written only at the welcome's flush), so two concurrent hellos
# both get it; (2) while Redis is unreachable route() skips claim_agent and _open_session trusts
# conn.agent_taken (False), so even one node hands the same name to two sessions.
async def hello(server, agent):
    ws = await connect(server.url, compression=None)
    c = RawClient(ws)
    await c.send({"type": "hello", "protocol": 1, "agent": agent})
    return ws, (await c.recv())["type"]


async def test_concurrent_hellos_on_two_nodes(redis_server):
    async with nodes(redis_server.url) as (a, b):
        both = 0
        for i in range(20):
            (w1, t1), (w2, t2) = await asyncio.gather(hello(a, f"x{i}"), hello(b, f"x{i}"))
            both += t1 == t2 == "welcome"
            await w1.close(); await w2.close()
        assert both == 0


async def test_degraded_node_keeps_names_unique_locally(redis_server):
    proxy = Proxy(redis_server.port)
    await proxy.start()
    try:
        async with nodes([proxy.url], count=1, node_timeout=10.0) as (a,):
            proxy.cut()
            await until(lambda: not a.backplane.healthy)
            (w1, t1) = await hello(a, "solo")
            (w2, t2) = await hello(a, "solo")
            await w1.close(); await w2.close()
            assert (t1, t2) == ("welcome", "error")
    finally:
        await proxy.close()
