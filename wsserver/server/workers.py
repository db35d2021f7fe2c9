"""``wsserver serve --workers N``: N server processes on one port, and their supervisor.

One process uses one core. The supervisor reserves the port (a socket bound
with ``SO_REUSEPORT`` that never listens: the kernel hands connections only
to listening sockets) and starts N workers, each a ``wsserver serve`` with
``--reuse-port`` on that port and its own node name (``NAME-w1``…) on the
Redis backplane given by ``--redis``, which is required: the kernel spreads
new connections over the workers, and since every session is in Redis a
client resumes through any worker (relayed to the one that runs its session,
PROTOCOL.md 7.8).

A worker that dies is started again, under a new node name (``NAME-w1r1``…):
the dead one's sessions are adopted as on any node's loss, by a worker that
finds its heartbeat ``--node-timeout`` old; streams that were running there
end with ``error node_lost``, and connections other workers were relaying to
it close with 1012 (clients resume). (Under its old name the new process
would take them back itself, but every relay another worker had opened to
the dead process would wait forever: the node would never look lost.) The
first processes of a supervisor started again with the same ``--node-id``
take back what the previous run left, like any node. A worker that keeps
dying right after it starts is restarted less and less often (up to every 10 s).

SIGTERM and SIGINT are passed on to every worker (SIGTERM: each drains);
the supervisor exits once they all have. Each worker answers ``/healthz``,
``/readyz`` and ``/metrics`` for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import secrets
import signal
import socket
import sys
import time

from .. import __version__
from ..config import ServerConfig

__all__ = ["reserve_port", "supervise", "worker_argv"]

#: A worker that lived less than this was restarted too soon: back off.
STEADY_S = 10.0
MAX_BACKOFF_S = 10.0
READY_TIMEOUT_S = 60.0


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port) with SO_REUSEPORT,
    never listening: it holds the port for the workers, across restarts."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def worker_argv(serve_args: list[str], port: int, name: str) -> list[str]:
    """The command line of one worker: the supervisor's own, with the shared
    port and the worker's node name (later flags win)."""
    return [
        sys.executable, "-m", "wsserver", "serve", *serve_args,
        "--workers", "1", "--port", str(port), "--reuse-port", "--node-id", name,
    ]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the worker gets SIGTERM if the supervisor dies (no orphan keeps the port)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Worker:
    """One worker process: started, restarted, its output passed on with a ``[wN]`` prefix."""

    def __init__(self, index: int, base: str, serve_args: list[str], port: int) -> None:
        self.index = index
        self.base = f"{base}-w{index}"
        self.serve_args = serve_args
        self.port = port
        self.starts = 0
        self.name = self.base
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.started_at = 0.0
        self.backoff = 0.0
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.ready.clear()
        self.started_at = time.monotonic()
        self.name = self.base if not self.starts else f"{self.base}r{self.starts}"
        self.starts += 1
        self.proc = await asyncio.create_subprocess_exec(
            *worker_argv(self.serve_args, self.port, self.name),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self._pump = asyncio.get_running_loop().create_task(self._pass_on(self.proc))
        print(f"wsserver: worker w{self.index} started (pid {self.proc.pid}, node {self.name})", flush=True)

    async def _pass_on(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            print(f"[w{self.index}] {text}", flush=True)
            if "listening on" in text:
                self.ready.set()

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 5)
        return code

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


async def supervise(config: ServerConfig, serve_args: list[str]) -> int:
    """Run ``config.workers`` workers until SIGTERM or SIGINT; returns the exit code."""
    reserved = reserve_port(config.host, config.port)
    port = reserved.getsockname()[1]
    base = config.node_id or "n-" + secrets.token_hex(3)
    workers = [Worker(i, base, serve_args, port) for i in range(1, config.workers + 1)]
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        stopping.set()
        for worker in workers:  # (a second signal is passed on too: it cuts a drain short)
            worker.signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        for worker in workers:
            await worker.start()
        if not await _all_ready(workers, stopping):
            print("wsserver: the workers did not start; stopping", file=sys.stderr, flush=True)
            on_signal(signal.SIGTERM)
            await asyncio.gather(*(w.wait() for w in workers))
            return 1
        print(
            f"wsserver {__version__} listening on ws://{config.host}:{port}/ with {len(workers)} workers "
            f"(nodes {base}-w1…w{len(workers)} on the Redis backplane); Ctrl-C stops",
            flush=True,
        )
        await asyncio.gather(*(_keep_running(w, stopping) for w in workers))
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        reserved.close()


async def _all_ready(workers: list[Worker], stopping: asyncio.Event) -> bool:
    waits = [asyncio.ensure_future(w.ready.wait()) for w in workers]
    exits = [asyncio.ensure_future(w.wait()) for w in workers]
    stop = asyncio.ensure_future(stopping.wait())
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            while not all(w.done() for w in waits):
                await asyncio.wait([*waits, *exits, stop], return_when=asyncio.FIRST_COMPLETED)
                if stop.done() or any(e.done() for e in exits):
                    return False
        return True
    except TimeoutError:
        return False
    finally:
        for future in (*waits, *exits, stop):
            future.cancel()


async def _keep_running(worker: Worker, stopping: asyncio.Event) -> None:
    """Restart ``worker`` whenever it exits, until the supervisor stops."""
    while True:
        code = await worker.wait()
        if stopping.is_set():
            return
        lived = time.monotonic() - worker.started_at
        worker.backoff = 0.0 if lived >= STEADY_S else min(MAX_BACKOFF_S, max(0.5, worker.backoff * 2))
        how = f"signal {-code}" if code < 0 else f"code {code}"
        print(
            f"wsserver: worker w{worker.index} (node {worker.name}) exited with {how} after {lived:.1f} s; "
            f"restarting{f' in {worker.backoff:g} s' if worker.backoff else ''}",
            file=sys.stderr,
            flush=True,
        )
        if worker.backoff:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), worker.backoff)
            if stopping.is_set():
                return
        await worker.start()
