"""Raw ``websockets`` baseline: the ceiling. No protocol, no sessions.

Streams pre-encoded ``stream.delta`` frames (the same bytes wsserver would
send for the same tokens) with one ``await ws.send()`` each and an
``asyncio.sleep(0)`` every 32 frames (the reference handler measured in
shared/notes/sse-baseline.md); paced streams sleep to the same schedule as
wsserver's simulated provider. Fan-out: ``broadcast()`` or a per-connection
``await send()`` loop (``mode`` of the ``pub`` request). Replay: N stored
frames, one ``await send()`` each. ``{"op": "gc"}`` answers the pauses of its
garbage collector so far (count, total and longest by generation), for the
service scenario's context.

``python -m bench.baselines.raw_ws --tokens FILE [--port 0]``
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import time

import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from . import _shared as sh

YIELD_EVERY = 32
WELCOME = b'{"type":"welcome"}'
SUBSCRIBED = b'{"type":"subscribed"}'
OK = b'{"type":"ok"}'
channels: dict[str, dict[ServerConnection, None]] = {}
offsets: dict[str, int] = {}
#: Collections by generation: [count, total seconds, longest seconds].
gc_pauses = [[0, 0.0, 0.0] for _ in range(3)]
_gc_started = [0.0]


def time_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    pause, stats = time.perf_counter() - _gc_started[0], gc_pauses[info["generation"]]
    stats[0] += 1
    stats[1] += pause
    stats[2] = max(stats[2], pause)


@functools.cache
def frames(stream: str, n: int) -> list[bytes]:
    """Pre-encoded deltas of one stream (seq 2.., as after a stream.start)."""
    return [orjson.dumps(sh.delta(i + 2, stream, i, t)) for i, t in enumerate(sh.tokens(n))]


@functools.cache
def replay_log(n: int) -> list[bytes]:
    log = frames("s1", n - 1)
    return [*log, orjson.dumps(sh.end(n + 1, "s1", "complete", n - 1))]


async def stream(ws: ServerConnection, sid: str, n: int, rate: float, ttft_ms: float) -> None:
    out = frames(sid, n)
    send = ws.send
    sent = 0
    try:
        if ttft_ms > 0:
            await asyncio.sleep(ttft_ms / 1000)
        if rate > 0:
            interval, start = 1.0 / rate, time.monotonic()
            for i, frame in enumerate(out):
                if i:
                    delay = start + i * interval - time.monotonic()
                    await asyncio.sleep(delay if delay > 0 else 0)
                await send(frame, text=True)
                sent += 1
        else:
            for i, frame in enumerate(out):
                await send(frame, text=True)
                sent += 1
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)
        await send(orjson.dumps(sh.end(n + 2, sid, "complete", n)), text=True)
    except asyncio.CancelledError:
        await send(orjson.dumps(sh.end(sent + 2, sid, "cancelled", sent)), text=True)


async def handler(ws: ServerConnection) -> None:
    tasks: dict[str, asyncio.Task[None]] = {}
    subscribed: list[str] = []
    try:
        async for msg in ws:
            req = orjson.loads(msg)
            op = req["op"]
            if op == "stream":
                for k in range(req.get("streams", 1)):
                    sid = f"s{k + 1}"
                    coro = stream(ws, sid, req["n"], req.get("rate", 0), req.get("ttft_ms", 0))
                    tasks[sid] = asyncio.create_task(coro)
            elif op == "cancel":
                task = tasks.pop(req["stream"], None)
                if task is not None:
                    task.cancel()
            elif op == "pub":
                name = req["channel"]
                offset = offsets[name] = offsets.get(name, 0) + 1
                frame = sh.channel_frame(name, offset, orjson.dumps(req["data"]))
                subs = channels.get(name, {})
                if req.get("mode", "broadcast") == "broadcast":
                    broadcast(subs, frame, text=True)
                else:
                    for sub in list(subs):
                        try:
                            await sub.send(frame, text=True)
                        except ConnectionClosed:
                            pass
                await ws.send(OK, text=True)
            elif op == "sub":
                channels.setdefault(req["channel"], {})[ws] = None
                subscribed.append(req["channel"])
                await ws.send(SUBSCRIBED, text=True)
            elif op == "replay":
                send = ws.send
                for frame in replay_log(req["n"]):
                    await send(frame, text=True)
            elif op == "hello":
                await ws.send(WELCOME, text=True)
            elif op == "gc":
                await ws.send(orjson.dumps({"type": "gc", "gc": gc_pauses}), text=True)
    except ConnectionClosed:
        pass
    finally:
        for name in subscribed:
            channels.get(name, {}).pop(ws, None)
        for task in tasks.values():
            task.cancel()


async def main(port: int) -> None:
    gc.callbacks.append(time_gc)
    sock = sh.listen(port)
    async with serve(
        handler,
        sock=sock,
        compression=None,
        ping_interval=None,
        max_size=2**20,
    ):
        sh.ready(sock)
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", required=True)
    args = parser.parse_args()
    sh.load_tokens(args.tokens)
    uvloop.run(main(args.port))
