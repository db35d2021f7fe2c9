"""FastAPI + sse-starlette + uvicorn baseline: the same tokens as SSE events.

``GET /stream?n=T&rate=R&ttft_ms=X&sid=s1`` returns an ``EventSourceResponse``
whose generator yields one ``{"data": <stream.delta JSON>}`` event per token
(encoded with orjson, as wsserver encodes each frame), then an ``end`` event
carrying the ``stream.end`` JSON. sse-starlette's defaults otherwise (its
15 s ping never fires in these runs). ``GET /ping`` lets a client open its
keep-alive connection before the clock starts. Consumed by aiohttp.

``python -m bench.baselines.sse --tokens FILE [--port 0]``
"""

from __future__ import annotations

import argparse

import orjson
import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from sse_starlette.sse import EventSourceResponse

from . import _shared as sh

app = FastAPI()


@app.get("/ping")
async def ping() -> PlainTextResponse:
    return PlainTextResponse("ok")


@app.get("/stream")
async def stream(n: int, rate: float = 0.0, ttft_ms: float = 0.0, sid: str = "s1") -> EventSourceResponse:
    async def events():  # type: ignore[no-untyped-def]
        seq = 1
        index = 0
        async for tok in sh.token_source(n, rate, ttft_ms):
            seq += 1
            yield {"data": orjson.dumps(sh.delta(seq, sid, index, tok)).decode()}
            index += 1
        yield {"event": "end", "data": orjson.dumps(sh.end(seq + 1, sid, "complete", index)).decode()}

    return EventSourceResponse(events())


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
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    sh.ready(sock)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
