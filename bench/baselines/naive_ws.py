"""Naive FastAPI WebSocket baseline: one ``await send_json`` per token per client.

What a FastAPI app would do without thinking about it: a task per stream
that iterates the (simulated) token source and awaits ``send_json`` for each
token; fan-out is ``for ws in subscribers: await ws.send_text(frame)``;
replay is ``send_text`` per stored frame. uvicorn with its defaults
(``--ws auto``, which picks websockets-sansio), uvloop and httptools, no
keepalive pings, no compression.

``python -m bench.baselines.naive_ws --tokens FILE [--port 0]``
"""

from __future__ import annotations

import argparse
import asyncio
import functools

import orjson
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from . import _shared as sh

app = FastAPI()
channels: dict[str, dict[WebSocket, None]] = {}
offsets: dict[str, int] = {}


@functools.cache
def replay_log(n: int) -> list[str]:
    """A stored log of N frames (N - 1 deltas and an end), as text."""
    log = [orjson.dumps(sh.delta(i + 2, "s1", i, t)).decode() for i, t in enumerate(sh.tokens(n - 1))]
    return [*log, orjson.dumps(sh.end(n + 1, "s1", "complete", n - 1)).decode()]


class Conn:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.seq = 0
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def stream(self, sid: str, n: int, rate: float, ttft_ms: float) -> None:
        sent = 0
        try:
            async for tok in sh.token_source(n, rate, ttft_ms):
                self.seq += 1
                await self.ws.send_json(sh.delta(self.seq, sid, sent, tok))
                sent += 1
            self.seq += 1
            await self.ws.send_json(sh.end(self.seq, sid, "complete", sent))
        except asyncio.CancelledError:
            self.seq += 1
            await self.ws.send_json(sh.end(self.seq, sid, "cancelled", sent))


@app.websocket("/")
async def endpoint(ws: WebSocket) -> None:
    await ws.accept()
    conn = Conn(ws)
    subscribed: list[str] = []
    try:
        while True:
            req = await ws.receive_json()
            op = req["op"]
            if op == "stream":
                for k in range(req.get("streams", 1)):
                    sid = f"s{k + 1}"
                    coro = conn.stream(sid, req["n"], req.get("rate", 0), req.get("ttft_ms", 0))
                    conn.tasks[sid] = asyncio.create_task(coro)
            elif op == "cancel":
                task = conn.tasks.pop(req["stream"], None)
                if task is not None:
                    task.cancel()
            elif op == "pub":
                name = req["channel"]
                offset = offsets[name] = offsets.get(name, 0) + 1
                frame = sh.channel_frame(name, offset, orjson.dumps(req["data"])).decode()
                for sub in list(channels.get(name, {})):
                    try:
                        await sub.send_text(frame)
                    except (WebSocketDisconnect, RuntimeError):
                        pass
                await ws.send_json({"type": "ok"})
            elif op == "sub":
                channels.setdefault(req["channel"], {})[ws] = None
                subscribed.append(req["channel"])
                await ws.send_json({"type": "subscribed"})
            elif op == "replay":
                for frame in replay_log(req["n"]):
                    await ws.send_text(frame)
            elif op == "hello":
                await ws.send_json({"type": "welcome"})
    except WebSocketDisconnect:
        pass
    finally:
        for name in subscribed:
            channels.get(name, {}).pop(ws, None)
        for task in conn.tasks.values():
            task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", required=True)
    args = parser.parse_args()
    sh.load_tokens(args.tokens)
    sock = sh.listen(args.port)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        ws_ping_interval=None,
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    sh.ready(sock)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
