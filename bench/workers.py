"""Scenario 8: one worker against two (``wsserver serve --workers N``) on one port.

Both run on a Redis backplane this scenario starts (``--workers`` above 1
needs one; one worker gets the same, so that only the number of processes
differs). The loads are those of scenarios 1 and 3: unpaced streaming and
fan-out to 1,000 subscribers, the connections spread by the kernel over the
workers (SO_REUSEPORT). CPU and RSS are those of every process of the
server (supervisor and workers). The scaling ratio is two workers' figure
over one worker's: on a machine whose cores the load generators and Redis
share it says how much a second process buys there, not what it buys on a
machine with cores to spare.
"""

from __future__ import annotations

import shutil
from typing import Any

from .cluster import RedisServer
from .procs import ServerSpec, median, start_servers, wsserver_argv
from .scenarios import Ctx, fanout_run, ratio, stop_all, stream_round

TITLE = "8. One worker against two on one port (--workers, Redis backplane)"


async def scenario_workers(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params("workers")
    binary = shutil.which("redis-server")
    if binary is None:
        return {"scenario": "workers", "title": TITLE, "params": p, "servers": {}, "tables": [], "targets": [],
                "notes": ["skipped: redis-server is not installed (apt-get install redis-server)"]}
    redis = RedisServer(binary, ctx.tmp)
    keys = ("w1", "w2")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {"stream": [], "fanout": []} for k in keys}
    try:
        redis.wait_ready()
        argv = [*wsserver_argv(), "--redis", redis.url]
        specs = {
            "w1": ServerSpec("w1", "1 worker", "wsserver", [*argv, "--workers", "1"]),
            "w2": ServerSpec("w2", "2 workers", "wsserver", [*argv, "--workers", "2"]),
        }
        for r in range(p["rounds"]):
            order = keys if r % 2 == 0 else keys[::-1]
            for key in order:  # one server at a time, fresh each round (and a fresh Redis)
                redis.flush()
                servers = await start_servers([specs[key]], ctx.tmp, ctx.lifetime)
                srv = servers[key]
                try:
                    await stream_round(ctx, srv, conns=10, streams=1, tokens=200, procs=1)  # warm-up
                    ctx.log(f"  workers round {r + 1}/{p['rounds']}: {specs[key].label}, streaming")
                    runs[key]["stream"].append(await stream_round(
                        ctx, srv, conns=p["conns"], streams=1, tokens=p["tokens"], procs=p["procs"]))
                    ctx.log(f"  workers round {r + 1}/{p['rounds']}: {specs[key].label}, fan-out")
                    runs[key]["fanout"].append(await fanout_run(
                        ctx, srv, subs=p["subs"], messages=p["messages"], window=4, procs=p["procs"],
                        mode="broadcast", setup_max=300))
                finally:
                    await stop_all(servers)
    finally:
        redis.stop()

    def med(key: str, kind: str, field: str) -> float | None:
        return median([x[field] for x in runs[key][kind] if x.get(field) is not None])

    rows_stream, rows_fan = [], []
    for key, label in (("w1", "1 worker"), ("w2", "2 workers")):
        rows_stream.append([
            label, med(key, "stream", "tokens_per_s"),
            ratio(med(key, "stream", "tokens_per_s"), med("w1", "stream", "tokens_per_s")),
            med(key, "stream", "server_cpu_pct"), med(key, "stream", "server_cpu_us_per_token"),
            "yes" if all(x["ok"] for x in runs[key]["stream"]) else "NO",
        ])
        rows_fan.append([
            label, med(key, "fanout", "deliveries_per_s"),
            ratio(med(key, "fanout", "deliveries_per_s"), med("w1", "fanout", "deliveries_per_s")),
            med(key, "fanout", "lat_p50_ms"), med(key, "fanout", "lat_p99_ms"),
            med(key, "fanout", "server_cpu_us_per_delivery"),
            "yes" if all(x["ok"] for x in runs[key]["fanout"]) else "NO",
        ])
    scaling = {
        "streaming_tokens_per_s": ratio(med("w2", "stream", "tokens_per_s"), med("w1", "stream", "tokens_per_s")),
        "fanout_deliveries_per_s": ratio(med("w2", "fanout", "deliveries_per_s"),
                                         med("w1", "fanout", "deliveries_per_s")),
    }
    return {
        "scenario": "workers",
        "title": f"{TITLE} (median of {p['rounds']} round(s))",
        "params": p,
        "servers": {"runs": runs, "scaling": scaling},
        "tables": [
            {"columns": [f"streaming: {p['conns']} × {p['tokens']:,} tokens, unpaced", "tokens/s",
                         "scaling (÷ 1 worker)", "server CPU % (all processes)", "server CPU µs/token", "ok"],
             "rows": rows_stream},
            {"columns": [f"fan-out: 1 publisher → {p['subs']:,} subscribers", "deliveries/s",
                         "scaling (÷ 1 worker)", "latency p50 ms", "latency p99 ms", "server CPU µs/delivery", "ok"],
             "rows": rows_fan},
        ],
        "targets": [],
        "notes": [
            "Both servers use one redis-server this scenario starts, on the same 2 cores as the load generators: "
            "the ratio is what a second process buys on this machine (100 % server CPU = one core).",
            "With two workers a publication reaches the other worker's subscribers through Redis pub/sub; "
            "streaming frames are written to Redis before they are sent, by either count of workers.",
        ],
    }
