"""`wsserver serve` processes on one redis-server: a node SIGKILLed mid-stream
(its client resumes on another node and loses or doubles nothing), and Redis
restarted under traffic (the nodes degrade, keep serving, and recover)."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import USER_HI, RawClient
from tests.helpers import ServerProcess, clean_env, free_port

PACED = ["--sim-ttft-ms", "0", "--ping-interval", "0", "--node-timeout", "1"]


@contextlib.contextmanager
def node(redis_url: str, name: str, *args: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(free_port(), [*PACED, "--redis", redis_url, "--node-id", name, *args], clean_env())
    try:
        proc.wait_for_line("listening")
        yield proc
    finally:
        proc.kill()


def url(proc: ServerProcess) -> str:
    return f"ws://127.0.0.1:{proc.port}/"


def readyz(proc: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/readyz", timeout=5) as resp:  # noqa: S310
        return resp.read().decode()


async def resume(server_url: str, session: str, last_seq: int, frames: list[dict[str, Any]]) -> None:
    """Resume like a client does: retry while the node is still finding out the
    owner is lost (close 1012), read until the stream has ended, then finish
    the lost answer with an interrupt (its request was kept in Redis)."""
    for _ in range(40):
        try:
            async with connect(server_url, compression=None) as ws:
                c = RawClient(ws)
                welcome = await c.hello(session=session, last_seq=last_seq)
                assert welcome["resumed"] is True, welcome
                frames.extend(await c.recv_until(lambda f: f["type"] == "stream.end", timeout=15))
                lost = frames[-1]["stream"]
                await c.send({"type": "interrupt", "id": "i", "stream": lost, "input": "go on"})
                start = (await c.recv_until(lambda f: f["type"] == "stream.start", timeout=15))[-1]
                assert start["steered_from"] == lost and start["provider"] == "simulated"
                delta = (await c.recv_until(lambda f: f["type"] == "stream.delta", timeout=15))[-1]
                assert delta["stream"] == start["stream"] and delta["text"].startswith("You")
                await c.send({"type": "cancel", "id": "c", "stream": start["stream"]})
                end = (await c.recv_until(lambda f: f["type"] == "stream.end", timeout=15))[-1]
                assert end["reason"] == "cancelled"
                return
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1012, closed
            await asyncio.sleep(0.25)
    raise AssertionError("could not resume")


async def test_sigkilled_node_its_client_resumes_elsewhere_nothing_lost_or_doubled(redis_server: Any) -> None:
    with node(redis_server.url, "a", "--sim-tokens-per-s", "100") as a, node(redis_server.url, "b") as b:
        frames: list[dict[str, Any]] = []
        async with connect(url(a), compression=None) as ws:
            c = RawClient(ws)
            session = (await c.hello())["session"]
            await c.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 5000}})
            frames += await c.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= 20)
            a.proc.kill()  # SIGKILL mid-stream
            a.proc.wait(timeout=5)
        # the client processed only part of what it was sent: the rest comes from Redis
        frames = frames[: next(i for i, f in enumerate(frames) if f.get("index") == 10) + 1]
        last_seq = frames[-1]["seq"]
        await resume(url(b), session, last_seq, frames)
        frames = frames[: next(i for i, f in enumerate(frames) if f["type"] == "stream.end") + 1]
        seqs = [f["seq"] for f in frames]
        assert seqs == list(range(1, len(seqs) + 1))  # in order, nothing lost, nothing doubled
        deltas = [f for f in frames if f["type"] == "stream.delta"]
        assert [d["index"] for d in deltas] == list(range(len(deltas)))
        end = frames[-1]
        assert end["reason"] == "error" and end["error"]["code"] == "node_lost", end
        assert frames[0]["type"] == "stream.start"


async def test_redis_restart_under_traffic(redis_server: Any) -> None:
    with node(redis_server.url, "a", "--sim-tokens-per-s", "50") as a, node(redis_server.url, "b") as b:
        async with connect(url(a), compression=None) as ws:
            c = RawClient(ws)
            session = (await c.hello())["session"]
            await c.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 5000}})
            await c.recv_until(lambda f: f["type"] == "stream.delta")
            assert readyz(a) == "ready\n"

            redis_server.stop()
            for _ in range(100):
                if readyz(a).startswith("degraded"):
                    break
                await asyncio.sleep(0.1)
            assert readyz(a).startswith("degraded"), readyz(a)
            # the node keeps serving its own session: tokens go on streaming
            before = (await c.recv_until(lambda f: f["type"] == "stream.delta"))[-1]["index"]
            after = (await c.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= before + 5))[-1]
            assert after["index"] >= before + 5
            # channels need Redis: a clear error, not a hang
            await c.send({"type": "publish", "id": "p1", "channel": "team", "data": 1})
            err = (await c.recv_until(lambda f: f.get("ref") == "p1"))[-1]
            assert err["type"] == "error" and err["code"] == "backplane_unavailable", err

            redis_server.start()  # empty: no persistence
            for _ in range(150):
                if readyz(a) == "ready\n" and readyz(b) == "ready\n":
                    break
                await asyncio.sleep(0.1)
            assert readyz(a) == "ready\n" and readyz(b) == "ready\n"
            await c.send({"type": "publish", "id": "p2", "channel": "team", "data": 2})
            ok = (await c.recv_until(lambda f: f.get("ref") == "p2"))[-1]
            assert ok["type"] == "ok" and ok["offset"] == 1, ok  # a fresh Redis: the channel starts over
            frames = await c.recv_until(lambda f: f["type"] == "stream.delta")
            last_seq = frames[-1]["seq"]
        # node A wrote its session back into the new Redis: a resume through B works
        async with connect(url(b), compression=None) as ws:
            c = RawClient(ws)
            welcome = await c.hello(session=session, last_seq=last_seq)
            assert welcome["resumed"] is True
            await c.send({"type": "cancel", "id": "c", "stream": "s1"})
            frames = await c.recv_until(lambda f: f.get("ref") == "c")
            seqs = [f["seq"] for f in frames if "seq" in f]
            assert seqs == list(range(last_seq + 1, last_seq + 1 + len(seqs)))
            assert any(f["type"] == "stream.end" and f["reason"] == "cancelled" for f in frames)


def test_frames_in_redis_match_what_the_client_saw(redis_server: Any) -> None:
    """The replay log in Redis holds the sequenced frames byte for byte, in order."""

    async def run() -> None:
        with node(redis_server.url, "a") as a:
            async with connect(url(a), compression=None) as ws:
                c = RawClient(ws)
                session = (await c.hello())["session"]
                await c.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"max_tokens": 50}})
                seen = await c.recv_until(lambda f: f["type"] == "stream.end")
                r = redis_server.client()
                stored = [orjson.loads(e[1][b"f"]) for e in r.xrange(f"wss:s:{session}:log")]
                r.close()
                assert stored == seen

    asyncio.run(run())


async def test_direct_message_to_an_agent_whose_node_died_waits_in_its_log(redis_server: Any) -> None:
    with node(redis_server.url, "a") as a, node(redis_server.url, "b") as b:
        async with connect(url(a), compression=None) as ws:
            worker = RawClient(ws)
            session = (await worker.hello(agent="worker"))["session"]
            a.proc.kill()
            a.proc.wait(timeout=5)
        async with connect(url(b), compression=None) as ws:
            boss = RawClient(ws)
            await boss.hello(agent="boss")
            await boss.send({"type": "send", "id": "m1", "to": "worker", "data": {"task": 7}})
            assert (await boss.recv_until(lambda f: f.get("ref") == "m1"))[-1]["type"] == "ok"
        frames: list[dict[str, Any]] = []
        for _ in range(40):  # as a client does: retry while the loss is being found out
            try:
                async with connect(url(b), compression=None) as ws:
                    worker = RawClient(ws)
                    assert (await worker.hello(session=session, last_seq=0))["resumed"] is True
                    frames = await worker.recv_until(lambda f: f["type"] == "message", timeout=10)
                    break
            except ConnectionClosed:
                await asyncio.sleep(0.25)
        assert frames and frames[-1]["from"] == "boss" and frames[-1]["data"] == {"task": 7}
        assert frames[-1]["seq"] == 1


async def test_sigterm_hands_sessions_over_and_a_restarted_node_keeps_its_own(redis_server: Any) -> None:
    with node(redis_server.url, "b") as b:
        with node(redis_server.url, "a", "--sim-tokens-per-s", "100", "--drain-timeout", "0.2") as a:
            async with connect(url(a), compression=None) as ws:
                c = RawClient(ws)
                session = (await c.hello())["session"]
                await c.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 5000}})
                await c.recv_until(lambda f: f["type"] == "stream.delta")
                a.proc.send_signal(15)  # SIGTERM: drain
                frames = await c.recv_until(lambda f: f["type"] == "stream.end", timeout=10)
                assert frames[-1]["error"]["code"] == "shutdown"
                last_seq = frames[-1]["seq"]
            assert a.proc.wait(timeout=10) == 0
        # the drained node left its sessions for adoption: B serves it at once
        async with connect(url(b), compression=None) as ws:
            c = RawClient(ws)
            assert (await c.hello(session=session, last_seq=last_seq))["resumed"] is True
            await c.send({"type": "ping", "id": "p"})
            assert (await c.recv())["type"] == "pong"
    # a node restarted with the same --node-id adopts what its previous run left
    with node(redis_server.url, "c") as c_node:
        async with connect(url(c_node), compression=None) as ws:
            c = RawClient(ws)
            session = (await c.hello())["session"]
            await c.send({"type": "ack", "id": "k", "seq": 0})
            await c.recv()
        c_node.proc.kill()
        c_node.proc.wait(timeout=5)
    with node(redis_server.url, "c") as c_node:
        async with connect(url(c_node), compression=None) as ws:
            c = RawClient(ws)
            assert (await c.hello(session=session, last_seq=1))["resumed"] is True
