"""Issue 17 on the Redis backplane: agent names claimed only by authenticated
hellos and never left without an expiry, direct messages to an agent that is
away bounded (and never costing it its replay log) across nodes, channel
history bounded in bytes in Redis, and narrower rights written where an
adopting node reads them."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.asyncio.client import connect

from tests.cluster.test_cluster import client, nodes
from tests.helpers import USER_HI, RawClient, until
from wsserver.server.auth import make_jwt

SECRET = "s3cret-for-tests"


async def refused_hello(url: str, **fields: Any) -> str:
    async with connect(url, compression=None) as ws:
        c = RawClient(ws)
        await c.send({"type": "hello", "protocol": 1, **fields})
        return str((await c.recv()).get("code"))


async def test_unauthenticated_hellos_claim_no_agent_name(redis_server: Any) -> None:
    r = redis_server.client()
    async with nodes(redis_server.url, jwt_secret=SECRET) as (a, b):
        for i in range(30):  # no credential, a wrong one, an unsupported protocol, a malformed hello
            node = (a, b)[i % 2]
            assert await refused_hello(node.url, agent="planner") == "unauthorized"
            assert await refused_hello(node.url, agent=f"squat{i}", token="x.y.z") == "unauthorized"
            token = make_jwt(SECRET, {"sub": "mallory"})
            assert await refused_hello(node.url, agent=f"v{i}", token=token, protocol=2) == "unsupported_protocol"
            assert await refused_hello(node.url, agent=f"m{i}", token=token, last_seq=-1) == "bad_message"
        assert r.keys("wss:agent:*") == [] and r.keys("wss:claim:*") == []
        # the real agent is not locked out, on either node
        async with client(b, agent="planner", token=make_jwt(SECRET, {"sub": "planner"})) as (_, welcome):
            assert welcome["type"] == "welcome"
            assert r.get("wss:agent:planner").decode() == welcome["session"]
    r.close()


async def test_agent_names_expire_unless_their_node_refreshes_them(redis_server: Any) -> None:
    r = redis_server.client()
    async with nodes(redis_server.url, count=1, node_timeout=0.5) as (a,):
        async with client(a, agent="worker") as (_, welcome):
            assert 0 < r.pttl("wss:agent:worker") <= 10_000  # 20 x node_timeout
            r.pexpire("wss:agent:worker", 1500)  # as if not refreshed for a while
            await until(lambda: r.pttl("wss:agent:worker") > 2000, timeout=5)
            assert r.pttl("wss:agent:worker") > 2000  # refreshed by its live session's node
            assert all(r.pttl(key) > 0 for key in r.keys("wss:agent:*") + r.keys("wss:claim:*"))
        # (a detached session still holds it until it expires: session_ttl)
        assert r.get("wss:agent:worker").decode() == welcome["session"]
    r.close()


async def test_a_dm_flood_across_nodes_is_bounded_and_the_agent_resumes(redis_server: Any) -> None:
    r = redis_server.client()
    async with nodes(redis_server.url, publish_rate=0) as (a, b):  # (the default inbox: 100 messages, 1 MiB)
        async with client(a, agent="victim") as (agent, welcome):
            await agent.send({"type": "generate", "stream": "mine", "messages": USER_HI,
                              "params": {"reply_tokens": 100_000, "tokens_per_s": 20, "ttft_ms": 0}})
            last_seq = (await agent.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] == 1))[-1]["seq"]
        await until(lambda: a.sessions[welcome["session"]].conn is None)
        answers = []
        async with client(b, agent="sender") as (sender, _):
            for i in range(105):
                await sender.send({"type": "send", "id": f"d{i}", "to": "victim", "data": {"n": i}})
                reply = (await sender.recv_until(lambda f, i=i: f.get("ref") == f"d{i}"))[-1]
                answers.append(reply.get("code", reply["type"]))
        assert answers == ["ok"] * 100 + ["inbox_full"] * 5
        key = f"wss:s:{welcome['session']}"
        assert r.llen(f"{key}:dm") == 100 and int(r.get(f"{key}:dmb")) > 0  # waiting in Redis, not in its log
        async with client(b, session=welcome["session"], last_seq=last_seq) as (agent, welcome2):
            assert welcome2["resumed"] is True  # through a tunnel to node a
            frames = await agent.recv_until(lambda f: f["type"] == "message" and f["data"] == {"n": 99})
        assert frames[0]["seq"] == last_seq + 1
        assert [f["data"]["n"] for f in frames if f["type"] == "message"] == list(range(100))
        await until(lambda: r.llen(f"{key}:dm") == 0)
        assert r.llen(f"{key}:dm") == 0 and r.get(f"{key}:dmb") is None  # in its log now: off the queue
    r.close()


def _history_bytes(r: Any) -> int:
    total = 0
    for key in r.keys("wss:c:*:h"):
        for _, fields in r.xrange(key):
            total += len(fields[b"f"])
    return total


async def test_channel_history_in_redis_is_bounded_in_total_and_per_publisher(redis_server: Any) -> None:
    r = redis_server.client()
    data = "q" * 20_000
    async with nodes(
        redis_server.url, publish_rate=0, channel_history_bytes=200_000, channel_history_bytes_per_identity=100_000
    ) as (a, b):
        async with client(a) as (flooder, _), client(b) as (other, _):
            for i in range(20):  # ~400 kB from one publisher (per IP: anonymous), over 20 channels
                await flooder.send({"type": "publish", "id": f"p{i}", "channel": f"f{i}", "data": data})
                assert (await flooder.recv_until(lambda f: "ref" in f))[-1]["type"] == "ok"
            assert _history_bytes(r) <= 100_000
            assert r.xlen("wss:c:f19:h") == 1  # the newest kept, the oldest gone first
            # a channel's history stays contiguous: recovery is exact or says it is not
            for i in range(3):
                await other.send({"type": "publish", "id": f"o{i}", "channel": "f19", "data": i})
                await other.recv_until(lambda f: "ref" in f)
            await other.send({"type": "subscribe", "id": "s", "channel": "f19", "since": 0})
            sub = (await other.recv_until(lambda f: f["type"] == "subscribed"))[-1]
            assert sub["recovered"] is True  # nothing of f19 was trimmed yet
            total = int(r.get("wss:hist:bytes"))
            assert 0 < total <= 200_000 and r.pttl("wss:hist:bytes") > 0 and r.pttl("wss:hist:idx") > 0
    r.close()


async def test_channel_history_in_redis_is_bounded_per_identity_by_default(redis_server: Any) -> None:
    r = redis_server.client()
    data = "h" * 60 * 1024
    async with nodes(redis_server.url, count=1, publish_rate=0) as (a,), client(a) as (flooder, _):
        for i in range(320):  # ~19 MiB from one (anonymous) identity, over 320 channels
            await flooder.send({"type": "publish", "id": f"p{i}", "channel": f"flood:{i}", "data": data})
            assert (await flooder.recv_until(lambda f: "ref" in f))[-1]["type"] == "ok"
    assert _history_bytes(r) <= 16 << 20  # channel_history_bytes_per_identity, by default
    assert r.xlen("wss:c:flood:319:h") == 1  # the newest kept, the oldest gone first
    r.close()

async def test_narrower_rights_on_resume_are_written_for_an_adopting_node(redis_server: Any) -> None:
    r = redis_server.client()
    wide = make_jwt(SECRET, {"sub": "w"})
    narrow = make_jwt(SECRET, {"sub": "w", "channels": {"subscribe": ["public"], "publish": ["public"]}})
    async with nodes(redis_server.url, jwt_secret=SECRET) as (a, b):
        async with client(a, token=wide) as (c, welcome):
            await c.send({"type": "subscribe", "id": "s", "channel": "secret"})
            last = (await c.recv_until(lambda f: f["type"] == "subscribed"))[-1]["seq"]
        async with client(b, token=narrow, session=welcome["session"], last_seq=last) as (c, resumed):
            assert resumed["resumed"] is True
            dropped = (await c.recv_until(lambda f: f["type"] == "error"))[-1]
            assert (dropped["code"], dropped["channel"]) == ("forbidden", "secret")
        key = f"wss:s:{welcome['session']}"
        await until(lambda: orjson.loads(r.hget(key, "rules") or b"{}").get("subscribe") == ["public"])
        assert orjson.loads(r.hget(key, "rules")) == {"subscribe": ["public"], "publish": ["public"]}
        assert orjson.loads(r.hget(key, "subs")) == []
        await asyncio.sleep(0)
    r.close()
