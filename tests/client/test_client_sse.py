"""The Python client over the HTTP transport (``transport="sse"``)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest

import wsserver
from wsserver.client import Backoff
from wsserver.client.sse import http_base
from wsserver.providers import simulated_reply
from wsserver.server import Server
from wsserver.wire.errors import ConnectionLost
from wsserver.wire.messages import ChatMessage

from tests.helpers import USER_HI

FAST = Backoff(base=0.01, cap=0.1, give_up_after=10)


def expected(text: str, tokens: int) -> str:
    return "".join(simulated_reply([ChatMessage(role="user", content=text)], tokens))


def test_http_base() -> None:
    assert http_base("ws://127.0.0.1:9/") == ("http://127.0.0.1:9", {})
    assert http_base("wss://h.example/ws?token=t") == ("https://h.example", {"token": "t"})


async def test_generate_cancel_and_ping(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url, transport="sse") as client:
        assert client.transport == "sse" and client.session
        stream = await client.generate(USER_HI)
        assert "".join([t async for t in stream]) == expected("hi", None)  # type: ignore[arg-type]
        long = await client.generate(USER_HI, params={"reply_tokens": 100_000, "tokens_per_s": 200})
        await long.cancel()
        assert (await long.wait()).reason == "cancelled"
        assert await client.ping() > 0
        assert len(server.sse) == 1 and not server.connections  # no WebSocket was used


async def test_channels_and_direct_messages(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(
        server.url, transport="sse", hello={"agent": "a1"}
    ) as a, wsserver.connect(server.url, hello={"agent": "b1"}) as b:
        sub = await a.subscribe("room")
        await b.publish("room", {"n": 1})
        async for message in sub:
            if getattr(message, "data", None) == {"n": 1}:
                break
        await b.send("a1", "over http")
        dm = await a.inbox.get()
        assert dm.data == "over http" and dm.sender == "b1"


@pytest.mark.both_loops
async def test_survives_dropped_streams_during_a_long_generation(server: Server) -> None:
    rng = random.Random(11)
    kills = 0

    async def killer() -> None:
        nonlocal kills
        while True:
            await asyncio.sleep(rng.uniform(0.05, 0.15))
            for conn in list(server.sse.connections.values()):
                conn.front.abort()
                kills += 1

    async with asyncio.timeout(30), wsserver.connect(server.url, transport="sse", backoff=FAST, ack_every=50) as client:
        stream = await client.generate(
            [{"role": "user", "content": "a long story"}], params={"reply_tokens": 3000, "tokens_per_s": 2000}
        )
        task = asyncio.ensure_future(killer())
        try:
            pieces = [piece async for piece in stream]
        finally:
            task.cancel()
        assert stream.result is not None and stream.result.reason == "complete"
        assert "".join(pieces) == expected("a long story", 3000)
        assert kills >= 3 and client.reconnects >= 3


async def test_a_tool_stream_over_http_survives_dropped_streams_mid_arguments(server: Server) -> None:
    """Reasoning, calls and argument fragments resume by Last-Event-ID like any frame."""
    tools = [
        {"name": f"tool_{i}", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}
        for i in range(40)
    ]
    prompt = " ".join(f"tool_{i} word{i}" for i in range(40))
    async with asyncio.timeout(30), wsserver.connect(server.url, transport="sse", backoff=FAST, ack_every=20) as client:
        stream = await client.generate(
            [{"role": "user", "content": prompt}], tools=tools, params={"reasoning": {"effort": "high"}, "tokens_per_s": 300}
        )
        kills, events = 0, []
        async for event in stream.events():
            events.append(event)
            # mid-arguments, once per connection (the next kill waits for the reconnect)
            if event.kind == "tool_call_delta" and kills < 3 and client.reconnects == kills:
                for conn in list(server.sse.connections.values()):
                    conn.front.abort()
                kills += 1
        assert kills == 3 and client.reconnects >= 3
        assert stream.result is not None and stream.result.reason == "tool_calls"
        assert [(c.name, c.arguments) for c in stream.tool_calls] == [(f"tool_{i}", {"q": f"word{i}"}) for i in range(40)]
        assert "".join(e.text for e in events if e.kind == "reasoning") == stream.message["content"][0]["text"]
        fragments: dict[str, str] = {}
        for e in events:
            if e.kind == "tool_call_delta":
                fragments[e.call] = fragments.get(e.call, "") + e.text
        assert fragments == {c.id: orjson.dumps(c.arguments).decode() for c in stream.tool_calls}


async def test_takeover_closes_4000_without_reconnecting(server: Server) -> None:
    async with asyncio.timeout(10):
        first = await wsserver.connect(server.url, transport="sse", backoff=FAST)
        second = await wsserver.connect(server.url, hello={"session": first.session, "last_seq": 0})
        try:
            with pytest.raises(ConnectionLost) as lost:
                await first.generate(USER_HI)
            assert lost.value.code == 4000
            assert first.state == "closed"
        finally:
            await first.close()
            await second.close()


async def test_no_server_raises_oserror() -> None:
    from tests.helpers import free_port

    with pytest.raises(OSError):
        await wsserver.connect(f"ws://127.0.0.1:{free_port()}/", transport="sse", reconnect=False)


def test_transport_is_checked() -> None:
    with pytest.raises(ValueError):
        wsserver.client.Client("ws://x/", transport="carrier-pigeon")


