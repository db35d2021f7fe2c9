"""The transport pump with an in-process fake connection (no network)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.protocol import State

from tests.helpers import until
from wsserver.config import ServerConfig
from wsserver.server import Server
from wsserver.server.connection import MAX_BACKLOG, Connection


class FakeProtocol:
    """What ``broadcast()`` uses of the sans-I/O protocol: the transport writes
    inline through it while the socket takes data without waiting."""

    def __init__(self, ws: FakeWebSocket) -> None:
        self.ws = ws
        self.state = State.OPEN

    def send_text(self, frame: bytes) -> None:
        self.ws.sent.append(frame)


class FakeWebSocket:
    """Serves queued frames to recv(); send() can be made to block (a reader
    that stalls: after the first frame, the socket stays paused too)."""

    def __init__(self, frames: list[str], *, stall_sends: bool = False) -> None:
        self.frames = list(frames)
        self.received = 0
        self.sent: list[bytes] = []
        self.stall = asyncio.Event() if stall_sends else None
        self.exhausted = asyncio.Event()
        self.protocol = FakeProtocol(self)
        self.send_in_progress = None

    @property
    def paused(self) -> bool:  # the write buffer is above write_limit
        return self.stall is not None and not self.stall.is_set() and bool(self.sent)

    def send_data(self) -> None:
        pass

    async def recv(self) -> str:
        if not self.frames:
            self.exhausted.set()
            await asyncio.Event().wait()  # block until cancelled
        self.received += 1
        return self.frames.pop(0)

    async def send(self, frame: bytes, text: bool = True) -> None:
        if self.stall is not None and self.sent:
            await self.stall.wait()
        self.sent.append(frame)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


def new_connection(ws: Any) -> Connection:
    # no rate limit or abuse threshold: these tests flood the connection on purpose
    config = ServerConfig(port=0, sim_tokens_per_s=0, sim_ttft_ms=0, message_rate=0, abuse_threshold=0)
    return Connection(Server(config), ws, None)


async def test_frames_leave_in_seq_order_while_streams_run_concurrently() -> None:
    hello = '{"type":"hello","protocol":1}'
    gens = [
        orjson.dumps({"type": "generate", "messages": [{"role": "user", "content": f"q{i}"}], "params": {"reply_tokens": 200}}).decode()
        for i in range(4)
    ]
    ws = FakeWebSocket([hello, *gens])
    conn = new_connection(ws)
    task = asyncio.ensure_future(conn.run())
    async with asyncio.timeout(10):
        while sum(orjson.loads(f)["type"] == "stream.end" for f in ws.sent) < 4:
            await asyncio.sleep(0.01)
    task.cancel()
    frames = [orjson.loads(f) for f in ws.sent[1:]]
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))


async def test_reader_pauses_when_the_writer_cannot_keep_up() -> None:
    hello = '{"type":"hello","protocol":1}'
    ws = FakeWebSocket([hello] + ["not json"] * (MAX_BACKLOG * 3), stall_sends=True)
    conn = new_connection(ws)
    task = asyncio.ensure_future(conn.run())
    # the first batch (welcome + answers up to the limit, produced before any
    # write) went out inline; then the socket is paused, the writer stalls
    # and the reader stops at the limit again
    await until(lambda: conn.proto.backlog >= MAX_BACKLOG, timeout=5)
    before = ws.received
    for _ in range(50):  # the reader had every chance to read on: it did not
        await asyncio.sleep(0)
    assert ws.received == before
    assert ws.received <= 2 * MAX_BACKLOG + 2
    assert conn.proto.backlog <= MAX_BACKLOG + 1
    assert ws.stall is not None
    ws.stall.set()  # the client reads again: everything is answered, nothing lost
    async with asyncio.timeout(10):
        await ws.exhausted.wait()
        while len(ws.sent) < 1 + MAX_BACKLOG * 3:
            await asyncio.sleep(0.01)
    task.cancel()
    errors = [orjson.loads(f) for f in ws.sent[1:]]
    assert {e["code"] for e in errors} == {"bad_json"}
    assert [e["seq"] for e in errors] == list(range(1, MAX_BACKLOG * 3 + 1))
