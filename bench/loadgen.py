"""Load generator: ``python -m bench.loadgen`` (spawned by the harness, never by hand).

Reads one JSON spec line on stdin, sets up its share of connections, prints
``READY {...}``, waits for ``go``, runs, prints ``RESULT {...}`` and exits.
Large sample sets (latencies, gaps) go to binary files of doubles
(``array('d')``) named in the result, so the harness can merge exact
percentiles across processes. Times are ``time.monotonic()`` seconds, which
on Linux is one clock for every process of the machine.

Roles: ``stream`` (unpaced throughput or paced latency), ``fanout_sub``,
``fanout_pub``, ``idle``, ``cancel``, ``replay``, ``churn`` (users arriving
at a fixed rate, each on a new connection for one paced reply). ``kind`` is
``wsserver`` (the real protocol), ``wsserver-sse`` (the real protocol over
wsserver's HTTP transport: ``GET /v1/events`` + ``POST /v1/send``, aiohttp),
``ws`` (the baselines' ``{"op": ...}`` requests) or ``sse`` (aiohttp against
the SSE baseline).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import resource
import sys
import time
from array import array
from typing import Any

import orjson
import uvloop

from .baselines._shared import arm
from .wsclient import Conn, connect

SUBPROTOCOL = "wsserver.v1"
MESSAGES = [{"role": "user", "content": "benchmark"}]
#: The simulated provider's tokenizer: one word with its leading space, or one
#: punctuation mark (wsserver.providers.simulated._TOKEN).
TOKEN_RE = re.compile(r"\s*[\w'’-]+|\s*[^\w\s]")
P_DELTA = b'{"type":"stream.delta"'
P_END = b'{"type":"stream.end"'
P_STREAM = b'{"type":"stream.'
P_MESSAGE = b'{"type":"message"'
P_OK = b'{"type":"ok"'
P_ERROR = b'{"type":"error"'


def emit(tag: str, payload: dict[str, Any]) -> None:
    sys.stdout.write(f"{tag} {orjson.dumps(payload).decode()}\n")
    sys.stdout.flush()


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def save(spec: dict[str, Any], what: str, values: list[float] | array) -> str:
    path = os.path.join(spec["sample_dir"], f"{spec['name']}-{what}.bin")
    with open(path, "wb") as f:
        (values if isinstance(values, array) else array("d", values)).tofile(f)
    return path


def save_latencies(
    spec: dict[str, Any], result: dict[str, Any], paced: bool, lats: Any, ttfts: Any, gaps: Any
) -> None:
    """Write a stream run's samples; their files go into ``result``: latencies
    against the schedule when paced, else time to first token and the gaps."""
    if paced:
        result["lat_file"] = save(spec, "lat", lats)
    else:
        result["ttft_file"] = save(spec, "ttft", ttfts)
        result["gap_file"] = save(spec, "gap", gaps)


class Stdin:
    """Line reader for the harness's commands."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self.reader), sys.stdin)

    async def line(self) -> str:
        raw = await self.reader.readline()
        if not raw:
            raise SystemExit(0)  # the harness went away
        return raw.decode().strip()


async def open_conns(spec: dict[str, Any], count: int, *, hello: bool = True) -> list[Conn]:
    """``count`` connections (32 handshakes in flight at most), each past hello."""
    sem = asyncio.Semaphore(32)
    host, port, kind = spec["host"], spec["port"], spec["kind"]

    async def one() -> Conn:
        async with sem:
            for attempt in range(5):
                try:
                    conn = await connect(host, port, "/", SUBPROTOCOL if kind == "wsserver" else None)
                    break
                except (ConnectionError, OSError, TimeoutError):
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
            if hello:
                if kind == "wsserver":
                    conn.send(b'{"type":"hello","protocol":1}')
                else:
                    conn.send(b'{"op":"hello"}')
                welcome = await conn.recv()
                if not welcome.startswith(b'{"type":"welcome"'):
                    raise RuntimeError(f"expected welcome, got {welcome[:200]!r}")
            return conn

    return list(await asyncio.gather(*(one() for _ in range(count))))


# ------------------------------------------------------------------ stream


def generate_request(spec: dict[str, Any], stream: str) -> bytes:
    return orjson.dumps(
        {
            "type": "generate",
            "stream": stream,
            "messages": MESSAGES,
            "params": {
                "reply_tokens": spec["tokens"],
                "tokens_per_s": spec["rate"],
                "ttft_ms": spec["ttft_ms"],
            },
        }
    )


class StreamState:
    __slots__ = ("t_req", "last", "ends", "tokens", "frames", "next_token", "done_at")

    def __init__(self, streams: int) -> None:
        self.t_req = 0.0
        self.last = 0.0
        self.ends = streams
        self.tokens = 0
        self.frames = 0
        self.next_token: dict[str, int] = {}
        self.done_at = 0.0


async def role_stream(spec: dict[str, Any], stdin: Stdin) -> None:
    kind = spec["kind"]
    if kind == "sse":
        return await role_stream_sse(spec, stdin)
    if kind == "wsserver-sse":
        return await role_stream_http(spec, stdin)
    n_conns, streams = spec["conns"], spec["streams"]
    rate, ttft = spec["rate"], spec["ttft_ms"] / 1000
    paced = rate > 0
    conns = await open_conns(spec, n_conns)
    loop = asyncio.get_running_loop()
    all_done = loop.create_future()
    remaining = [n_conns]
    ttfts: list[float] = []
    gaps = array("d")
    lats = array("d")
    bad: list[str] = []
    reasons: dict[str, int] = {}

    def make_handler(conn: Conn, st: StreamState):  # type: ignore[no-untyped-def]
        def on_frame(data: bytes, s: int, e: int, op: int) -> None:
            now = conn.now
            if data.startswith(P_DELTA, s):
                st.frames += 1
                if paced:
                    msg = orjson.loads(data[s:e])
                    sid = msg["stream"]
                    i = st.next_token.get(sid, 0)
                    k = len(TOKEN_RE.findall(msg["text"])) or 1
                    base = st.t_req + ttft
                    for j in range(i, i + k):
                        lats.append(now - (base + j / rate))
                    st.next_token[sid] = i + k
                elif st.last:
                    gaps.append(now - st.last)
                else:
                    ttfts.append(now - st.t_req)
                st.last = now
            elif data.startswith(P_END, s):
                msg = orjson.loads(data[s:e])
                st.tokens += msg["usage"]["output_tokens"]
                reasons[msg["reason"]] = reasons.get(msg["reason"], 0) + 1
                st.ends -= 1
                if st.ends == 0:
                    st.done_at = now
                    remaining[0] -= 1
                    if remaining[0] == 0 and not all_done.done():
                        all_done.set_result(None)
            elif not data.startswith(P_STREAM, s):
                if len(bad) < 5:
                    bad.append(data[s:e][:300].decode(errors="replace"))

        return on_frame

    states = []
    for conn in conns:
        st = StreamState(streams)
        conn.state = st
        conn.on_frame = make_handler(conn, st)
        states.append(st)
    if kind == "wsserver":
        requests = [generate_request(spec, f"b{k + 1}") for k in range(streams)]
    else:
        requests = [
            orjson.dumps(
                {"op": "stream", "n": spec["tokens"], "rate": rate, "ttft_ms": spec["ttft_ms"], "streams": streams}
            )
        ]
    emit("READY", {"conns": len(conns)})
    await stdin.line()  # go
    cpu0 = cpu_s()
    t_go = time.monotonic()
    stagger, first, total = spec.get("stagger_s", 0.0), spec.get("first", 0), spec.get("total", n_conns)

    def start(conn: Conn, st: StreamState) -> None:
        st.t_req = time.monotonic()
        for req in requests:
            conn.send(req)

    if stagger > 0:
        for k, (conn, st) in enumerate(zip(conns, states)):
            loop.call_at(t_go + stagger * (first + k) / total, start, conn, st)
    else:
        for conn, st in zip(conns, states):
            start(conn, st)
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(all_done), spec["run_timeout"])
    except TimeoutError:
        timed_out = True
    t_reqs = [st.t_req for st in states if st.t_req]
    result = {
        "t_first": min(t_reqs) if t_reqs else t_go,
        "t_last": max((st.done_at for st in states), default=0.0),
        "tokens": sum(st.tokens for st in states),
        "frames": sum(st.frames for st in states),
        "conns_done": n_conns - remaining[0],
        "reasons": reasons,
        "timed_out": timed_out,
        "bad_frames": bad,
        "client_cpu_s": cpu_s() - cpu0,
    }
    save_latencies(spec, result, paced, lats, ttfts, gaps)
    emit("RESULT", result)


class Probe:
    """One SSE request's clock: when it was asked, its last delivery, the next token of each stream."""

    __slots__ = ("last", "next_token", "t_req")

    def __init__(self, t_req: float) -> None:
        self.t_req = t_req
        self.last = 0.0
        self.next_token: dict[str, int] = {}


class SseTally:
    """What the two SSE stream roles count (the FastAPI baseline's stream and
    wsserver's HTTP transport): the same samples and result as ``role_stream``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.rate, self.ttft = spec["rate"], spec["ttft_ms"] / 1000
        self.paced = self.rate > 0
        self.ttfts: list[float] = []
        self.gaps = array("d")
        self.lats = array("d")
        self.bad: list[str] = []
        self.reasons: dict[str, int] = {}
        self.tokens = self.frames = self.done = 0
        self.done_at: list[float] = []
        self.t_reqs: list[float] = []

    def probe(self) -> Probe:
        probe = Probe(time.monotonic())
        self.t_reqs.append(probe.t_req)
        return probe

    def delta(self, probe: Probe, now: float, payload: bytes) -> None:
        self.frames += 1
        if self.paced:
            msg = orjson.loads(payload)
            sid = msg.get("stream", "")
            i = probe.next_token.get(sid, 0)
            k = len(TOKEN_RE.findall(msg["text"])) or 1
            base = probe.t_req + self.ttft
            for j in range(i, i + k):
                self.lats.append(now - (base + j / self.rate))
            probe.next_token[sid] = i + k
        elif probe.last:
            self.gaps.append(now - probe.last)
        else:
            self.ttfts.append(now - probe.t_req)
        probe.last = now

    def end(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        self.tokens += msg["usage"]["output_tokens"]
        self.reasons[msg["reason"]] = self.reasons.get(msg["reason"], 0) + 1

    def odd(self, line: bytes) -> None:
        if len(self.bad) < 5:
            self.bad.append(line[:300].decode(errors="replace"))

    def emit_result(self, spec: dict[str, Any], t_go: float, cpu0: float, timed_out: bool, conns_done: int) -> None:
        result = {
            "t_first": min(self.t_reqs) if self.t_reqs else t_go,
            "t_last": max(self.done_at, default=0.0),
            "tokens": self.tokens,
            "frames": self.frames,
            "conns_done": conns_done,
            "reasons": self.reasons,
            "timed_out": timed_out,
            "bad_frames": self.bad,
            "client_cpu_s": cpu_s() - cpu0,
        }
        save_latencies(spec, result, self.paced, self.lats, self.ttfts, self.gaps)
        emit("RESULT", result)


async def start_delay(spec: dict[str, Any], t_go: float, k: int) -> None:
    """Wait for connection ``k``'s turn when the starts are spread (``stagger_s``)."""
    stagger, first, total = spec.get("stagger_s", 0.0), spec.get("first", 0), spec.get("total", spec["conns"])
    if stagger > 0:
        await asyncio.sleep(max(0.0, t_go + stagger * (first + k) / total - time.monotonic()))


async def role_stream_sse(spec: dict[str, Any], stdin: Stdin) -> None:
    import aiohttp

    n_conns, streams = spec["conns"], spec["streams"]
    rate = spec["rate"]
    base_url = f"http://{spec['host']}:{spec['port']}"
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=600)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    session = aiohttp.ClientSession(connector=connector, timeout=timeout)
    # One keep-alive connection per stream, opened before the clock starts
    # (all at once, so that the pool ends up holding that many).
    async def ping() -> None:
        async with session.get(base_url + "/ping") as resp:
            await resp.read()

    await asyncio.gather(*(ping() for _ in range(n_conns * streams)))
    tally = SseTally(spec)
    emit("READY", {"conns": n_conns * streams})
    await stdin.line()
    cpu0 = cpu_s()
    t_go = time.monotonic()

    async def one(k: int, sid: str) -> None:
        await start_delay(spec, t_go, k)
        url = f"{base_url}/stream?n={spec['tokens']}&rate={rate}&ttft_ms={spec['ttft_ms']}&sid={sid}"
        probe = tally.probe()
        is_end = False
        async with session.get(url) as resp:
            async for line in resp.content:
                if line.startswith(b"data:"):
                    if is_end:
                        tally.end(line[5:])
                        tally.done_at.append(time.monotonic())
                        break
                    tally.delta(probe, time.monotonic(), line[5:])
                elif line.startswith(b"event: end"):
                    is_end = True
                elif line.strip() and not line.startswith((b"event:", b":", b"id:", b"retry:")):
                    tally.odd(line)
        tally.done += 1

    tasks = [one(k, f"s{j + 1}") for k in range(n_conns) for j in range(streams)]
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), spec["run_timeout"])
    except TimeoutError:
        timed_out = True
    tally.emit_result(spec, t_go, cpu0, timed_out, tally.done // max(1, streams))
    await session.close()


async def role_stream_http(spec: dict[str, Any], stdin: Stdin) -> None:
    """``stream`` over wsserver's HTTP transport: one event stream per
    connection (opened and past hello before the clock starts), its
    generates posted as one array."""
    import aiohttp

    n_conns, streams = spec["conns"], spec["streams"]
    base_url = f"http://{spec['host']}:{spec['port']}"
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=600)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    sem = asyncio.Semaphore(32)

    async def post(token: str, body: bytes) -> None:
        async with session.post(f"{base_url}/v1/send?connection={token}", data=body) as resp:
            await resp.read()
            if resp.status != 202:
                raise RuntimeError(f"POST /v1/send answered {resp.status}")

    async def data_line(resp: Any) -> bytes:
        async for line in resp.content:
            if line.startswith(b"data: "):
                return bytes(line[6:])
        raise RuntimeError("the event stream ended")

    async def open_one() -> tuple[Any, str]:
        async with sem:
            resp = await session.get(base_url + "/v1/events")
            token = orjson.loads(await data_line(resp))["connection"]
            await post(token, b'{"type":"hello","protocol":1}')
            welcome = await data_line(resp)
            if not welcome.startswith(b'{"type":"welcome"'):
                raise RuntimeError(f"expected welcome, got {welcome[:200]!r}")
            return resp, token

    opened = await asyncio.gather(*(open_one() for _ in range(n_conns)))
    body = b"[" + b",".join(generate_request(spec, f"b{k + 1}") for k in range(streams)) + b"]"
    tally = SseTally(spec)
    emit("READY", {"conns": n_conns})
    await stdin.line()
    cpu0 = cpu_s()
    t_go = time.monotonic()

    async def one(k: int, resp: Any, token: str) -> None:
        await start_delay(spec, t_go, k)
        probe = tally.probe()
        await post(token, body)
        ends = streams
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(P_DELTA, 6):
                tally.delta(probe, time.monotonic(), line[6:])
            elif line.startswith(P_END, 6):
                tally.end(line[6:])
                ends -= 1
                if ends == 0:
                    tally.done_at.append(time.monotonic())
                    break
            elif not line.startswith(P_STREAM, 6):
                tally.odd(line)
        tally.done += 1
        resp.close()

    timed_out = False
    try:
        await asyncio.wait_for(
            asyncio.gather(*(one(k, resp, token) for k, (resp, token) in enumerate(opened))), spec["run_timeout"]
        )
    except TimeoutError:
        timed_out = True
    tally.emit_result(spec, t_go, cpu0, timed_out, tally.done)
    await session.close()


# ------------------------------------------------------------------ fan-out


async def role_fanout_sub(spec: dict[str, Any], stdin: Stdin) -> None:
    kind, channel, expect = spec["kind"], spec["channel"], spec["messages"]
    conns = await open_conns(spec, spec["conns"])
    loop = asyncio.get_running_loop()
    all_done = loop.create_future()
    remaining = [len(conns)]
    lats = array("d")
    counts = [0] * len(conns)
    last = [0.0] * len(conns)
    other = [0]

    def make_handler(conn: Conn, k: int):  # type: ignore[no-untyped-def]
        def on_frame(data: bytes, s: int, e: int, op: int) -> None:
            if data.startswith(P_MESSAGE, s):
                i = data.find(b'"t":', s, e) + 4
                now = conn.now
                lats.append(now - int(data[i : data.find(b",", i, e)]) / 1e6)
                counts[k] += 1
                last[k] = now
                if counts[k] == expect:
                    remaining[0] -= 1
                    if remaining[0] == 0 and not all_done.done():
                        all_done.set_result(None)
            else:
                other[0] += 1  # presence, subscribed

        return on_frame

    sem = asyncio.Semaphore(64)
    if kind == "wsserver":
        sub = orjson.dumps({"type": "subscribe", "id": "sub", "channel": channel})
        subscribed = b'{"type":"subscribed"'
    else:
        sub = orjson.dumps({"op": "sub", "channel": channel})
        subscribed = b'{"type":"subscribed"'

    async def subscribe(k: int, conn: Conn) -> None:
        async with sem:
            conn.send(sub)
            await conn.recv_until(subscribed, timeout=spec["run_timeout"])
            conn.on_frame = make_handler(conn, k)

    t0 = time.monotonic()
    for k, conn in enumerate(conns):  # one at a time: join order as in real life, and
        await subscribe(k, conn)  # the presence storm is the server's, not ours
        if k % 500 == 499:
            print(f"{k + 1} subscribed after {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    emit("READY", {"conns": len(conns)})
    await stdin.line()
    cpu0 = cpu_s()
    timed_out = False

    async def progress() -> None:  # for the log: where a stuck run stands
        while True:
            await asyncio.sleep(5)
            print(f"received {sum(counts)} of {expect * len(conns)}; {remaining[0]} connections short; "
                  f"{other[0]} other frames", file=sys.stderr, flush=True)

    reporter = asyncio.ensure_future(progress())
    try:
        await asyncio.wait_for(asyncio.shield(all_done), spec["run_timeout"])
    except TimeoutError:
        timed_out = True
    reporter.cancel()
    emit(
        "RESULT",
        {
            "received": sum(counts),
            "expected": expect * len(conns),
            "t_last": max(last, default=0.0),
            "other_frames": other[0],
            "timed_out": timed_out,
            "lat_file": save(spec, "lat", lats),
            "client_cpu_s": cpu_s() - cpu0,
        },
    )


async def role_fanout_pub(spec: dict[str, Any], stdin: Stdin) -> None:
    kind, channel, total, window = spec["kind"], spec["channel"], spec["messages"], spec["window"]
    (conn,) = await open_conns(spec, 1)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    state = {"acked": 0, "sent": 0, "t_last_ok": 0.0}
    errors: list[str] = []
    mode = spec.get("mode", "broadcast")

    def request(k: int) -> bytes:
        data = {"t": int(time.monotonic() * 1e6), "i": k}
        if kind == "wsserver":
            return orjson.dumps({"type": "publish", "id": f"p{k}", "channel": channel, "data": data})
        return orjson.dumps({"op": "pub", "channel": channel, "data": data, "mode": mode})

    def on_frame(data: bytes, s: int, e: int, op: int) -> None:
        if data.startswith(P_OK, s):
            state["acked"] += 1
            state["t_last_ok"] = conn.now
            if state["sent"] < total:
                conn.send(request(state["sent"]))
                state["sent"] += 1
            elif state["acked"] == total and not done.done():
                done.set_result(None)
        elif data.startswith(P_ERROR, s):
            errors.append(data[s:e][:300].decode(errors="replace"))
            if not done.done():
                done.set_result(None)

    conn.on_frame = on_frame
    emit("READY", {"conns": 1})
    await stdin.line()
    print("go", file=sys.stderr, flush=True)
    cpu0 = cpu_s()
    t_first = time.monotonic()
    for _ in range(min(window, total)):
        conn.send(request(state["sent"]))
        state["sent"] += 1
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(done), spec["run_timeout"])
    except TimeoutError:
        timed_out = True
    print(f"sent {state['sent']}, acked {state['acked']}, errors {errors[:2]}, closed {conn.closed.done()}",
          file=sys.stderr, flush=True)
    emit(
        "RESULT",
        {
            "t_first": t_first,
            "t_last_ok": state["t_last_ok"],
            "acked": state["acked"],
            "errors": errors,
            "timed_out": timed_out,
            "client_cpu_s": cpu_s() - cpu0,
        },
    )


# --------------------------------------------------------------------- idle


async def role_idle(spec: dict[str, Any], stdin: Stdin) -> None:
    """``open N`` grows to N connections (each past hello); ``quit`` ends."""
    conns: list[Conn] = []
    emit("READY", {"conns": 0})
    while True:
        cmd = await stdin.line()
        if cmd.startswith("open "):
            want = int(cmd.split()[1])
            if want > len(conns):
                conns.extend(await open_conns(spec, want - len(conns)))
            alive = sum(1 for c in conns if not c.closed.done())
            emit("OPENED", {"conns": alive})
        else:
            break
    emit("RESULT", {"conns": len(conns)})


# ------------------------------------------------------------------ control


async def role_cancel(spec: dict[str, Any], stdin: Stdin) -> None:
    """Each probe: start a paced stream, let 3 deltas arrive, cancel, time the end."""
    kind, rounds = spec["kind"], spec["rounds"]
    conns = await open_conns(spec, spec["conns"])
    lats: list[float] = []
    reasons: dict[str, int] = {}
    errors: list[str] = []
    rng = random.Random(spec.get("seed", 1))
    emit("READY", {"conns": len(conns)})
    await stdin.line()
    cpu0 = cpu_s()

    async def probe(p: int, conn: Conn) -> None:
        await asyncio.sleep(rng.uniform(0, 0.05))
        for r in range(rounds):
            sid = f"c{r}"
            if kind == "wsserver":
                conn.send(generate_request({**spec, "ttft_ms": 0}, sid))
                cancel = orjson.dumps({"type": "cancel", "stream": sid})
            else:
                conn.send(orjson.dumps({"op": "stream", "n": spec["tokens"], "rate": spec["rate"], "ttft_ms": 0}))
                sid = "s1"
                cancel = orjson.dumps({"op": "cancel", "stream": sid})
            seen = 0
            while seen < 3:
                frame = await conn.recv()
                if frame.startswith(P_DELTA):
                    seen += 1
                elif frame.startswith(P_ERROR):
                    errors.append(frame[:300].decode(errors="replace"))
                    return
            await asyncio.sleep(rng.uniform(0, 1.0 / spec["rate"]))
            t0 = time.monotonic()
            conn.send(cancel)
            frame = await conn.recv_until(P_END)
            lats.append(conn.now - t0)
            reason = orjson.loads(frame)["reason"]
            reasons[reason] = reasons.get(reason, 0) + 1

    timed_out = False
    try:
        await asyncio.wait_for(
            asyncio.gather(*(probe(p, c) for p, c in enumerate(conns))), spec["run_timeout"]
        )
    except TimeoutError:
        timed_out = True
    emit(
        "RESULT",
        {
            "samples": len(lats),
            "lat_file": save(spec, "lat", lats),
            "reasons": reasons,
            "errors": errors[:5],
            "timed_out": timed_out,
            "client_cpu_s": cpu_s() - cpu0,
        },
    )


async def role_replay(spec: dict[str, Any], stdin: Stdin) -> None:
    """Reconnect and replay ``messages`` missed frames, ``reps`` times in a row."""
    kind, n, reps = spec["kind"], spec["messages"], spec["reps"]
    host, port = spec["host"], spec["port"]
    emit("READY", {"conns": 0})
    await stdin.line()
    cpu0 = cpu_s()
    replay_s: list[float] = []
    reconnect_s: list[float] = []
    frames_seen: list[int] = []
    errors: list[str] = []

    async def once() -> None:
        if kind == "wsserver":
            (first,) = await open_conns(spec, 1, hello=False)
            first.send(b'{"type":"hello","protocol":1}')
            welcome = orjson.loads(await first.recv())
            # n frames after stream.start: n - 1 deltas and the end. Paced (fast), so that the
            # detached session logs one frame per token (unpaced bursts get coalesced)
            first.send(generate_request({"tokens": n - 1, "rate": spec.get("gen_rate", 5000.0), "ttft_ms": 0}, "r1"))
            start = await first.recv_until(b'{"type":"stream.start"')
            last_seq = orjson.loads(start)["seq"]
            first.transport.close()  # type: ignore[union-attr]  # a drop: no close frame
            await first.closed
            await asyncio.sleep(spec.get("settle_s", (n - 1) / spec.get("gen_rate", 5000.0) + 0.3))  # stream ends
            request = orjson.dumps(
                {"type": "hello", "protocol": 1, "session": welcome["session"], "last_seq": last_seq}
            )
        else:
            request = orjson.dumps({"op": "replay", "n": n})
        t0 = time.monotonic()
        conn = await connect(host, port, "/", SUBPROTOCOL if kind == "wsserver" else None)
        t1 = time.monotonic()
        got: list[bytes] = []
        end_at = asyncio.get_running_loop().create_future()

        def on_frame(data: bytes, s: int, e: int, op: int) -> None:  # cheap: decode later
            got.append(data[s:e])
            if data.startswith(P_END, s) and not end_at.done():
                end_at.set_result(conn.now)

        conn.on_frame = on_frame
        conn.send(request)
        t2 = await asyncio.wait_for(end_at, 30)
        count = tokens = 0
        for frame in got:
            if frame.startswith(P_STREAM):
                count += 1
                if frame.startswith(P_DELTA):
                    tokens += len(TOKEN_RE.findall(orjson.loads(frame)["text"]))
            elif frame.startswith(P_ERROR):
                errors.append(frame[:300].decode(errors="replace"))
        replay_s.append(t2 - t1)
        reconnect_s.append(t2 - t0)
        frames_seen.append(count)
        # every token must come back; the frame count is reported (a delta or two may have
        # been merged by wsserver's coalescing while the first connection was still attached)
        if tokens != n - 1:
            errors.append(f"replayed {tokens} tokens in {count} frames, expected {n - 1} tokens")
        conn.close()

    timed_out = False
    try:
        async with asyncio.timeout(spec["run_timeout"]):
            for _ in range(reps):
                await once()
    except TimeoutError:
        timed_out = True
    emit(
        "RESULT",
        {
            "replay_s": replay_s,
            "reconnect_s": reconnect_s,
            "frames": frames_seen,
            "errors": errors[:5],
            "timed_out": timed_out,
            "client_cpu_s": cpu_s() - cpu0,
        },
    )


# -------------------------------------------------------------------- churn


async def role_churn(spec: dict[str, Any], stdin: Stdin) -> None:
    """Users arrive at ``rate`` per second (the first ``offset`` s after go) for
    ``duration_s``; each connects, says hello, asks for one reply of ``tokens``
    tokens paced at ``token_rate``, reads it to its ``stream.end`` and closes.

    Samples (files of doubles, in pairs: when, relative to go, and how long):
    every token's latency against the provider's schedule (as in the paced
    role) and every user's connect + hello time.
    """
    kind, rate, duration = spec["kind"], spec["rate"], spec["duration_s"]
    n, token_rate, ttft = spec["tokens"], spec["token_rate"], spec["ttft_ms"] / 1000
    host, port = spec["host"], spec["port"]
    loop = asyncio.get_running_loop()
    lat_t, lats = array("d"), array("d")
    hello_t, hellos = array("d"), array("d")
    counts = {"started": 0, "completed": 0, "failed": 0, "tokens": 0, "frames": 0, "live": 0, "live_max": 0}
    errors: list[str] = []
    reasons: dict[str, int] = {}
    if kind == "wsserver":
        hello = b'{"type":"hello","protocol":1}'
        request = generate_request({"tokens": n, "rate": token_rate, "ttft_ms": spec["ttft_ms"]}, "s1")
    else:
        hello = b'{"op":"hello"}'
        request = orjson.dumps({"op": "stream", "n": n, "rate": token_rate, "ttft_ms": spec["ttft_ms"]})
    tasks: set[asyncio.Task[None]] = set()
    emit("READY", {"conns": 0})
    await stdin.line()  # go
    cpu0 = cpu_s()
    t_go = time.monotonic()

    async def user() -> None:
        t0 = time.monotonic()
        counts["started"] += 1
        counts["live"] += 1
        counts["live_max"] = max(counts["live_max"], counts["live"])
        conn = None
        try:
            conn = await connect(host, port, "/", SUBPROTOCOL if kind == "wsserver" else None, timeout=30)
            conn.send(hello)
            welcome = await conn.recv()
            if not welcome.startswith(b'{"type":"welcome"'):
                raise RuntimeError(f"expected welcome, got {welcome[:200]!r}")
            hello_t.append(t0 - t_go)
            hellos.append(conn.now - t0)
            done = loop.create_future()
            seen = [0]

            def on_frame(data: bytes, s: int, e: int, op: int) -> None:
                now = conn.now
                if data.startswith(P_DELTA, s):
                    counts["frames"] += 1
                    k = len(TOKEN_RE.findall(orjson.loads(data[s:e])["text"])) or 1
                    base = t_req + ttft
                    at = now - t_go
                    for j in range(seen[0], seen[0] + k):
                        lat_t.append(at)
                        lats.append(now - (base + j / token_rate))
                    seen[0] += k
                elif data.startswith(P_END, s):
                    msg = orjson.loads(data[s:e])
                    counts["tokens"] += msg["usage"]["output_tokens"]
                    reasons[msg["reason"]] = reasons.get(msg["reason"], 0) + 1
                    if not done.done():
                        done.set_result(None)

            conn.on_frame = on_frame
            t_req = time.monotonic()
            conn.send(request)
            await asyncio.wait_for(done, n / token_rate + 60)
            counts["completed"] += 1
        except Exception as exc:  # counted and reported; the run goes on
            counts["failed"] += 1
            if len(errors) < 5:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
        finally:
            counts["live"] -= 1
            if conn is not None:
                conn.close()

    def arrive() -> None:
        task = loop.create_task(user())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    k = 0
    while True:  # one call_at per second's worth of arrivals: no drift, no burst
        at = spec.get("offset", 0.0) + k / rate
        if at >= duration:
            break
        loop.call_at(t_go + at, arrive)
        k += 1
        if k % max(1, int(rate)) == 0:
            await asyncio.sleep(max(0.0, t_go + at - 0.5 - time.monotonic()))
    await asyncio.sleep(max(0.0, t_go + duration - time.monotonic()))
    timed_out = False
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=spec["run_timeout"])
        timed_out = bool(pending)
        for task in pending:
            task.cancel()
    emit(
        "RESULT",
        {
            **{k: v for k, v in counts.items() if k != "live"},
            "reasons": reasons,
            "errors": errors,
            "timed_out": timed_out,
            "lat_file": save(spec, "lat", lats),
            "lat_t_file": save(spec, "lat_t", lat_t),
            "hello_file": save(spec, "hello", hellos),
            "hello_t_file": save(spec, "hello_t", hello_t),
            "client_cpu_s": cpu_s() - cpu0,
        },
    )


ROLES = {
    "churn": role_churn,
    "stream": role_stream,
    "fanout_sub": role_fanout_sub,
    "fanout_pub": role_fanout_pub,
    "idle": role_idle,
    "cancel": role_cancel,
    "replay": role_replay,
}


async def main() -> None:
    stdin = Stdin()
    await stdin.start()
    spec = orjson.loads(await stdin.line())
    try:
        await ROLES[spec["role"]](spec, stdin)
    except Exception as exc:  # reported to the harness, which fails the run
        emit("ERROR", {"error": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    arm(float(os.environ.get("BENCH_LIFETIME", "900")))
    uvloop.run(main())
