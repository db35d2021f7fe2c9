"""Servers under test and load-generator processes.

Every child is bounded: it dies with the harness (parent-death signal) and by
itself after its lifetime (an alarm), see ``bench._exec``. A server's CPU time
(user + system) and RSS are read from its own process with psutil.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import re
import signal
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

REPO = Path(__file__).resolve().parent.parent
READY_RE = re.compile(rb"listening on ws://127\.0\.0\.1:(\d+)/")


class BenchError(RuntimeError):
    pass


@dataclass
class ServerSpec:
    name: str
    label: str
    kind: str  # how load generators talk to it: wsserver | wsserver-sse | ws | sse
    argv: list[str]


#: Admission limits that would refuse the benchmark's own load (it opens up to
#: 10,000 connections from one address and starts hundreds of generations a
#: second). Each is passed only if this wsserver has the flag.
LIMITS_OFF = [
    ("--generate-rate", "0"),
    ("--message-rate", "0"),
    ("--token-rate", "0"),
    ("--max-connections", "100000"),
    ("--max-connections-per-ip", "0"),
    ("--drain-timeout", "1"),  # stop quickly at the end of a scenario
]


def wsserver_argv() -> list[str]:
    py = sys.executable
    # the command of the issue; --log-level warning keeps the logs quiet
    argv = [py, "-m", "wsserver", "serve", "--port", "0", "--sim-tokens-per-s", "0", "--sim-ttft-ms", "0",
            "--ping-interval", "0", "--publish-rate", "0", "--loop", "uvloop", "--log-level", "warning"]
    try:
        out = subprocess.run([py, "-m", "wsserver", "serve", "--help"], capture_output=True, text=True,
                             timeout=60, cwd=REPO, env=child_env()).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", out))
    for flag, value in LIMITS_OFF:
        if flag in flags:
            argv += [flag, value]
    return argv


def server_specs(tokens_file: Path) -> dict[str, ServerSpec]:
    py = sys.executable
    tok = ["--tokens", str(tokens_file)]
    return {
        "wsserver": ServerSpec("wsserver", "wsserver (ours)", "wsserver", wsserver_argv()),
        # the same server, its HTTP transport (GET /v1/events + POST /v1/send)
        "wsserver-sse": ServerSpec("wsserver-sse", "wsserver over SSE (ours)", "wsserver-sse", wsserver_argv()),
        "raw": ServerSpec("raw", "raw websockets", "ws", [py, "-m", "bench.baselines.raw_ws", *tok]),
        "sse": ServerSpec("sse", "FastAPI + SSE", "sse", [py, "-m", "bench.baselines.sse", *tok]),
        "naive": ServerSpec("naive", "naive FastAPI WS", "ws", [py, "-m", "bench.baselines.naive_ws", *tok]),
    }


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONASYNCIODEBUG", None)
    return env


class ServerProc:
    """One server under test, started with ``bench._exec`` (bounded life)."""

    def __init__(self, spec: ServerSpec, logdir: Path, lifetime: float) -> None:
        self.spec = spec
        self.logdir = logdir
        self.lifetime = lifetime
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.port = 0
        self.log = logdir / f"server-{spec.name}-{int(time.time() * 1000) % 10**8}.log"

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self, timeout: float = 60.0) -> ServerProc:
        argv = [sys.executable, "-m", "bench._exec", str(int(self.lifetime)), *self.spec.argv]
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO, env=child_env(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = READY_RE.search(self.log.read_bytes())
            if m:
                self.port = int(m.group(1))
                self.ps = psutil.Process(self.proc.pid)
                return self
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        tail = self.log.read_bytes()[-2000:].decode(errors="replace")
        await self.stop()
        raise BenchError(f"server {self.name} did not start:\n{tail}")

    def processes(self) -> list[psutil.Process]:
        """The server's process and its children (the workers of ``--workers``)."""
        assert self.ps is not None
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.Error:
            return [self.ps]

    def cpu(self) -> float:
        """CPU seconds (user + system) of all the server's threads (its workers' too).

        From ``/proc/PID/task/*/schedstat`` (nanoseconds) where the kernel has
        it; psutil's ``cpu_times`` counts in 10 ms ticks, too coarse for
        sub-second phases.
        """
        total = 0.0
        for ps in self.processes():
            try:
                ns = 0
                for task in os.listdir(f"/proc/{ps.pid}/task"):
                    with open(f"/proc/{ps.pid}/task/{task}/schedstat") as f:
                        ns += int(f.read().split()[0])
                total += ns / 1e9
            except (OSError, ValueError, IndexError):
                with contextlib.suppress(psutil.Error):
                    t = ps.cpu_times()
                    total += t.user + t.system
        return total

    def cpu_split(self) -> tuple[float, float]:
        user = system = 0.0
        for ps in self.processes():
            with contextlib.suppress(psutil.Error):
                t = ps.cpu_times()
                user, system = user + t.user, system + t.system
        return user, system

    def rss(self) -> int:
        total = 0
        for ps in self.processes():
            with contextlib.suppress(psutil.Error):
                total += int(ps.memory_info().rss)
        return total

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def quiesce(self, max_wait: float = 30.0, window: float = 0.3, busy: float = 0.2) -> float:
        """Wait until the server uses < ``busy`` of a core over ``window`` s; returns the wait.

        Not 0: an idle wsserver with thousands of connections still spends
        ~1 % of a core per 1,000 connections in its 250 ms slow-consumer check.
        """
        t0 = time.monotonic()
        last = self.cpu()
        while time.monotonic() - t0 < max_wait:
            await asyncio.sleep(window)
            now = self.cpu()
            if now - last < busy * window:
                break
            last = now
        return time.monotonic() - t0

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(100):
            if self.proc.poll() is not None:
                return
            await asyncio.sleep(0.05)
        self.proc.kill()
        self.proc.wait()


async def start_servers(specs: list[ServerSpec], logdir: Path, lifetime: float) -> dict[str, ServerProc]:
    procs = [ServerProc(s, logdir, lifetime) for s in specs]
    try:
        await asyncio.gather(*(p.start() for p in procs))
    except BaseException:
        await asyncio.gather(*(p.stop() for p in procs))
        raise
    return {p.name: p for p in procs}


class LoadGen:
    """One ``python -m bench.loadgen`` process, driven by lines on its stdin."""

    def __init__(self, spec: dict[str, Any], logdir: Path) -> None:
        self.spec = spec
        self.log = logdir / f"loadgen-{spec['name']}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, lifetime: float) -> LoadGen:
        env = child_env()
        env["BENCH_LIFETIME"] = str(int(lifetime))
        with open(self.log, "wb") as logf:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.loadgen",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=logf,
                cwd=REPO, env=env, limit=1 << 24,
            )
        self.send(orjson.dumps(self.spec).decode())
        return self

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    async def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.proc.stdout.readline()
                    if not raw:
                        raise BenchError(f"load generator {self.spec['name']} exited:\n{self.tail()}")
                    head, _, body = raw.decode().partition(" ")
                    if head == tag:
                        return orjson.loads(body)  # type: ignore[no-any-return]
                    if head == "ERROR":
                        raise BenchError(f"load generator {self.spec['name']}: {body.strip()}\n{self.tail()}")
        except TimeoutError:
            raise BenchError(f"load generator {self.spec['name']}: no {tag} within {timeout:.0f} s") from None

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-1500:].decode(errors="replace")
        return ""

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


@dataclass
class Phase:
    """What a measured phase gives back."""

    results: list[dict[str, Any]]
    cpu_s: float
    user_s: float
    sys_s: float
    wall_s: float
    setup_s: float
    quiesce_s: float
    rss: int
    extra: dict[str, Any] = field(default_factory=dict)


async def run_phase(
    server: ServerProc,
    specs: list[dict[str, Any]],
    *,
    logdir: Path,
    setup_timeout: float,
    run_timeout: float,
    quiesce_max: float = 10.0,
    profile: Path | None = None,
    window: Any = None,
) -> Phase:
    """Start load generators, wait for READY, quiesce, ``go``, collect RESULTs."""
    lifetime = setup_timeout + quiesce_max + run_timeout + 60
    gens = [LoadGen(s, logdir) for s in specs]
    t_setup = time.monotonic()
    spy: subprocess.Popen[bytes] | None = None
    ok = False
    try:
        await asyncio.gather(*(g.start(lifetime) for g in gens))
        await asyncio.gather(*(g.expect("READY", setup_timeout) for g in gens))
        setup_s = time.monotonic() - t_setup
        quiesce_s = await server.quiesce(quiesce_max)
        if profile is not None:
            spy = start_profiler(server, profile)
        u0, s0 = server.cpu_split()
        c0 = server.cpu()
        t0 = time.monotonic()
        if window is not None:  # window(): called at "go" and again when the results are in
            window()
        for g in gens:
            g.send("go")
        results = list(await asyncio.gather(*(g.expect("RESULT", run_timeout + 30) for g in gens)))
        wall = time.monotonic() - t0
        if window is not None:
            window()
        c1 = server.cpu()
        u1, s1 = server.cpu_split()
        rss = server.rss()
        ok = True
    finally:
        if spy is not None:
            stop_profiler(spy)
        if not ok:
            for g in gens:
                g.kill()
        await asyncio.gather(*(g.stop() for g in gens))
    return Phase(results, c1 - c0, u1 - u0, s1 - s0, wall, setup_s, quiesce_s, rss)


# ----------------------------------------------------------------- profiling


def py_spy() -> str | None:
    cand = Path(sys.executable).parent / "py-spy"
    if cand.exists():
        return str(cand)
    from shutil import which

    return which("py-spy")


def start_profiler(server: ServerProc, out: Path) -> subprocess.Popen[bytes] | None:
    exe = py_spy()
    if exe is None or server.proc is None:
        return None
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(server.proc.pid), "--rate", "250", "--format", "raw",
         "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attach before the load starts
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------- samples


def read_samples(paths: list[str]) -> list[float]:
    out = array("d")
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        chunk = array("d")
        chunk.frombytes(data)
        out.extend(chunk)
    return sorted(out)


def pct(sorted_values: list[float], q: float) -> float | None:
    """Percentile ``q`` (0-100) of sorted values, linear interpolation."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def median(values: list[float]) -> float | None:
    return pct(sorted(values), 50)


# ------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("websockets", "uvloop", "orjson", "pydantic", "fastapi", "starlette",
                "sse-starlette", "uvicorn", "aiohttp", "psutil", "matplotlib"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    commit = dirty = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "wsserver"], cwd=REPO,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": commit,
        "wsserver_dirty": dirty,
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
