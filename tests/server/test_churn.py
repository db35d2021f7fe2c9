"""What a closed connection leaves behind under churn: nothing for the cyclic
garbage collector (server/connection.py ``WebSocket``), no task left pending."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from websockets.asyncio.client import connect

from tests.helpers import RawClient, until
from wsserver.server import Server

HI = [{"role": "user", "content": "x"}]
#: Server-side objects of a connection (the test's own client objects are garbage too).
SERVER_SIDE = {"ServerConnection", "WebSocket", "Front", "Connection", "ServerProtocol", "SessionRuntime", "Session"}


@pytest.fixture
async def server(make_server: Callable[..., Server]) -> AsyncIterator[Server]:
    """With Python's own collector: these tests leave garbage where it is and
    look at it themselves, which a paced server (``--gc paced``) would
    collect meanwhile."""
    async with make_server(gc="python") as srv:
        yield srv


@contextlib.contextmanager
def no_automatic_collection() -> Iterator[None]:
    """Garbage stays where it is until the test collects it itself."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cyclic_garbage(port: int) -> Counter[str]:
    """Types of the objects only the cyclic collector would free, by name
    (a transport as ``transport:server`` or ``transport:client``)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = Counter(_kind(o, port) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return found


def _kind(obj: object, port: int) -> str:
    if issubclass(type(obj), asyncio.BaseTransport):  # (not isinstance: a dead weak proxy raises)
        sockname = obj.get_extra_info("sockname")  # type: ignore[attr-defined]
        return "transport:server" if sockname and sockname[1] == port else "transport:client"
    return type(obj).__name__


@pytest.mark.both_loops
async def test_closed_connections_leave_no_cyclic_garbage(server: Server) -> None:
    """Before: about 60 objects per closed connection (websockets' protocol,
    transport, parser, subprotocol callback) waited for a full collection."""
    with no_automatic_collection():
        for i in range(6):
            ws = await connect(server.url, compression=None, subprotocols=["wsserver.v1"] if i % 2 else None)
            c = RawClient(ws)
            await c.hello()
            await c.send({"type": "generate", "messages": HI, "params": {"reply_tokens": 20}})
            await c.recv_until(lambda f: f["type"] == "stream.end")
            if i % 3 == 0:
                ws.transport.abort()  # dropped
            else:
                await ws.close()  # closed cleanly
        await until(lambda: not server.connections and server.sessions.parked == 6)
        await asyncio.sleep(0.05)  # (websockets' handler tasks finish)
        left = cyclic_garbage(server.port)
    assert not SERVER_SIDE & set(left), left.most_common(12)


async def test_a_violation_leaves_no_writer_task_pending(server: Server) -> None:
    """The error before a 4400 close used to wake a writer task after the
    connection had finished, which then waited forever (until collected)."""

    def writers() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if "_write_loop" in repr(t.get_coro())]

    with no_automatic_collection():
        for _ in range(3):
            async with connect(server.url, compression=None) as ws:
                await ws.send('{"type": "ping"}')  # not a hello
                with contextlib.suppress(Exception):
                    while True:
                        await ws.recv()
            assert ws.close_code == 4400
        await until(lambda: not server.connections and not writers())
        assert not writers()
