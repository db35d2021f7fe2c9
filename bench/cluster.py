"""Scenario 6: two nodes on a Redis backplane against one node alone.

The same load as scenarios 1-3, once against a single wsserver (memory
backplane) and once against node A of a two-node deployment sharing a
redis-server that this scenario starts on 127.0.0.1 (no persistence). For
fan-out, half the subscribers connect to node B, so every publication
crosses Redis. Besides the usual figures it reads, from Redis itself, the
commands it executed per token and per publication (``INFO commandstats``)
and its CPU time.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from .procs import (
    ServerProc,
    ServerSpec,
    loadavg,
    median,
    pct,
    read_samples,
    run_phase,
    start_servers,
    wsserver_argv,
)
from .scenarios import Ctx, base_spec, ms, ratio, shares, stop_all, stream_round, uniq


class RedisServer:
    """A throw-away redis-server for one scenario run."""

    def __init__(self, binary: str, directory: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout: float = 10.0) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def flush(self) -> None:
        """Forget everything: the sessions a stopped server left for adoption
        would otherwise be adopted by the next one, in the middle of its load."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        client.flushall()
        client.close()

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def commands(self) -> dict[str, int]:
        """Calls per command so far (INFO commandstats), without INFO itself."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        stats = client.info("commandstats")
        client.close()
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


class RedisWindow:
    """Redis commands and CPU between a phase's "go" and its results (not its setup)."""

    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.marks: list[tuple[dict[str, int], float]] = []

    def __call__(self) -> None:
        self.marks.append((self.redis.commands(), self.redis.cpu()))

    def result(self) -> dict[str, Any]:
        (c0, cpu0), (c1, cpu1) = self.marks
        return {"redis_commands": _delta(c1, c0), "redis_cpu_s": cpu1 - cpu0}


async def _fanout(
    ctx: Ctx, pub: ServerProc, subs_on: list[ServerProc], *, subs: int, messages: int, window: int,
    redis: RedisWindow | None = None,
) -> dict[str, Any]:
    tag = uniq(f"{pub.name}-cluster-fan{subs}")
    run_timeout = 120 + messages * subs / 5000
    specs = [
        base_spec(ctx, subs_on[i % len(subs_on)], "fanout_sub", f"{tag}-sub{i}", conns=n, channel=tag,
                  messages=messages, run_timeout=run_timeout + 120)
        for i, (_, n) in enumerate(shares(subs, 2))
    ]
    specs.append(base_spec(ctx, pub, "fanout_pub", f"{tag}-pub", channel=tag, messages=messages, window=window,
                           mode="broadcast", run_timeout=run_timeout))
    ph = await run_phase(pub, specs, logdir=ctx.tmp, setup_timeout=120, run_timeout=run_timeout, quiesce_max=60,
                         window=redis)
    p, subs_res = ph.results[-1], ph.results[:-1]
    received = sum(r["received"] for r in subs_res)
    span = max(r["t_last"] for r in subs_res) - p["t_first"]
    lat = read_samples([r["lat_file"] for r in subs_res])
    return {
        "deliveries": received,
        "deliveries_per_s": received / span if span > 0 else None,
        "lat_p50_ms": ms(pct(lat, 50)), "lat_p99_ms": ms(pct(lat, 99)),
        "ok": received == sum(r["expected"] for r in subs_res) and not p["errors"] and not p["timed_out"],
        "loadavg": loadavg(),
        **(redis.result() if redis is not None else {}),
    }


async def scenario_cluster(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params("cluster")
    binary = shutil.which("redis-server")
    title = "6. Two nodes on a Redis backplane vs one node alone"
    if binary is None:
        return {"scenario": "cluster", "title": title, "params": p, "servers": {}, "tables": [], "targets": [],
                "notes": ["skipped: redis-server is not installed (apt-get install redis-server)"]}
    redis = RedisServer(binary, ctx.tmp)
    try:
        redis.wait_ready()
        argv = wsserver_argv()
        specs = [
            ServerSpec("wsserver", "one node (memory)", "wsserver", argv),
            ServerSpec("node-a", "node A of 2 (Redis)", "wsserver", [*argv, "--redis", redis.url, "--node-id", "a"]),
            ServerSpec("node-b", "node B of 2 (Redis)", "wsserver", [*argv, "--redis", redis.url, "--node-id", "b"]),
        ]
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in
                                                   ("stream-one", "stream-a", "paced-one", "paced-a", "fan-one",
                                                    "fan-ab")}
        for r in range(p["rounds"]):
            redis.flush()  # (nothing left over from the round before)
            servers = await start_servers(specs, ctx.tmp, ctx.lifetime)
            one, a, b = servers["wsserver"], servers["node-a"], servers["node-b"]
            try:
                for srv in (one, a):
                    await stream_round(ctx, srv, conns=10, streams=1, tokens=200, procs=1)  # warm-up
                ctx.log(f"  cluster round {r + 1}/{p['rounds']}: streaming")
                runs["stream-one"].append(await stream_round(ctx, one, conns=p["conns"], streams=1,
                                                             tokens=p["tokens"], procs=2))
                window = RedisWindow(redis)
                res = await stream_round(ctx, a, conns=p["conns"], streams=1, tokens=p["tokens"], procs=2,
                                         window=window)
                runs["stream-a"].append({**res, **window.result()})
                ctx.log(f"  cluster round {r + 1}/{p['rounds']}: paced")
                for key, srv in (("paced-one", one), ("paced-a", a)):
                    runs[key].append(await stream_round(
                        ctx, srv, conns=p["paced_streams"], streams=1, tokens=p["paced_tokens"],
                        rate=p["paced_rate"], stagger_s=1.0, procs=2))
                ctx.log(f"  cluster round {r + 1}/{p['rounds']}: fan-out")
                runs["fan-one"].append(await _fanout(ctx, one, [one], subs=p["subs"], messages=p["messages"],
                                                     window=4))
                runs["fan-ab"].append(await _fanout(ctx, a, [a, b], subs=p["subs"], messages=p["messages"],
                                                    window=4, redis=RedisWindow(redis)))
            finally:
                await stop_all(servers)
    finally:
        redis.stop()

    def med(key: str, field: str) -> float | None:
        return median([x[field] for x in runs[key] if x.get(field) is not None])

    tokens = med("stream-a", "tokens")
    stream_cmds = _per(runs["stream-a"], "tokens")
    fan_cmds = _per(runs["fan-ab"], None, per=p["messages"])
    redis_cpu_stream = median([x["redis_cpu_s"] / x["tokens"] * 1e6 for x in runs["stream-a"] if x["tokens"]])
    rows_stream = [
        ["one node (memory)", med("stream-one", "tokens_per_s"), None, med("stream-one", "server_cpu_us_per_token"),
         None, None],
        ["node A (Redis)", med("stream-a", "tokens_per_s"),
         ratio(med("stream-a", "tokens_per_s"), med("stream-one", "tokens_per_s")),
         med("stream-a", "server_cpu_us_per_token"), redis_cpu_stream, stream_cmds.get("total")],
    ]
    rows_paced = [
        ["one node (memory)", med("paced-one", "lat_p50_ms"), med("paced-one", "lat_p99_ms"),
         med("paced-one", "server_cpu_pct")],
        ["node A (Redis)", med("paced-a", "lat_p50_ms"), med("paced-a", "lat_p99_ms"),
         med("paced-a", "server_cpu_pct")],
    ]
    rows_fan = [
        ["one node (memory)", med("fan-one", "deliveries_per_s"), None, med("fan-one", "lat_p50_ms"),
         med("fan-one", "lat_p99_ms"), None],
        ["publisher on A, subscribers on A and B (Redis)", med("fan-ab", "deliveries_per_s"),
         ratio(med("fan-ab", "deliveries_per_s"), med("fan-one", "deliveries_per_s")), med("fan-ab", "lat_p50_ms"),
         med("fan-ab", "lat_p99_ms"), fan_cmds.get("total")],
    ]
    ok = all(x.get("ok", False) for v in runs.values() for x in v)
    return {
        "scenario": "cluster",
        "title": f"{title} (median of {p['rounds']} round(s))",
        "params": p,
        "servers": {"runs": runs, "stream_commands_per_token": stream_cmds, "fanout_commands_per_publication": fan_cmds,
                    "tokens": tokens, "ok": ok},
        "tables": [
            {"columns": ["streaming: " + f"{p['conns']} × {p['tokens']:,} tokens, unpaced", "tokens/s",
                         "÷ one node", "node CPU µs/token", "Redis CPU µs/token", "Redis commands/token"],
             "rows": rows_stream},
            {"columns": [f"paced: {p['paced_streams']:,} streams × {p['paced_rate']:g} tokens/s", "latency p50 ms",
                         "latency p99 ms", "node CPU %"],
             "rows": rows_paced},
            {"columns": [f"fan-out: 1 publisher → {p['subs']:,} subscribers", "deliveries/s", "÷ one node",
                         "latency p50 ms", "latency p99 ms", "Redis commands/publication"],
             "rows": rows_fan},
            {"columns": ["Redis commands (median run)", "per token (streaming)", "per publication (fan-out)"],
             "rows": [[k, stream_cmds.get(k), fan_cmds.get(k)]
                      for k in sorted(set(stream_cmds) | set(fan_cmds)) if k != "total"]},
        ],
        "targets": [],
        "notes": [
            "Redis runs on the same 2 cores as the nodes and the load generators. Commands are counted by "
            "Redis (INFO commandstats; commands run inside a script count too, under their own names). "
            "Streaming load goes to node A only; node B idles. In the fan-out run half the subscribers are "
            "on node B, so every publication goes through Redis pub/sub to both nodes.",
            f"All runs delivered everything they should: {'yes' if ok else 'NO'}.",
        ],
    }


def _per(runs: list[dict[str, Any]], field: str | None, per: float = 1.0) -> dict[str, float]:
    """Redis commands per unit (token, or publication), median over runs."""
    out: dict[str, list[float]] = {}
    for run in runs:
        unit = run[field] if field else per
        if not unit:
            continue
        cmds = run["redis_commands"]
        for k, v in cmds.items():
            out.setdefault(k, []).append(v / unit)
        out.setdefault("total", []).append(sum(cmds.values()) / unit)
    return {k: v for k, v in ((k, median(vals)) for k, vals in out.items()) if v is not None}

