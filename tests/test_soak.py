"""Soak: many connections, many concurrent streams, all delivered intact.

Marked slow: run with ``pytest -m slow``.
"""

from __future__ import annotations

import asyncio

import pytest

import wsserver
from wsserver.messages import ChatMessage
from wsserver.providers import simulated_reply
from wsserver.server import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CONNECTIONS = 50
STREAMS = 4
TOKENS = 2000


@pytest.mark.both_loops
async def test_many_connections_many_streams(server: Server) -> None:
    async def one_client(n: int) -> None:
        async with wsserver.connect(server.url) as client:
            conversations = [[{"role": "user", "content": f"client {n} stream {k}"}] for k in range(STREAMS)]
            streams = [
                await client.generate(conv, params={"reply_tokens": TOKENS}) for conv in conversations
            ]
            results = await asyncio.gather(*(s.wait() for s in streams))
            for conv, result in zip(conversations, results, strict=True):
                assert result.reason == "complete"
                assert result.usage.output_tokens == TOKENS
                expected = "".join(simulated_reply([ChatMessage(**m) for m in conv], TOKENS))
                assert result.text == expected

    async with asyncio.timeout(240):
        await asyncio.gather(*(one_client(n) for n in range(CONNECTIONS)))
    await asyncio.sleep(0.2)
    assert not server.connections
