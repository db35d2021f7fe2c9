"""What the baselines share: the token list, the pacing, the frame shapes.

Requests (one JSON text frame each, client to server):

* ``{"op": "hello"}`` -> ``{"type": "welcome"}``
* ``{"op": "stream", "n": T, "rate": R, "ttft_ms": X, "streams": S}`` -> for each
  of S streams (``s1``..``sS``): T ``stream.delta`` frames, then ``stream.end``
* ``{"op": "cancel", "stream": "s1"}`` -> that stream stops; ``stream.end``
  with ``reason: cancelled``
* ``{"op": "sub", "channel": C}`` -> ``{"type": "subscribed"}``
* ``{"op": "pub", "channel": C, "data": {...}, "mode": "broadcast"|"loop"}`` ->
  every subscriber of C gets a channel ``message`` frame shaped like
  wsserver's, then the publisher gets ``{"type": "ok"}``
* ``{"op": "replay", "n": N}`` -> N stored (pre-encoded) frames, the last one
  a ``stream.end``

SSE has no requests: ``GET /stream?n=&rate=&ttft_ms=&sid=``.

Pacing copies wsserver's simulated provider: unpaced (``rate`` 0) yields to
the event loop after every token; paced sends token ``i`` at
``start + i / rate`` where ``start`` is the first token's time (after
``ttft_ms``).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator

import orjson

_TOKENS: list[str] = []
#: The publisher's name in channel frames: as long as wsserver's "anon-" ids.
FROM = "anon-000000000000"


def arm(lifetime: float) -> None:
    """Bound this process's life: die with the parent, and after ``lifetime`` s."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass
    signal.alarm(max(1, int(lifetime)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def load_tokens(path: str) -> list[str]:
    global _TOKENS
    with open(path, "rb") as f:
        _TOKENS = orjson.loads(f.read())
    return _TOKENS


def tokens(n: int) -> list[str]:
    out = _TOKENS[:n]
    while len(out) < n:  # longer than the file: repeat it
        out.extend(_TOKENS[: n - len(out)])
    return out


async def token_source(n: int, rate: float, ttft_ms: float) -> AsyncIterator[str]:
    """The simulated provider's timing, for the naive and SSE baselines."""
    toks = tokens(n)
    if ttft_ms > 0:
        await asyncio.sleep(ttft_ms / 1000)
    sleep = asyncio.sleep
    if rate > 0:
        interval = 1.0 / rate
        start = time.monotonic()
        for i, tok in enumerate(toks):
            if i:
                delay = start + i * interval - time.monotonic()
                await sleep(delay if delay > 0 else 0)
            yield tok
    else:
        for tok in toks:
            yield tok
            await sleep(0)


def delta(seq: int, stream: str, index: int, text: str) -> dict[str, object]:
    return {"type": "stream.delta", "seq": seq, "stream": stream, "index": index, "text": text}


def end(seq: int, stream: str, reason: str, tokens: int) -> dict[str, object]:
    return {
        "type": "stream.end",
        "seq": seq,
        "stream": stream,
        "reason": reason,
        "usage": {"input_tokens": 4, "output_tokens": tokens},
    }


def channel_frame(channel: str, offset: int, data: bytes) -> bytes:
    """A channel ``message`` frame, byte-compatible with wsserver's hub."""
    return b"".join(
        (
            b'{"type":"message","channel":',
            orjson.dumps(channel),
            b',"offset":',
            str(offset).encode(),
            b',"from":"',
            FROM.encode(),
            b'","data":',
            data,
            b"}",
        )
    )


def listen(port: int, backlog: int = 100) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0 picks one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def ready(sock: socket.socket) -> None:
    port = sock.getsockname()[1]
    print(f"listening on ws://127.0.0.1:{port}/ (pid {os.getpid()})", flush=True)
