"""The Python client over the HTTP transport (``transport="sse"``)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

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


