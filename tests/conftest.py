"""Shared fixtures: an in-process server on 127.0.0.1 and a raw JSON client."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from hypothesis import settings
from websockets.asyncio.client import ClientConnection, connect

from wsserver.config import ServerConfig
from wsserver.server import Server

# Hypothesis profiles (README "Reliability"): the default run keeps
# hypothesis' example counts (the fuzz tests take seconds);
# HYPOTHESIS_PROFILE=long runs 20x the examples and 4x longer stateful runs
# (give it time: `--timeout 0`).
# No deadline: a 2-core CI machine under load must not fail a test on timing.
settings.register_profile("quick", deadline=None)
settings.register_profile("long", deadline=None, max_examples=2000, stateful_step_count=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

#: Fast defaults for tests: unpaced simulated provider, no keepalive pings.
TEST_CONFIG = {
    "host": "127.0.0.1",
    "port": 0,
    "sim_tokens_per_s": 0.0,
    "sim_ttft_ms": 0.0,
    "ping_interval": 0.0,
}


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    """Async tests run on asyncio; those marked ``both_loops`` on uvloop too."""
    if item.get_closest_marker("both_loops"):
        import uvloop

        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def make_server() -> Callable[..., Any]:
    """``async with make_server(max_streams=2) as server: ...``"""

    def factory(**overrides: Any) -> Server:
        return Server(ServerConfig(**{**TEST_CONFIG, **overrides}))

    return factory


@pytest.fixture
async def server(make_server: Callable[..., Server]) -> AsyncIterator[Server]:
    async with make_server() as srv:
        yield srv


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


@pytest.fixture
def raw_client(server: Server) -> Callable[..., Any]:
    """``async with raw_client() as c: await c.hello()`` against the test server."""

    class _Ctx:
        def __init__(self, hello: bool = False, **kwargs: Any) -> None:
            self._hello = hello
            self._kwargs = kwargs

        async def __aenter__(self) -> RawClient:
            self._cm = connect(server.url, compression=None, **self._kwargs)
            client = RawClient(await self._cm.__aenter__())
            if self._hello:
                await client.hello()
            return client

        async def __aexit__(self, *exc: Any) -> None:
            await self._cm.__aexit__(*exc)

    return _Ctx


USER_HI = [{"role": "user", "content": "hi"}]


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


@pytest.fixture
def redis_server(tmp_path: Any) -> Any:
    """A real redis-server for this test; skipped when the binary is absent (a failure under CI=true)."""
    import os
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed, and CI=true: .ci/run installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisProcess(binary, str(tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.stop()
