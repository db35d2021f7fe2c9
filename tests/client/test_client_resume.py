"""The Python client reconnecting, resuming and steering."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest

import wsserver
from wsserver.client import Backoff
from wsserver.wire.errors import ConnectionLost
from wsserver.wire.messages import ChatMessage
from wsserver.providers import simulated_reply
from wsserver.server import Server

FAST = Backoff(base=0.01, cap=0.1, give_up_after=10)


def expected(text: str, tokens: int) -> str:
    return "".join(simulated_reply([ChatMessage(role="user", content=text)], tokens))


def kill_connections(server: Server) -> int:
    """Abort every server-side transport: no closing handshake (a network loss)."""
    killed = 0
    for conn in list(server.connections):
        conn.ws.transport.abort()
        killed += 1
    return killed


@pytest.mark.both_loops
async def test_survives_random_connection_kills_during_a_long_stream(server: Server) -> None:
    rng = random.Random(7)
    kills = 0
    states: list[tuple[str, str]] = []

    async def killer() -> None:
        nonlocal kills
        while True:
            await asyncio.sleep(rng.uniform(0.03, 0.15))
            kills += kill_connections(server)

    async with asyncio.timeout(30), wsserver.connect(
        server.url, backoff=FAST, ack_every=50, on_state=lambda s, d: states.append((s, d))
    ) as client:
        stream = await client.generate(
            [{"role": "user", "content": "a long story"}],
            params={"reply_tokens": 3000, "tokens_per_s": 2000},
        )
        task = asyncio.ensure_future(killer())
        try:
            pieces = [piece async for piece in stream]
        finally:
            task.cancel()
        assert stream.result is not None and stream.result.reason == "complete"
        assert "".join(pieces) == expected("a long story", 3000)
        assert kills >= 3 and client.reconnects >= 3
        assert ("open", "resumed") in states and ("reconnecting", "") in states
        # the session still works, and acks reached the server
        assert await client.ping() > 0
        live = server.sessions[client.session]  # type: ignore[index]
        assert live.session.acked > 0


class SteadyBackoff(Backoff):
    """Always 0.2 s: full jitter may pick ~0 s, and a reconnect that fast can
    come and go between two looks at ``client.state`` (a 1-in-40 flake)."""

    def delay(self, attempt: int) -> float:
        return 0.2


async def test_requests_made_while_disconnected_are_sent_once_reconnected(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url, backoff=SteadyBackoff()) as client:
        kill_connections(server)
        while client.state == "open":
            await asyncio.sleep(0.005)
        stream = await client.generate([{"role": "user", "content": "later"}], params={"reply_tokens": 20})
        assert (await stream.wait()).text == expected("later", 20)
        assert client.reconnects == 1


async def test_a_request_lost_in_the_drop_is_answered_exactly_once(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url, backoff=FAST) as client:
        streams, pings = [], []
        for i in range(8):  # some of these are in flight when the connection dies
            if i == 4:
                kill_connections(server)
            streams.append(asyncio.ensure_future(client.generate([{"role": "user", "content": f"q{i}"}], params={"reply_tokens": 5})))
            pings.append(asyncio.ensure_future(client.ping()))
        handles = await asyncio.gather(*streams)
        await asyncio.gather(*pings)
        results = await asyncio.gather(*(h.wait() for h in handles))
        assert [r.text for r in results] == [expected(f"q{i}", 5) for i in range(8)]
        live = server.sessions[client.session]  # type: ignore[index]
        assert len(live.session.book.ids_used) == 8  # nothing ran twice
        assert client.resent_requests > 0  # the re-send path was taken
        assert client.unsolicited_errors == []


async def test_session_lost_fails_streams_and_continues_fresh(make_server: Any) -> None:
    first = make_server()
    await first.start()
    port = first.port
    async with asyncio.timeout(15):
        client = await wsserver.connect(first.url, backoff=FAST)
        try:
            old_session = client.session
            stream = await client.generate([{"role": "user", "content": "x"}], params={"reply_tokens": 10_000, "tokens_per_s": 100})
            await stream.__anext__()
            await first.close()  # a restart: the sessions are gone
            second = make_server(port=port)
            await second.start()
            try:
                with pytest.raises(ConnectionLost):
                    async for _ in stream:
                        pass
                while client.state != "open":
                    await asyncio.sleep(0.01)
                assert client.session != old_session
                again = await client.generate([{"role": "user", "content": "y"}], params={"reply_tokens": 5})
                assert (await again.wait()).reason == "complete"
            finally:
                await client.close()
                await second.close()
        finally:
            await first.close()


async def test_no_reconnect_after_takeover(server: Server) -> None:
    async with asyncio.timeout(10):
        a = await wsserver.connect(server.url, backoff=FAST)
        b = await wsserver.connect(server.url, hello={"session": a.session, "last_seq": 0})
        try:
            while a.state != "closed":
                await asyncio.sleep(0.01)
            with pytest.raises(ConnectionLost) as info:
                await a.ping()
            assert info.value.code == 4000
            assert a.reconnects == 0
            assert b.welcome["resumed"] is True
        finally:
            await a.close()
            await b.close()


async def test_stream_interrupt_returns_the_steered_stream(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url) as client:
        stream = await client.generate([{"role": "user", "content": "tell a story"}], params={"reply_tokens": 200, "tokens_per_s": 400})
        await stream.__anext__()
        steered = await stream.interrupt("about cats")
        assert steered is not None and steered.steered_from == stream.id
        assert (await stream.wait()).reason == "interrupted"
        result = await steered.wait()
        assert result.text.startswith('You said "about cats".')
        stopped = await steered.interrupt()
        assert stopped is None


async def test_no_reconnect_when_disabled(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url, reconnect=False) as client:
        kill_connections(server)
        while client.state != "closed":
            await asyncio.sleep(0.01)
        with pytest.raises(ConnectionLost):
            await client.ping()


async def test_a_tool_stream_survives_connection_kills_mid_arguments(server: Server) -> None:
    """Reasoning, calls and argument fragments arrive once each across reconnects."""
    tools = [
        {"name": f"tool_{i}", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}
        for i in range(40)
    ]
    prompt = " ".join(f"tool_{i} word{i}" for i in range(40))
    async with asyncio.timeout(30), wsserver.connect(server.url, backoff=FAST, ack_every=20) as client:
        stream = await client.generate(
            [{"role": "user", "content": prompt}],
            tools=tools,
            params={"reasoning": {"effort": "high"}, "tokens_per_s": 300},
        )
        kills = 0
        events = []
        async for event in stream.events():
            events.append(event)
            # mid-arguments, once per connection (the next kill waits for the reconnect)
            if event.kind == "tool_call_delta" and kills < 3 and client.reconnects == kills:
                kill_connections(server)
                kills += 1
        assert kills == 3 and client.reconnects >= 3
        assert stream.result is not None and stream.result.reason == "tool_calls"
        calls = stream.tool_calls
        assert [c.name for c in calls] == [f"tool_{i}" for i in range(40)]
        assert [c.arguments for c in calls] == [{"q": f"word{i}"} for i in range(40)]
        # the events tell exactly what the end's message says: nothing lost or doubled
        assert "".join(e.text for e in events if e.kind == "reasoning") == stream.message["content"][0]["text"]
        assert {c.id: c.arguments for c in stream.calls.values()} == {
            c.id: orjson.dumps(c.arguments).decode() for c in calls
        }
