"""The command line, run in subprocesses on 127.0.0.1 with free ports."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from wsserver import __version__

PY = [sys.executable, "-m", "wsserver"]
SERVE_FAST = ["--sim-tokens-per-s", "0", "--sim-ttft-ms", "0", "--ping-interval", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSSERVER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class ServerProcess:
    """``wsserver serve`` in a subprocess; stdout lines are read by a thread."""

    def __init__(self, port: int, args: list[str], env: dict[str, str]) -> None:
        self.port = port
        self.stderr = tempfile.TemporaryFile()  # never a pipe nobody drains
        self.proc = subprocess.Popen(
            [*PY, "serve", "--port", str(port), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            self.stdout.append(line)
            self.lines.put(line)

    def wait_for_line(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stderr.seek(0)
                raise AssertionError(
                    f"no line with {needle!r} in {timeout} s; stdout {self.stdout!r}, "
                    f"stderr {self.stderr.read().decode(errors='replace')!r}"
                )
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if needle in line:
                return line

    def stop(self, sig: int, timeout: float = 5.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._thread.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


@contextlib.contextmanager
def serve(*args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    port = free_port()
    srv = ServerProcess(port, [*SERVE_FAST, *args], env if env is not None else _env())
    try:
        srv.wait_for_line("listening")
        yield srv
    finally:
        srv.kill()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:  # noqa: S310
        return resp.status, resp.read()


def welcome_of(port: int) -> dict[str, Any]:
    """Say hello over a minimal client in this process (sync websockets API)."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/", open_timeout=5, close_timeout=2) as ws:
        ws.send(json.dumps({"type": "hello", "protocol": 1}))
        return json.loads(ws.recv(timeout=5))  # type: ignore[no-any-return]


# ------------------------------------------------------------------ tests


def test_version() -> None:
    out = subprocess.run([*PY, "--version"], capture_output=True, text=True, timeout=30, env=_env())
    assert out.returncode == 0
    assert out.stdout.strip() == f"wsserver {__version__}" == "wsserver 0.1.0"


def test_no_command_prints_help() -> None:
    out = subprocess.run(PY, capture_output=True, text=True, timeout=30, env=_env())
    assert out.returncode == 2
    assert "serve" in out.stdout and "chat" in out.stdout


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_prints_url_answers_and_stops_on_signal(sig: int, loop: str) -> None:
    with serve("--loop", loop) as srv:
        line = next(l for l in srv.stdout if "listening" in l)
        assert f"ws://127.0.0.1:{srv.port}/" in line
        assert __version__ in line
        assert ("loop asyncio" in line) == (loop == "asyncio")
        assert http_get(srv.port, "/healthz") == (200, b"OK\n")
        welcome = welcome_of(srv.port)
        assert welcome["type"] == "welcome" and welcome["limits"]["max_streams"] == 8
        t0 = time.monotonic()
        assert srv.stop(sig, timeout=10) == 0
        assert time.monotonic() - t0 < 5
        srv.wait_for_line("stopping", timeout=2)
        with pytest.raises(OSError):
            http_get(srv.port, "/healthz")


def test_env_max_streams_honoured() -> None:
    with serve(env=_env(WSSERVER_MAX_STREAMS="1")) as srv:
        assert welcome_of(srv.port)["limits"]["max_streams"] == 1


def test_flag_overrides_env() -> None:
    with serve("--max-streams", "3", env=_env(WSSERVER_MAX_STREAMS="1")) as srv:
        assert welcome_of(srv.port)["limits"]["max_streams"] == 3


def test_env_port_honoured() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*PY, "serve", *SERVE_FAST],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=_env(WSSERVER_PORT=str(port)),
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert http_get(port, "/healthz")[0] == 200
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate(timeout=5)


def test_invalid_env_value() -> None:
    out = subprocess.run(
        [*PY, "serve", *SERVE_FAST],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(WSSERVER_PORT="abc"),
    )
    assert out.returncode != 0
    assert "WSSERVER_PORT" in out.stderr
    assert "abc" in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_flag_value() -> None:
    out = subprocess.run(
        [*PY, "serve", "--port", "abc"], capture_output=True, text=True, timeout=30, env=_env()
    )
    assert out.returncode == 2
    assert "--port" in out.stderr


def run_chat(port: int, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``wsserver chat`` against 127.0.0.1:port; ``kwargs`` go to subprocess.run (input/stdin)."""
    return subprocess.run(
        [*PY, "chat", f"ws://127.0.0.1:{port}/", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(),
        **kwargs,
    )


def test_chat_with_piped_stdin() -> None:
    with serve() as srv:
        out = run_chat(srv.port, input="hello there\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(l.startswith("connected to") for l in lines), out.stdout
    assert any(l.startswith('You said "hello there"') for l in lines), out.stdout
    summary = [l for l in lines if l.startswith("[complete ·")]
    assert len(summary) == 1, out.stdout
    assert "out tokens" in summary[0]


def test_chat_with_stdin_from_a_file(tmp_path: Any) -> None:
    script = tmp_path / "script.txt"
    script.write_text("from a file\n")
    with serve() as srv, script.open("rb") as stdin:
        out = run_chat(srv.port, stdin=stdin)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(l.startswith('You said "from a file"') for l in lines), out.stdout
    assert sum(l.startswith("[complete ·") for l in lines) == 1


def test_chat_two_turns_and_max_tokens() -> None:
    with serve() as srv:
        out = run_chat(srv.port, "--max-tokens", "4", input="first\n\nsecond\n")
    assert out.returncode == 0, out.stderr
    summary = [l for l in out.stdout.splitlines() if l.startswith("[")]
    assert len(summary) == 2, out.stdout  # the empty line is skipped
    assert all(l.startswith("[length · ") and "/ 4 out tokens" in l for l in summary)
    assert 'You said "first' in out.stdout and 'You said "second' in out.stdout


def test_chat_without_server() -> None:
    port = free_port()
    out = run_chat(port, input="hello\n")
    assert out.returncode == 1
    assert "cannot connect" in out.stderr
    assert str(port) in out.stderr
    assert "Traceback" not in out.stderr
