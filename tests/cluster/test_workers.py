"""`wsserver serve --workers N`: N processes on one port (SO_REUSEPORT) sharing a
Redis backplane; a session resumes through any worker; a killed worker is
restarted and its sessions are adopted; SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import PY, USER_HI, RawClient, ServerProcess, clean_env, free_port

FAST = ["--sim-ttft-ms", "0", "--ping-interval", "0", "--node-timeout", "1"]
STARTED = re.compile(r"worker w(\d) started \(pid (\d+), node (\S+)\)")


@contextlib.contextmanager
def workers(redis_url: str, n: int, *args: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(free_port(), [*FAST, "--workers", str(n), "--redis", redis_url, *args], clean_env())
    try:
        proc.wait_for_line(f"with {n} workers", timeout=30)
        yield proc
    finally:
        kill_all(proc)


def kill_all(proc: ServerProcess) -> None:
    for pid, _ in worker_pids(proc).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()


def worker_pids(proc: ServerProcess) -> dict[int, tuple[int, str]]:
    """Worker number -> (pid, node name) of its latest process, from the supervisor's output."""
    found = {}
    for line in list(proc.stdout):
        m = STARTED.search(line)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), m.group(3))
    return found


def url(proc: ServerProcess) -> str:
    return f"ws://127.0.0.1:{proc.port}/"


async def new_session(server_url: str, **generate: Any) -> tuple[str, list[dict[str, Any]]]:
    async with connect(server_url, compression=None) as ws:
        c = RawClient(ws)
        session = (await c.hello())["session"]
        await c.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 5}, **generate})
        frames = await c.recv_until(lambda f: f["type"] == "stream.end")
    return session, frames


def test_more_than_one_worker_needs_redis() -> None:
    proc = subprocess.run([*PY, "serve", "--workers", "2", "--port", "0"], capture_output=True, text=True,
                          env=clean_env(), timeout=30)
    assert proc.returncode != 0
    assert "--workers 2 needs the Redis backplane (--redis URL" in proc.stderr, proc.stderr


async def test_two_workers_share_the_port_and_any_session_resumes_through_either(redis_server: Any) -> None:
    r = redis_server.client()
    with workers(redis_server.url, 2) as sup:
        assert len(worker_pids(sup)) == 2
        sessions: dict[str, list[dict[str, Any]]] = {}
        for _ in range(16):  # the kernel spreads connections over both workers
            sid, frames = await new_session(url(sup))
            sessions[sid] = frames
        owners = {r.hget(f"wss:s:{sid}", "owner").decode() for sid in sessions}
        assert owners == {name for _, name in worker_pids(sup).values()}, owners
        async with contextlib.AsyncExitStack() as stack:  # all resumed at once: some through the other worker
            for sid, frames in sessions.items():
                ws = await stack.enter_async_context(connect(url(sup), compression=None))
                c = RawClient(ws)
                assert (await c.hello(session=sid, last_seq=0))["resumed"] is True
                assert await c.recv_until(lambda f: f["type"] == "stream.end") == frames
            tunnels = r.pubsub_channels("wss:p:*")  # a connection relayed to its session's worker
            assert tunnels, "every resume reached its own worker (1 in 65,536)"


async def test_a_killed_worker_is_restarted_and_its_sessions_adopted(redis_server: Any) -> None:
    r = redis_server.client()
    with workers(redis_server.url, 2, "--sim-tokens-per-s", "50") as sup:
        async with connect(url(sup), compression=None) as ws:
            c = RawClient(ws)
            sid = (await c.hello())["session"]
            await c.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 5000}})
            frames = await c.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= 5)
            owner = r.hget(f"wss:s:{sid}", "owner").decode()
            (number,) = [k for k, (_, name) in worker_pids(sup).items() if name == owner]
            pid = worker_pids(sup)[number][0]
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await c.recv_until(lambda f: False, timeout=10)
        for _ in range(300):  # started again, as a new node
            if worker_pids(sup)[number][0] != pid:
                break
            await asyncio.sleep(0.1)
        new_pid, new_name = worker_pids(sup)[number]
        assert new_pid != pid and new_name != owner
        sup.stderr.seek(0)
        assert f"worker w{number} (node {owner}) exited with signal 9" in sup.stderr.read().decode()
        last_seq = frames[-1]["seq"]
        for _ in range(60):  # until a worker has adopted it (close 1012 while they find out)
            try:
                async with connect(url(sup), compression=None) as ws:
                    c = RawClient(ws)
                    await c.send({"type": "hello", "protocol": 1, "session": sid, "last_seq": last_seq})
                    welcome = await c.recv(timeout=15)  # (a relay to the dead node waits until it is lost)
                    assert welcome["resumed"] is True, welcome
                    rest = await c.recv_until(lambda f: f["type"] == "stream.end", timeout=15)
                    break
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1012, closed
                await asyncio.sleep(0.25)
        else:
            raise AssertionError("the session was not adopted")
        seqs = [f["seq"] for f in frames + rest]
        assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, nothing doubled
        assert rest[-1]["reason"] == "error" and rest[-1]["error"]["code"] == "node_lost", rest[-1]
        assert r.hget(f"wss:s:{sid}", "owner").decode() != owner  # adopted by a live worker


def test_sigterm_stops_every_worker(redis_server: Any) -> None:
    with workers(redis_server.url, 2) as sup:
        pids = [pid for pid, _ in worker_pids(sup).values()]
        assert sup.stop(signal.SIGTERM, timeout=20) == 0
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (not our child to reap) is gone too
        return f.read().split()[2] != "Z"
