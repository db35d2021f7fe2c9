"""Fault injection on 127.0.0.1, each checked against one invariant:
nothing the client has processed is lost or doubled (seq contiguous from 1,
each stream's text exact, exactly one ``stream.end``), and no fault hangs.

* clients dropped (``transport.abort()``, no closing handshake) at random
  points, several times per stream, then resumed with ``last_seq``;
* a provider that errors, crashes, resets or stalls mid-stream;
* a slow reader (coalesced frames) and a stalled one (closed 1013, resumed);
* ``wsserver serve`` SIGKILLed and restarted on the same port: the memory
  backplane loses every session, so a resume gets ``welcome {resumed:
  false}`` and a fresh session (PROTOCOL.md 5.2, case 1: an unknown session
  gets no ``resume_failed``), and the Python client fails the lost stream
  with ``ConnectionLost`` instead of hanging.

Random points come from ``random.Random(seed)`` with the seed in the test id.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import wsserver
from tests.helpers import TEST_CONFIG, ServerProcess, clean_env, free_port, until
from wsserver.config import ServerConfig
from wsserver.wire.errors import ConnectionLost
from wsserver.wire.messages import ChatMessage
from wsserver.providers import Providers, SimulatedProvider, simulated_reply
from wsserver.providers.base import (
    Finish,
    GenerationRequest,
    Provider,
    ProviderEvent,
    ProviderFailure,
    TextDelta,
    UsageReport,
)
from wsserver.server import Server

FAULTS = {"error", "crash", "reset", "stall"}


class FaultyProvider(Provider):
    """Tokens ``t0 t1 …``; the model ``"<fault>-<n>"`` fails after n tokens:

    * ``error``: a ProviderFailure (what the real adapters raise on an
      upstream 5xx or a dropped SSE stream): ``error provider_error``;
    * ``crash``: an unexpected exception: ``error internal``;
    * ``reset``: ConnectionResetError escaping the provider: ``error internal``;
    * ``stall``: never yields again (until cancelled);
    * ``ok``: finishes after n tokens.
    """

    name = "faulty"
    default_model = "ok-20"

    def __init__(self, token_delay: float = 0.001) -> None:
        self.token_delay = token_delay
        self.open_upstreams = 0  # like an HTTP response still open
        self.stalled = asyncio.Event()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        fault, _, n = request.model.partition("-")
        self.open_upstreams += 1
        try:
            yield UsageReport(input_tokens=3)
            for i in range(int(n)):
                await asyncio.sleep(self.token_delay)
                yield TextDelta(f"t{i} ", 1)
            if fault == "error":
                raise ProviderFailure("upstream said 503")
            if fault == "crash":
                raise RuntimeError("secret internal detail")
            if fault == "reset":
                raise ConnectionResetError(104, "Connection reset by peer")
            if fault == "stall":
                self.stalled.set()
                await asyncio.Event().wait()
            yield Finish("complete")
        finally:
            self.open_upstreams -= 1


def faulty_text(n: int) -> str:
    return "".join(f"t{i} " for i in range(n))


def sim_text(content: str, tokens: int) -> str:
    return "".join(simulated_reply([ChatMessage(role="user", content=content)], tokens))


def make(faulty: FaultyProvider | None = None, **overrides: Any) -> Server:
    providers = Providers(
        [SimulatedProvider(tokens_per_s=0, ttft_ms=0), faulty or FaultyProvider()], default="simulated"
    )
    return Server(ServerConfig(**{**TEST_CONFIG, **overrides}), providers=providers)


class Tracker:
    """A raw client that survives drops: it checks every frame as it arrives
    and resumes with ``last_seq`` on a new connection."""

    def __init__(self, server: Server) -> None:
        self.url = server.url
        self.ws: Any = None
        self.session: str | None = None
        self.last_seq = 0
        self.text: dict[str, str] = {}
        self.index: dict[str, int] = {}
        self.ends: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.drops = 0

    async def open(self, rcvbuf: int = 0) -> dict[str, Any]:
        sock = None
        if rcvbuf:  # a small receive window: a reader that stops is felt at once
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            host, port = self.url[len("ws://") :].rstrip("/").split(":")
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        self.ws = await connect(self.url, compression=None, max_size=None, max_queue=1, sock=sock)
        hello: dict[str, Any] = {"type": "hello", "protocol": 1}
        if self.session is not None:
            hello.update(session=self.session, last_seq=self.last_seq)
        await self.ws.send(orjson.dumps(hello).decode())
        while True:
            frame = orjson.loads(await asyncio.wait_for(self.ws.recv(), 10))
            if frame["type"] == "welcome":
                break
            assert frame["type"] == "error", frame
        if self.session is not None:
            assert frame["resumed"] and frame["session"] == self.session, frame
        self.session = frame["session"]
        return frame  # type: ignore[no-any-return]

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    def drop(self) -> None:
        self.ws.transport.abort()
        self.drops += 1

    def take(self, frame: dict[str, Any]) -> None:
        if "seq" in frame:
            assert frame["seq"] == self.last_seq + 1, ("seq gap or repeat", frame, self.last_seq)
            self.last_seq = frame["seq"]
        kind, sid = frame["type"], frame.get("stream")
        if frame.get("ref") is not None and kind in ("stream.start", "ok", "error"):
            self.replies.setdefault(frame["ref"], []).append(frame)
        if kind == "stream.start":
            assert sid not in self.text
            self.text[sid], self.index[sid] = "", 0
        elif kind == "stream.delta":
            assert sid not in self.ends, ("delta after end", frame)
            assert frame["index"] == self.index[sid]
            self.index[sid] += 1
            self.text[sid] += frame["text"]
        elif kind == "stream.end":
            assert sid not in self.ends, ("second stream.end", frame)
            self.ends[sid] = frame

    async def read_until(self, done: Any, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.take(orjson.loads(await self.ws.recv()))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


# ------------------------------------------------------------ client drops


@pytest.mark.parametrize("seed", range(12))
async def test_random_drops_mid_stream_lose_and_double_nothing(seed: int) -> None:
    rng = random.Random(seed)
    faulty = FaultyProvider(token_delay=0.0005)
    async with make(faulty) as server:
        client = Tracker(server)
        await client.open()
        expected: dict[str, str] = {}
        for k in range(3):  # three streams at once: two paced, one unpaced
            sid = f"s{k}"
            if k == 2:
                await client.send({"type": "generate", "id": f"r{k}", "stream": sid, "messages": [{"role": "user", "content": f"seed {seed}"}], "params": {"reply_tokens": 3000}})
                expected[sid] = sim_text(f"seed {seed}", 3000)
            else:
                n = rng.randint(50, 300)
                await client.send({"type": "generate", "id": f"r{k}", "stream": sid, "provider": "faulty", "model": f"ok-{n}", "messages": [{"role": "user", "content": "x"}]})
                expected[sid] = faulty_text(n)
        while len(client.ends) < 3:
            # read for a random while (maybe nothing), then drop without a close frame
            try:
                await client.read_until(lambda: len(client.ends) == 3, timeout=rng.uniform(0, 0.05))
            except TimeoutError:
                pass
            if len(client.ends) == 3:
                break
            client.drop()
            await asyncio.sleep(rng.uniform(0, 0.02))
            await client.open()
        for sid, text in expected.items():
            assert client.ends[sid]["reason"] == "complete"
            assert client.text[sid] == text
        for ref in ("r0", "r1", "r2"):
            assert len(client.replies[ref]) == 1
        await client.close()


async def test_drop_right_after_a_request_then_retry_acts_once() -> None:
    async with make() as server:
        client = Tracker(server)
        await client.open()
        await client.send({"type": "generate", "id": "g1", "stream": "a", "messages": [{"role": "user", "content": "x"}], "provider": "faulty", "model": "ok-30"})
        client.drop()  # the answer is lost on the wire, not in the session
        await client.open()
        await client.send({"type": "generate", "id": "g1", "stream": "a", "messages": [{"role": "user", "content": "x"}], "provider": "faulty", "model": "ok-30"})
        await client.read_until(lambda: "a" in client.ends and len(client.replies.get("g1", [])) == 2)
        first, retry = client.replies["g1"]
        assert first["type"] == "stream.start"
        assert retry["type"] == "error" and retry["code"] == "duplicate_request"
        assert client.text["a"] == faulty_text(30)
        await client.close()


# ---------------------------------------------------------- faulty provider


@pytest.mark.parametrize(
    ("fault", "code"), [("error", "provider_error"), ("crash", "internal"), ("reset", "internal")]
)
async def test_provider_failing_mid_stream_ends_it_once_with_its_code(fault: str, code: str) -> None:
    faulty = FaultyProvider()
    async with make(faulty) as server:
        client = Tracker(server)
        await client.open()
        await client.send({"type": "generate", "id": "g", "stream": "a", "provider": "faulty", "model": f"{fault}-25", "messages": [{"role": "user", "content": "x"}]})
        await client.send({"type": "generate", "id": "h", "stream": "b", "provider": "faulty", "model": "ok-40", "messages": [{"role": "user", "content": "x"}]})
        await client.read_until(lambda: len(client.ends) == 2)
        end = client.ends["a"]
        assert end["reason"] == "error" and end["error"]["code"] == code
        assert "secret" not in end["error"]["message"]
        assert client.text["a"] == faulty_text(25)  # everything before the fault
        assert end["usage"]["output_tokens"] == 25
        assert client.ends["b"]["reason"] == "complete" and client.text["b"] == faulty_text(40)
        await client.send({"type": "cancel", "id": "c", "stream": "b"})  # the session is unharmed
        await client.read_until(lambda: "c" in client.replies)
        assert client.replies["c"][0]["code"] == "unknown_stream"
        assert faulty.open_upstreams == 0
        await client.close()


async def test_stalled_provider_is_cancelled_and_closed() -> None:
    faulty = FaultyProvider()
    async with make(faulty) as server:
        client = Tracker(server)
        await client.open()
        await client.send({"type": "generate", "id": "g", "stream": "a", "provider": "faulty", "model": "stall-10", "messages": [{"role": "user", "content": "x"}]})
        await asyncio.wait_for(faulty.stalled.wait(), 10)
        client.drop()  # a drop during the stall cancels nothing
        await until(lambda: not server.connections)
        assert faulty.open_upstreams == 1
        await client.open()
        await client.send({"type": "cancel", "id": "c", "stream": "a"})
        await client.read_until(lambda: "a" in client.ends and "c" in client.replies)
        assert client.ends["a"]["reason"] == "cancelled"
        assert client.text["a"] == faulty_text(10)
        for _ in range(100):
            if faulty.open_upstreams == 0:
                break
            await asyncio.sleep(0.01)
        assert faulty.open_upstreams == 0  # the upstream was closed
        await client.close()


# ------------------------------------------------------------ slow readers


async def test_slow_reader_gets_every_token_in_fewer_frames() -> None:
    async with make() as server:
        async with connect(server.url, compression=None, max_queue=1) as ws:
            await ws.send('{"type":"hello","protocol":1}')
            await ws.recv()
            await ws.send(orjson.dumps({"type": "generate", "stream": "a", "messages": [{"role": "user", "content": "slow"}], "params": {"reply_tokens": 20000}}).decode())
            frames, text, seq = 0, "", 0
            async with asyncio.timeout(60):
                while True:
                    frame = orjson.loads(await ws.recv())
                    frames += 1
                    assert frame["seq"] == seq + 1
                    seq = frame["seq"]
                    if frame["type"] == "stream.delta":
                        text += frame["text"]
                    elif frame["type"] == "stream.end":
                        break
                    if frames % 50 == 0:
                        await asyncio.sleep(0.01)  # a reader that lags
            assert text == sim_text("slow", 20000)
            assert frames < 20000  # coalesced while the socket lagged


async def test_stalled_reader_is_closed_1013_and_resumes_intact() -> None:
    # a log big enough for the whole 1M-token stream (~6 MB, ~20k frames), and
    # an answer allowed that long (within max_stream_bytes it all fits in the
    # kernel's socket buffers: nothing stalls)
    big_log = {"replay_max_messages": 100_000, "replay_max_bytes": 64 << 20, "max_stream_bytes": 64 << 20}
    async with make(slow_consumer_bytes=256 * 1024, close_timeout=1.0, **big_log) as server:
        client = Tracker(server)
        await client.open(rcvbuf=4096)
        await client.send({"type": "generate", "id": "g", "stream": "a", "messages": [{"role": "user", "content": "stall"}], "params": {"reply_tokens": 1_000_000}})
        # (on a busy machine the 1013 may come before three deltas were read)
        with contextlib.suppress(ConnectionClosed):
            await client.read_until(lambda: client.index.get("a", 0) >= 3)
        # stop reading: the server buffers, then gives up on this socket
        async with asyncio.timeout(30):
            while server.stats["slow_consumer_disconnects"] == 0:
                await asyncio.sleep(0.05)
        async with asyncio.timeout(10):  # aborted after close_timeout (1 s)
            while server.connections:
                await asyncio.sleep(0.05)
        client.drop()
        await client.open()  # resumed: the replay log has every frame after last_seq
        await client.read_until(lambda: "a" in client.ends, timeout=60)
        assert client.text["a"] == sim_text("stall", 1_000_000)
        await client.close()


# -------------------------------------------------------- server SIGKILLed


async def test_sigkilled_server_restarted_gives_a_fresh_session_not_a_hang() -> None:
    port = free_port()
    args = ["--sim-tokens-per-s", "200", "--sim-ttft-ms", "0", "--ping-interval", "0"]
    first = ServerProcess(port, args, clean_env())
    second = None
    try:
        await asyncio.to_thread(first.wait_for_line, "listening")
        url = f"ws://127.0.0.1:{port}/"
        async with wsserver.connect(url, backoff=wsserver.client.Backoff(base=0.05, cap=0.5, give_up_after=30)) as client:
            old_session = client.welcome["session"]
            stream = await client.generate([{"role": "user", "content": "x"}], params={"reply_tokens": 100_000})
            got = []
            async for piece in stream:
                got.append(piece)
                if len(got) >= 5:
                    break
            first.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.proc.wait, 5)
            second = ServerProcess(port, args, clean_env())
            await asyncio.to_thread(second.wait_for_line, "listening", 15)
            with pytest.raises(ConnectionLost):
                async with asyncio.timeout(30):  # not a hang
                    async for piece in stream:
                        pass
            assert stream.text.startswith("".join(got))  # nothing received was dropped or doubled
            assert client.welcome["session"] != old_session and client.welcome["resumed"] is False
            fresh = await client.generate([{"role": "user", "content": "again"}], params={"reply_tokens": 5})
            result = await asyncio.wait_for(fresh.wait(), 30)
            assert result.reason == "complete" and result.text == sim_text("again", 5)

        # the same, in the protocol's words: resuming an unknown session
        async with connect(url) as ws:
            await ws.send(orjson.dumps({"type": "hello", "protocol": 1, "session": old_session, "last_seq": 7}).decode())
            welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            assert welcome["type"] == "welcome" and welcome["resumed"] is False
            assert welcome["session"] != old_session
    finally:
        first.kill()
        if second is not None:
            second.kill()
