"""Shared fixtures: an in-process server on 127.0.0.1, a raw JSON client, a redis-server.

The helpers they use (and tests import) are in ``tests/helpers.py``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import settings
from websockets.asyncio.client import connect

from tests.helpers import TEST_CONFIG, RawClient, RedisProcess
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
