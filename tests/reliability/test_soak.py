"""Soak: many connections, many concurrent streams, all delivered intact;
then ~5 minutes of 1,000 churning connections with nothing leaked.

Marked slow: run with ``pytest -m slow tests/reliability/test_soak.py -s`` (the churn test
prints its figures; ``SOAK_SECONDS=30`` shortens it).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

import wsserver
from tests.helpers import until
from wsserver.wire.messages import ChatMessage
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
    await until(lambda: not server.connections)
    assert not server.connections


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


CHURN_CONNECTIONS = 1000
CHURN_SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))


@pytest.mark.timeout(CHURN_SECONDS + 240)
async def test_churn_1000_connections_returns_to_baseline(make_server: Any) -> None:
    """~5 minutes (SOAK_SECONDS) of 1,000 clients that connect, stream, cancel,
    drop and resume, and disconnect, over and over. Afterwards the server holds
    no connection or session, and the process's asyncio tasks and open fds are
    back to the baseline; RSS is reported (README "Reliability") with a
    generous bound only (CPython keeps freed arenas)."""
    cfg = {"session_ttl": 2.0, "sim_tokens_per_s": 200.0, "message_rate": 0.0, "generate_rate": 0.0}
    async with make_server(**cfg) as server:
        stats = {"rounds": 0, "completed": 0, "cancelled": 0, "resumed": 0, "dropped": 0}

        async def one_round(rng: random.Random, state: dict[str, Any]) -> None:
            async with connect(server.url, compression=None, max_size=None) as ws:
                hello: dict[str, Any] = {"type": "hello", "protocol": 1}
                if state.get("session"):
                    hello.update(session=state["session"], last_seq=state["last_seq"])
                await ws.send(orjson.dumps(hello).decode())
                welcome = orjson.loads(await ws.recv())
                if welcome["resumed"]:
                    stats["resumed"] += 1
                else:
                    state.update(session=welcome["session"], last_seq=0)
                sid = f"r{stats['rounds']}"
                tokens = rng.randint(5, 60)
                content = f"soak {sid}"
                await ws.send(orjson.dumps({"type": "generate", "stream": sid, "messages": [{"role": "user", "content": content}], "params": {"reply_tokens": tokens}}).decode())
                action = rng.choice(["complete", "complete", "cancel", "drop"])
                text, deltas = "", 0
                async with asyncio.timeout(60):
                    while True:
                        frame = orjson.loads(await ws.recv())
                        if "seq" in frame:
                            if frame["seq"] <= state["last_seq"]:
                                continue  # replayed: seen before the drop
                            assert frame["seq"] == state["last_seq"] + 1, (frame, state)
                            state["last_seq"] = frame["seq"]
                        if frame.get("stream") != sid:
                            continue  # the end of an earlier stream, replayed
                        if frame["type"] == "stream.delta":
                            text += frame["text"]
                            deltas += 1
                            if deltas == 3 and action == "cancel":
                                await ws.send(orjson.dumps({"type": "cancel", "stream": sid}).decode())
                            if deltas == 3 and action == "drop":
                                ws.transport.abort()
                                stats["dropped"] += 1
                                return
                        elif frame["type"] == "stream.end":
                            if frame["reason"] == "complete":
                                assert text == "".join(simulated_reply([ChatMessage(role="user", content=content)], tokens))
                                stats["completed"] += 1
                            else:
                                assert frame["reason"] == "cancelled", frame
                                stats["cancelled"] += 1
                            break
                await ws.send(orjson.dumps({"type": "ack", "seq": state["last_seq"]}).decode())
                if rng.random() < 0.5:
                    state.clear()  # a new session next time; this one expires

        async def worker(n: int, until: float) -> None:
            rng = random.Random(n)
            state: dict[str, Any] = {}
            loop = asyncio.get_running_loop()
            await asyncio.sleep(rng.uniform(0, 2))
            while loop.time() < until:
                stats["rounds"] += 1
                await one_round(rng, state)

        gc.collect()
        base_tasks, base_fds, base_rss = len(asyncio.all_tasks()), _fds(), _rss_mib()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(worker(n, started + CHURN_SECONDS) for n in range(CHURN_CONNECTIONS)))
        elapsed = loop.time() - started
        peak_rss = _rss_mib()
        async with asyncio.timeout(30):  # sessions expire after session_ttl (2 s)
            while server.connections or server.sessions:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        gc.collect()
        tasks, fds, rss = len(asyncio.all_tasks()), _fds(), _rss_mib()
        print(
            f"\nchurn: {stats['rounds']} rounds in {elapsed:.0f} s by {CHURN_CONNECTIONS} clients; "
            f"{stats['completed']} completed, {stats['cancelled']} cancelled, {stats['dropped']} dropped, "
            f"{stats['resumed']} resumed; tasks {base_tasks} -> {tasks}; fds {base_fds} -> {fds}; "
            f"RSS {base_rss:.0f} -> peak {peak_rss:.0f} -> {rss:.0f} MiB"
        )
        assert stats["completed"] and stats["cancelled"] and stats["dropped"] and stats["resumed"]
        assert tasks == base_tasks
        assert fds <= base_fds + 2
        assert not server.backplane.channels.agents
        assert rss < base_rss + 512  # generous: the figure itself goes in the README
