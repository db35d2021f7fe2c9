"""What many tests share: a raw JSON client, a fake clock, free ports,
bounded waits on a condition, a throw-away redis-server, and ``wsserver
serve`` in a subprocess. Fixtures built on them are in ``conftest.py``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection

__all__ = [
    "PY",
    "SERVE_FAST",
    "TEST_CONFIG",
    "USER_HI",
    "FakeClock",
    "RawClient",
    "RedisProcess",
    "SseClosed",
    "SseRaw",
    "ServerProcess",
    "clean_env",
    "free_port",
    "http_get",
    "serve",
    "until",
    "welcome_of",
]

USER_HI = [{"role": "user", "content": "hi"}]

#: Fast defaults for tests: unpaced simulated provider, no keepalive pings.
TEST_CONFIG = {
    "host": "127.0.0.1",
    "port": 0,
    "sim_tokens_per_s": 0.0,
    "sim_ttft_ms": 0.0,
    "ping_interval": 0.0,
}



class FakeClock:
    """A clock that moves only when a test moves it (``clock.now += 5``)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> None:
    """Wait (bounded) until ``condition()`` is true; the assertion after the
    wait says what failed, so this never raises itself."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition() and loop.time() < deadline:
        await asyncio.sleep(interval)


class RawClient:
    """A thin JSON client for protocol tests: send dicts or raw text, read frames."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            await self.ws.send(orjson.dumps(message).decode())
        else:
            await self.ws.send(message)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return orjson.loads(await self.ws.recv())  # type: ignore[no-any-return]

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0, limit: int = 100_000
    ) -> list[dict[str, Any]]:
        """Frames up to and including the first one matching ``predicate``."""
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            for _ in range(limit):
                frame = orjson.loads(await self.ws.recv())
                frames.append(frame)
                if predicate(frame):
                    return frames
        raise AssertionError(f"no matching frame in {limit} frames")

    async def hello(self, **fields: Any) -> dict[str, Any]:
        await self.send({"type": "hello", "protocol": 1, **fields})
        welcome = await self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome


class SseRaw:
    """The HTTP transport's counterpart of :class:`RawClient`: one ``GET
    /v1/events`` stream read event by event, frames sent by ``POST /v1/send``.

    ``recv()`` gives the next frame (its SSE ``id`` is kept in ``ids``); a
    ``close`` event sets ``close_code``/``close_reason`` and raises
    :class:`SseClosed`.
    """

    def __init__(self, http: Any, base: str, response: Any) -> None:
        self.http = http
        self.base = base
        self.response = response
        self._lines = response.aiter_lines()
        self.token = ""
        self.ids: list[int | None] = []
        self.comments = 0
        self.close_code: int | None = None
        self.close_reason = ""

    @classmethod
    async def open(cls, base: str, *, headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
                   expect: int = 200) -> Any:
        """Open a stream; with ``expect`` other than 200 return the refused response."""
        import httpx2

        http = httpx2.AsyncClient(timeout=httpx2.Timeout(10.0, read=None))
        request = http.build_request("GET", base + "/v1/events", headers=headers or {}, params=params or {})
        response = await http.send(request, stream=True)
        assert response.status_code == expect, (response.status_code, await response.aread())
        if expect != 200:
            await response.aread()
            await http.aclose()
            return response
        client = cls(http, base, response)
        name, _, data = await client.event()
        assert name == "connection", (name, data)
        client.token = data["connection"]
        return client

    async def event(self, timeout: float = 5.0) -> tuple[str, int | None, Any]:
        """The next SSE event: (name, id, decoded data)."""
        name, event_id, data = "message", None, []
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if not line:
                    if data:
                        return name, event_id, orjson.loads("\n".join(data))
                    continue
                if line.startswith(":"):
                    self.comments += 1
                    continue
                field, _, value = line.partition(": ")
                if field == "data":
                    data.append(value)
                elif field == "event":
                    name = value
                elif field == "id":
                    event_id = int(value)
        raise SseClosed(None, "the stream ended without a close event")

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        name, event_id, data = await self.event(timeout)
        if name == "close":
            self.close_code, self.close_reason = data["code"], data["reason"]
            raise SseClosed(data["code"], data["reason"])
        assert name == "message", (name, data)
        self.ids.append(event_id)
        return data  # type: ignore[no-any-return]

    async def recv_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                         limit: int = 100_000) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            for _ in range(limit):
                frame = await self.recv(timeout)
                frames.append(frame)
                if predicate(frame):
                    return frames
        raise AssertionError(f"no matching frame in {limit} frames")

    async def post(self, body: bytes | dict[str, Any] | list[Any], *, token: str | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        params = {"connection": self.token if token is None else token}
        return await self.http.post(self.base + "/v1/send", params=params, content=content, headers=headers or {})

    async def send(self, message: dict[str, Any] | list[Any] | bytes) -> None:
        response = await self.post(message)
        assert response.status_code == 202, (response.status_code, response.text)

    async def hello(self, **fields: Any) -> dict[str, Any]:
        await self.send({"type": "hello", "protocol": 1, **fields})
        welcome = await self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome

    async def aclose(self) -> None:
        await self.response.aclose()
        await self.http.aclose()


class SseClosed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class RedisProcess:
    """A throw-away ``redis-server`` on 127.0.0.1 (no persistence), restartable on its port."""

    def __init__(self, binary: str, directory: str) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.binary = binary
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Any = None

    def start(self) -> None:
        import subprocess
        import time

        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.directory],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


PY = [sys.executable, "-m", "wsserver"]
SERVE_FAST = ["--sim-tokens-per-s", "0", "--sim-ttft-ms", "0", "--ping-interval", "0"]


def clean_env(**extra: str) -> dict[str, str]:
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
    srv = ServerProcess(port, [*SERVE_FAST, *args], env if env is not None else clean_env())
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
