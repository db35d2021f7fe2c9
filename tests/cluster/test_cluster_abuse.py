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
