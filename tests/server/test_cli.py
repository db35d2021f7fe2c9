"""The command line, run in subprocesses on 127.0.0.1 with free ports."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import pytest

from wsserver import __version__

from tests.helpers import PY, SERVE_FAST, clean_env, free_port, http_get, serve, welcome_of


# ------------------------------------------------------------------ tests


def test_version() -> None:
    out = subprocess.run([*PY, "--version"], capture_output=True, text=True, timeout=30, env=clean_env())
    assert out.returncode == 0
    assert out.stdout.strip() == f"wsserver {__version__}" == "wsserver 0.1.0"


def test_no_command_prints_help() -> None:
    out = subprocess.run(PY, capture_output=True, text=True, timeout=30, env=clean_env())
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
    with serve(env=clean_env(WSSERVER_MAX_STREAMS="1")) as srv:
        assert welcome_of(srv.port)["limits"]["max_streams"] == 1


def test_flag_overrides_env() -> None:
    with serve("--max-streams", "3", env=clean_env(WSSERVER_MAX_STREAMS="1")) as srv:
        assert welcome_of(srv.port)["limits"]["max_streams"] == 3


def test_env_port_honoured() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*PY, "serve", *SERVE_FAST],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=clean_env(WSSERVER_PORT=str(port)),
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
        env=clean_env(WSSERVER_PORT="abc"),
    )
    assert out.returncode != 0
    assert "WSSERVER_PORT" in out.stderr
    assert "abc" in out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_flag_value() -> None:
    out = subprocess.run(
        [*PY, "serve", "--port", "abc"], capture_output=True, text=True, timeout=30, env=clean_env()
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
        env=clean_env(),
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
