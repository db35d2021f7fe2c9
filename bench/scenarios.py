"""The scenarios (the sixth, two nodes on Redis, is in cluster.py; the seventh, as a service runs, in
service.py; the eighth, one worker against two, in workers.py). Each returns a result dict (see ``report``) with its
tables, its targets and every raw number, all measured in this invocation.

Conventions: "ours ÷ this" columns divide wsserver's figure by the row's
figure; latencies are in ms; server CPU is user + system time of the server
process over the measured window (from ``go`` to the last load generator's
result), read with psutil.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import (
    BenchError,
    LoadGen,
    ServerProc,
    ServerSpec,
    loadavg,
    median,
    pct,
    read_samples,
    run_phase,
    start_servers,
)

OURS = "wsserver"

DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "streaming": {
        "full": {"conns": 100, "streams": 1, "tokens": 5000, "rounds": 3, "procs": 2,
                 "warmup_conns": 20, "warmup_tokens": 500},
        "quick": {"conns": 50, "streams": 1, "tokens": 2000, "rounds": 1, "procs": 2,
                  "warmup_conns": 10, "warmup_tokens": 200},
    },
    "paced": {
        "full": {"streams": 1000, "rate": 20.0, "tokens": 200, "ttft_ms": 0.0, "stagger_s": 1.0, "procs": 2,
                 "rounds": 3},
        "quick": {"streams": 1000, "rate": 20.0, "tokens": 40, "ttft_ms": 0.0, "stagger_s": 1.0, "procs": 2,
                  "rounds": 1},
    },
    "fanout": {
        "full": {"subs": [100, 1000, 5000], "messages": [3000, 300, 60], "window": 4, "procs": 2,
                 "setup_max_s": 900, "rounds": 3, "rounds_up_to": 1000},
        "quick": {"subs": [100, 1000], "messages": [1000, 100], "window": 4, "procs": 2,
                  "setup_max_s": 120, "rounds": 1, "rounds_up_to": 1000},
    },
    "idle": {
        "full": {"steps": [1000, 5000, 10000], "per_proc": 5000, "settle_s": 1.0},
        "quick": {"steps": [1000, 2000], "per_proc": 5000, "settle_s": 0.5},
    },
    "control": {
        "full": {"probes": 32, "rounds": 25, "rate": 50.0, "background": 200, "replay_messages": 1000,
                 "replay_reps": 20},
        "quick": {"probes": 16, "rounds": 6, "rate": 50.0, "background": 100, "replay_messages": 1000,
                  "replay_reps": 5},
    },
    "cluster": {
        "full": {"conns": 50, "tokens": 2000, "paced_streams": 500, "paced_rate": 20.0, "paced_tokens": 100,
                 "subs": 1000, "messages": 300, "rounds": 2},
        "quick": {"conns": 20, "tokens": 500, "paced_streams": 200, "paced_rate": 20.0, "paced_tokens": 40,
                  "subs": 200, "messages": 100, "rounds": 1},
    },
    "service": {
        "full": {"rate": 100.0, "duration_s": 240.0, "tokens": 100, "token_rate": 20.0, "ttft_ms": 0.0,
                 "window_s": 20.0, "procs": 2},
        "quick": {"rate": 50.0, "duration_s": 20.0, "tokens": 100, "token_rate": 20.0, "ttft_ms": 0.0,
                  "window_s": 5.0, "procs": 2},
    },
    "workers": {
        "full": {"conns": 100, "tokens": 5000, "subs": 1000, "messages": 300, "procs": 2, "rounds": 2},
        "quick": {"conns": 40, "tokens": 1000, "subs": 200, "messages": 100, "procs": 2, "rounds": 1},
    },
}
SCENARIOS = list(DEFAULTS)
SERVERS_FOR = {
    "streaming": ["wsserver", "wsserver-sse", "raw", "sse", "naive"],
    "paced": ["wsserver", "wsserver-sse", "raw", "sse", "naive"],
    "fanout": ["wsserver", "raw", "naive"],
    "idle": ["wsserver", "raw"],
    "control": ["wsserver", "raw", "naive"],
    "cluster": ["wsserver"],  # its own servers: see bench/cluster.py
    "service": ["wsserver", "raw"],
    "workers": ["wsserver"],  # its own servers: see bench/workers.py
}


@dataclass
class Ctx:
    quick: bool
    tmp: Path
    specs: dict[str, ServerSpec]
    overrides: dict[str, Any]
    only_servers: list[str] | None
    profile_dir: Path | None
    log: Callable[[str], None]
    lifetime: float = 1800.0
    notes: list[str] = field(default_factory=list)

    def params(self, scenario: str) -> dict[str, Any]:
        p = dict(DEFAULTS[scenario]["quick" if self.quick else "full"])
        for key, value in self.overrides.items():
            scope, _, name = key.rpartition(".")
            if scope in ("", scenario) and name in p:
                if isinstance(p[name], list):
                    p[name] = [int(v) for v in (value if isinstance(value, list) else [value])]
                else:
                    p[name] = type(p[name])(value)
        return p

    def servers(self, scenario: str) -> list[str]:
        names = SERVERS_FOR[scenario]
        if self.only_servers:
            names = [n for n in names if n in self.only_servers or n == OURS]
        return names

    async def start(self, names: list[str]) -> dict[str, ServerProc]:
        return await start_servers([self.specs[n] for n in names], self.tmp, self.lifetime)


def shares(total: int, parts: int) -> list[tuple[int, int]]:
    """(first, count) of ``parts`` nearly equal slices of ``total``."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    out, first = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((first, n))
        first += n
    return out


def ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def target(name: str, value: float | None, op: str, threshold: float, unit: str, detail: str = "") -> dict[str, Any]:
    ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "unit": unit,
            "pass": ok, "detail": detail}


async def stop_all(servers: dict[str, ServerProc]) -> None:
    await asyncio.gather(*(s.stop() for s in servers.values()))


def base_spec(ctx: Ctx, srv: ServerProc, role: str, name: str, **kw: Any) -> dict[str, Any]:
    return {"role": role, "kind": srv.spec.kind, "host": "127.0.0.1", "port": srv.port,
            "sample_dir": str(ctx.tmp), "name": name, **kw}


_seq = [0]


def uniq(prefix: str) -> str:
    _seq[0] += 1
    return f"{prefix}-{_seq[0]}"


# --------------------------------------------------------------- 1 streaming


async def stream_round(
    ctx: Ctx, srv: ServerProc, *, conns: int, streams: int, tokens: int, rate: float = 0.0,
    ttft_ms: float = 0.0, stagger_s: float = 0.0, procs: int = 2, run_timeout: float = 300.0,
    profile: Path | None = None, window: Any = None,
) -> dict[str, Any]:
    tag = uniq(f"{srv.name}-stream")
    specs = [
        base_spec(ctx, srv, "stream", f"{tag}-{i}", conns=n, first=first, total=conns, streams=streams,
                  tokens=tokens, rate=rate, ttft_ms=ttft_ms, stagger_s=stagger_s, run_timeout=run_timeout)
        for i, (first, n) in enumerate(shares(conns, procs))
    ]
    ph = await run_phase(srv, specs, logdir=ctx.tmp, setup_timeout=120, run_timeout=run_timeout,
                         profile=profile, window=window)
    res = ph.results
    total = sum(r["tokens"] for r in res)
    frames = sum(r["frames"] for r in res)
    t0 = min(r["t_first"] for r in res)
    t1 = max(r["t_last"] for r in res)
    span = t1 - t0 if t1 > t0 else float("nan")
    expected = conns * streams * tokens
    reasons: dict[str, int] = {}
    for r in res:
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    bad = [b for r in res for b in r["bad_frames"]]
    out: dict[str, Any] = {
        "tokens": total,
        "expected_tokens": expected,
        "frames": frames,
        "wall_s": span,
        "tokens_per_s": total / span if span == span else None,
        "frames_per_s": frames / span if span == span else None,
        "tokens_per_frame": total / frames if frames else None,
        "server_cpu_s": ph.cpu_s,
        "server_user_s": ph.user_s,
        "server_sys_s": ph.sys_s,
        "server_cpu_us_per_token": ph.cpu_s / total * 1e6 if total else None,
        "server_cpu_pct": 100 * ph.cpu_s / ph.wall_s,
        "client_cpu_us_per_token": sum(r["client_cpu_s"] for r in res) / total * 1e6 if total else None,
        "reasons": reasons,
        "bad_frames": bad[:3],
        "timed_out": any(r["timed_out"] for r in res),
        "ok": total == expected and not bad and not any(r["timed_out"] for r in res)
        and reasons.get("complete", 0) == conns * streams,
        "loadavg": loadavg(),
    }
    if rate > 0:
        lat = read_samples([r["lat_file"] for r in res])
        out.update({f"lat_p{q}_ms": ms(pct(lat, q)) for q in (50, 90, 99)})
        out["lat_max_ms"] = ms(lat[-1]) if lat else None
        out["lat_samples"] = len(lat)
    else:
        ttft = read_samples([r["ttft_file"] for r in res])
        gaps = read_samples([r["gap_file"] for r in res])
        out.update({"ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
                    "gap_p50_ms": ms(pct(gaps, 50)), "gap_p99_ms": ms(pct(gaps, 99)),
                    "gap_max_ms": ms(gaps[-1]) if gaps else None})
    return out


async def scenario_streaming(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params("streaming")
    names = ctx.servers("streaming")
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    profile = None
    for r in range(p["rounds"] + (1 if ctx.profile_dir is not None else 0)):
        profiling = r == p["rounds"]
        # fresh servers every round: wsserver keeps detached sessions (and their replay
        # logs) for session_ttl, which would otherwise weigh on the next round
        servers = await ctx.start([OURS] if profiling else names)
        try:
            for n in servers:  # warm-up: imports, first-call paths, allocator
                await stream_round(ctx, servers[n], conns=p["warmup_conns"], streams=1,
                                   tokens=p["warmup_tokens"], procs=1)
            if profiling:
                ctx.log("  streaming: profiling wsserver (py-spy, not counted)")
                profile = ctx.profile_dir / "profile-streaming.raw"  # type: ignore[operator]
                await stream_round(ctx, servers[OURS], conns=p["conns"], streams=p["streams"],
                                   tokens=p["tokens"], procs=p["procs"], profile=profile)
                continue
            order = names[r % len(names):] + names[: r % len(names)]  # rotate: no fixed order bias
            for n in order:
                ctx.log(f"  streaming round {r + 1}/{p['rounds']}: {n}")
                rounds[n].append(await stream_round(
                    ctx, servers[n], conns=p["conns"], streams=p["streams"], tokens=p["tokens"],
                    procs=p["procs"]))
        finally:
            await stop_all(servers)

    keys = ["tokens_per_s", "frames_per_s", "tokens_per_frame", "server_cpu_us_per_token", "server_cpu_pct",
            "client_cpu_us_per_token", "ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms", "gap_max_ms"]
    summary = {n: {k: median([x[k] for x in rounds[n] if x.get(k) is not None]) for k in keys} for n in names}
    for n in names:
        summary[n]["ok"] = all(x["ok"] for x in rounds[n])
        summary[n]["label"] = ctx.specs[n].label
    ours = summary[OURS]
    # per-round ratios (same round index): how much the ratio itself moves
    per_round = {
        n: [ratio(a["tokens_per_s"], b["tokens_per_s"]) for a, b in zip(rounds[OURS], rounds[n])]
        for n in names if n != OURS
    }
    rows = []
    for n in names:
        s = summary[n]
        rows.append([
            s["label"], s["tokens_per_s"], ratio(ours["tokens_per_s"], s["tokens_per_s"]),
            s["frames_per_s"], s["tokens_per_frame"],
            s["server_cpu_us_per_token"], ratio(ours["server_cpu_us_per_token"], s["server_cpu_us_per_token"]),
            s["server_cpu_pct"], s["ttft_p50_ms"], s["ttft_p99_ms"], s["gap_p99_ms"],
            s["client_cpu_us_per_token"], "yes" if s["ok"] else "NO",
        ])
    targets = []
    if "raw" in summary:
        targets.append(target("streaming tokens/s ≥ 0.8 × raw websockets",
                              ratio(ours["tokens_per_s"], summary["raw"]["tokens_per_s"]), ">=", 0.8, "×"))
    if "sse" in summary:
        targets.append(target("streaming tokens/s ≥ 1.2 × FastAPI + SSE",
                              ratio(ours["tokens_per_s"], summary["sse"]["tokens_per_s"]), ">=", 1.2, "×"))
    if "sse" in summary and "wsserver-sse" in summary:
        targets.append(target("streaming tokens/s over SSE ≥ 1.2 × FastAPI + SSE",
                              ratio(summary["wsserver-sse"]["tokens_per_s"], summary["sse"]["tokens_per_s"]),
                              ">=", 1.2, "×"))
    if "raw" in summary:
        targets.append(target("server CPU per token ≤ 1.25 × raw websockets",
                              ratio(ours["server_cpu_us_per_token"], summary["raw"]["server_cpu_us_per_token"]),
                              "<=", 1.25, "×"))
    return {
        "scenario": "streaming",
        "title": f"1. Token streaming: {p['conns']} connections × {p['streams']} stream × "
                 f"{p['tokens']:,} tokens, unpaced (median of {p['rounds']} interleaved round(s))",
        "params": p,
        "servers": summary,
        "rounds": rounds,
        "per_round_ratio_tokens_per_s": per_round,
        "tables": [{
            "columns": ["server", "tokens/s", "ours ÷ this", "frames/s", "tokens/frame",
                        "server CPU µs/token", "ours ÷ this", "server CPU %", "TTFT p50 ms",
                        "TTFT p99 ms", "gap p99 ms", "client CPU µs/token", "ok"],
            "rows": rows,
        }],
        "targets": targets,
        "profile": str(profile) if profile else None,
        "notes": [
            "Latency here is measured at the client: TTFT = request sent → first delta received; "
            "gap = time between consecutive deliveries to one stream. wsserver frames carry no server "
            "timestamp, so server-stamp → receipt latency is measured in the paced scenario (against the "
            "provider's schedule) instead.",
            "tokens/s = tokens delivered (sum of stream.end usage.output_tokens, checked against the "
            "request) ÷ (last stream.end − first request), all connections open before the clock starts. "
            "wsserver merges a stream's pending deltas into one frame (tokens/frame); the baselines send "
            "one frame per token. Every round starts every server afresh, after a warm-up.",
        ],
    }


# ------------------------------------------------------------------ 2 paced


async def scenario_paced(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params("paced")
    names = ctx.servers("paced")
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(p["rounds"]):
        servers = await ctx.start(names)  # fresh every round (see streaming)
        try:
            for n in names:
                await stream_round(ctx, servers[n], conns=10, streams=1, tokens=200, procs=1)  # warm-up
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                ctx.log(f"  paced round {r + 1}/{p['rounds']}: {n}")
                rounds[n].append(await stream_round(
                    ctx, servers[n], conns=p["streams"], streams=1, tokens=p["tokens"], rate=p["rate"],
                    ttft_ms=p["ttft_ms"], stagger_s=p["stagger_s"], procs=p["procs"],
                    run_timeout=p["tokens"] / p["rate"] + p["stagger_s"] + 120))
        finally:
            await stop_all(servers)
    keys = ["tokens", "lat_p50_ms", "lat_p90_ms", "lat_p99_ms", "lat_max_ms", "server_cpu_pct",
            "server_cpu_us_per_token"]
    res: dict[str, dict[str, Any]] = {}
    for n in names:
        res[n] = {k: median([x[k] for x in rounds[n] if x.get(k) is not None]) for k in keys}
        res[n]["p99_range_ms"] = [min(x["lat_p99_ms"] for x in rounds[n]), max(x["lat_p99_ms"] for x in rounds[n])]
        res[n]["ok"] = all(x["ok"] for x in rounds[n])
        res[n]["label"] = ctx.specs[n].label
    ours = res[OURS]
    rows = []
    for n in names:
        s = res[n]
        lo, hi = s["p99_range_ms"]
        rows.append([s["label"], int(s["tokens"]), s["lat_p50_ms"], s["lat_p90_ms"], s["lat_p99_ms"],
                     f"{lo:.1f} – {hi:.1f}" if p["rounds"] > 1 else "–", s["lat_max_ms"],
                     ratio(ours["lat_p99_ms"], s["lat_p99_ms"]), s["server_cpu_pct"],
                     s["server_cpu_us_per_token"], ratio(ours["server_cpu_us_per_token"], s["server_cpu_us_per_token"]),
                     "yes" if s["ok"] else "NO"])
    detail = ", ".join(f"{res[n]['label']} {res[n]['lat_p99_ms']:.2f} ms" for n in names
                       if n != OURS and res[n]["lat_p99_ms"] is not None)
    return {
        "scenario": "paced",
        "title": f"2. Paced streaming: {p['streams']:,} streams at {p['rate']:g} tokens/s × {p['tokens']} tokens "
                 f"(starts spread over {p['stagger_s']:g} s; median of {p['rounds']} interleaved round(s))",
        "params": p,
        "servers": res,
        "rounds": rounds,
        "tables": [{
            "columns": ["server", "tokens", "latency p50 ms", "p90 ms", "p99 ms", "p99 range ms", "max ms",
                        "ours ÷ this (p99)",
                        "server CPU %", "server CPU µs/token", "ours ÷ this (CPU)", "ok"],
            "rows": rows,
        }],
        "targets": [target(f"paced p99 ≤ 5 ms at {p['streams']:,} streams", ours["lat_p99_ms"], "<=", 5.0, "ms",
                           f"same run: {detail}")],
        "notes": [
            "Latency of token i = its arrival − (request sent + ttft + i / rate): the provider's schedule "
            "(wsserver's simulated provider and the baselines pace identically), so it includes request "
            "transit, scheduling and delivery. A coalesced frame's tokens each count against their own slot.",
            "Every round starts every server afresh: wsserver keeps each finished session (replay log "
            "included) for session_ttl (120 s), and sessions left over from earlier rounds slow it down "
            "(see the README).",
            "Server CPU % = server CPU time ÷ wall time of the run (100 % = one core). All servers run on "
            "uvloop, whose timers have 1 ms granularity: a token may even arrive up to ~1 ms *before* its slot.",
        ],
    }


# ----------------------------------------------------------------- 3 fan-out


async def fanout_run(ctx: Ctx, srv: ServerProc, *, subs: int, messages: int, window: int, procs: int,
                     mode: str, setup_max: float, profile: Path | None = None) -> dict[str, Any]:
    tag = uniq(f"{srv.name}-{mode}-fan{subs}")
    channel = tag
    run_timeout = 120 + messages * subs / 5000
    specs = [
        base_spec(ctx, srv, "fanout_sub", f"{tag}-sub{i}", conns=n, channel=channel, messages=messages,
                  run_timeout=run_timeout + setup_max)
        for i, (_, n) in enumerate(shares(subs, procs))
    ]
    specs.append(base_spec(ctx, srv, "fanout_pub", f"{tag}-pub", channel=channel, messages=messages,
                           window=window, mode=mode, run_timeout=run_timeout))
    ph = await run_phase(srv, specs, logdir=ctx.tmp, setup_timeout=setup_max, run_timeout=run_timeout,
                         quiesce_max=setup_max, profile=profile)
    pub = ph.results[-1]
    subs_res = ph.results[:-1]
    received = sum(r["received"] for r in subs_res)
    expected = sum(r["expected"] for r in subs_res)
    t_last = max(r["t_last"] for r in subs_res)
    span = t_last - pub["t_first"]
    lat = read_samples([r["lat_file"] for r in subs_res])
    ok = received == expected and not pub["errors"] and not pub["timed_out"]
    return {
        "subs": subs, "messages": messages, "mode": mode,
        "deliveries": received, "expected": expected,
        "deliveries_per_s": received / span if span > 0 else None,
        "server_cpu_us_per_delivery": ph.cpu_s / received * 1e6 if received else None,
        "server_cpu_s": ph.cpu_s, "server_user_s": ph.user_s, "server_sys_s": ph.sys_s,
        "lat_p50_ms": ms(pct(lat, 50)), "lat_p99_ms": ms(pct(lat, 99)), "lat_max_ms": ms(lat[-1]) if lat else None,
        "setup_s": ph.setup_s + ph.quiesce_s,
        "other_frames": sum(r["other_frames"] for r in subs_res),
        "publisher_errors": pub["errors"][:3],
        "client_cpu_us_per_delivery": sum(r["client_cpu_s"] for r in subs_res) / received * 1e6 if received else None,
        "ok": ok,
        "loadavg": loadavg(),
    }


FANOUT_VARIANTS = [  # (row key, server, mode, label)
    ("wsserver", "wsserver", "broadcast", "wsserver (ours)"),
    ("raw-broadcast", "raw", "broadcast", "raw websockets broadcast()"),
    ("raw-loop", "raw", "loop", "raw websockets await send() loop"),
    ("naive-loop", "naive", "loop", "naive FastAPI send_text() loop"),
]


async def scenario_fanout(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params("fanout")
    names = ctx.servers("fanout")
    variants = [v for v in FANOUT_VARIANTS if v[1] in names]
    results: dict[str, dict[str, Any]] = {}  # f"{key}@{N}"
    profile = None
    subs_list = [int(x) for x in p["subs"]]
    msgs_list = [int(x) for x in p["messages"]]
    for i, subs in enumerate(subs_list):
        messages = msgs_list[min(i, len(msgs_list) - 1)]
        servers = await ctx.start(names)  # fresh per N: no detached sessions of earlier runs
        n_rounds = p["rounds"] if subs <= p["rounds_up_to"] else 1
        runs: dict[str, list[dict[str, Any]]] = {v[0]: [] for v in variants}
        try:
            for rnd in range(n_rounds):
                order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
                for key, server, mode, label in order:
                    ctx.log(f"  fanout N={subs} round {rnd + 1}/{n_rounds}: {key}")
                    try:
                        r = await fanout_run(ctx, servers[server], subs=subs, messages=messages,
                                             window=p["window"], procs=p["procs"], mode=mode,
                                             setup_max=p["setup_max_s"])
                    except BenchError as exc:
                        ctx.log(f"    failed: {str(exc).splitlines()[0]}")
                        r = {"subs": subs, "messages": messages, "mode": mode, "error": str(exc)[:500], "ok": False}
                    runs[key].append(r)
            for key, _, mode, label in variants:
                ok_runs = [x for x in runs[key] if "error" not in x]
                agg: dict[str, Any] = {"subs": subs, "messages": messages, "mode": mode, "label": label,
                                       "rounds": runs[key], "ok": bool(ok_runs) and all(x["ok"] for x in runs[key])}
                for k in ("deliveries_per_s", "server_cpu_us_per_delivery", "lat_p50_ms", "lat_p99_ms",
                          "lat_max_ms", "setup_s", "client_cpu_us_per_delivery"):
                    agg[k] = median([x[k] for x in ok_runs if x.get(k) is not None])
                results[f"{key}@{subs}"] = agg
            if ctx.profile_dir is not None and subs == max(s for s in subs_list if s <= 1000):
                ctx.log(f"  fanout N={subs}: profiling wsserver (py-spy, not counted)")
                profile = ctx.profile_dir / "profile-fanout.raw"
                await fanout_run(ctx, servers[OURS], subs=subs, messages=messages, window=p["window"],
                                 procs=p["procs"], mode="broadcast", setup_max=p["setup_max_s"], profile=profile)
        finally:
            await stop_all(servers)
    rows = []
    for subs in subs_list:
        ours = results.get(f"{OURS}@{subs}", {})
        for key, _, _, label in variants:
            r = results.get(f"{key}@{subs}")
            if r is None:
                continue
            rows.append([label, subs, r.get("deliveries_per_s"), ratio(ours.get("deliveries_per_s"), r.get("deliveries_per_s")),
                         r.get("server_cpu_us_per_delivery"),
                         ratio(ours.get("server_cpu_us_per_delivery"), r.get("server_cpu_us_per_delivery")),
                         r.get("lat_p50_ms"), r.get("lat_p99_ms"), r.get("setup_s"),
                         "yes" if r.get("ok") else "NO"])
    at = 1000 if 1000 in subs_list else max(subs_list)
    ours_at, raw_at = results.get(f"{OURS}@{at}", {}), results.get(f"raw-broadcast@{at}", {})
    targets = []
    if raw_at:
        targets.append(target(f"fan-out deliveries/s ≥ 0.9 × raw broadcast() at {at:,} subscribers",
                              ratio(ours_at.get("deliveries_per_s"), raw_at.get("deliveries_per_s")), ">=", 0.9, "×"))
    return {
        "scenario": "fanout",
        "title": "3. Fan-out: one publisher → N subscribers of one channel "
                 f"(N = {', '.join(f'{s:,}' for s in subs_list)}; {p['window']} publishes in flight; "
                 f"median of {p['rounds']} interleaved rounds up to {p['rounds_up_to']:,} subscribers)",
        "params": p,
        "servers": results,
        "tables": [{
            "columns": ["server", "subscribers", "deliveries/s", "ours ÷ this", "server CPU µs/delivery",
                        "ours ÷ this", "latency p50 ms", "latency p99 ms", "setup s", "ok"],
            "rows": rows,
        }],
        "targets": targets,
        "profile": str(profile) if profile else None,
        "notes": [
            "The publisher keeps a fixed number of publishes in flight (each answered by an ok once the "
            "server has handed the message to every subscriber's socket). deliveries/s = messages received by "
            "all subscribers ÷ (last receipt − first publish). Latency = receipt − the publisher's stamp in "
            "the message (one monotonic clock for all processes).",
            "setup s = connecting and subscribing all N, then waiting until the server is idle again: for "
            "wsserver that includes the presence storm (every join is announced to every member: N²/2 "
            "presence frames, and each subscribed reply lists all members).",
        ],
    }


# -------------------------------------------------------------------- 4 idle


async def scenario_idle(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params("idle")
    names = ctx.servers("idle")
    steps = [int(x) for x in p["steps"]]
    res: dict[str, dict[str, Any]] = {}
    for n in names:
        ctx.log(f"  idle: {n}")
        servers = await ctx.start([n])
        srv = servers[n]
        gens: list[LoadGen] = []
        try:
            warm = LoadGen(base_spec(ctx, srv, "idle", uniq(f"{n}-idlewarm")), ctx.tmp)
            await warm.start(120)
            await warm.expect("READY", 30)
            warm.send("open 50")
            await warm.expect("OPENED", 60)
            warm.send("quit")
            await warm.expect("RESULT", 30)
            await warm.stop()
            await asyncio.sleep(1.0)
            await srv.quiesce(10)
            base = srv.rss()
            procs = max(1, math.ceil(max(steps) / p["per_proc"]))
            gens = [LoadGen(base_spec(ctx, srv, "idle", uniq(f"{n}-idle{i}")), ctx.tmp) for i in range(procs)]
            for g in gens:
                await g.start(ctx.lifetime)
            for g in gens:
                await g.expect("READY", 30)
            points = []
            for step in steps:
                t0 = time.monotonic()
                for g, (_, count) in zip(gens, shares(step, procs)):
                    g.send(f"open {count}")
                opened = [await g.expect("OPENED", 300) for g in gens]
                alive = sum(o["conns"] for o in opened)
                await asyncio.sleep(p["settle_s"])
                await srv.quiesce(30)
                rss = srv.rss()
                c0 = srv.cpu()
                await asyncio.sleep(1.0)
                idle_cpu = 100 * (srv.cpu() - c0)
                points.append({"conns": step, "alive": alive, "rss_mib": rss / 2**20,
                               "kib_per_conn": (rss - base) / step / 1024, "idle_cpu_pct": idle_cpu,
                               "open_s": time.monotonic() - t0, "ok": alive == step})
                ctx.log(f"    {step:,} connections: {(rss - base) / step / 1024:.1f} KiB/conn")
            for g in gens:
                g.send("quit")
            res[n] = {"label": ctx.specs[n].label, "base_rss_mib": base / 2**20, "points": points}
        finally:
            for g in gens:
                g.kill()
            await stop_all(servers)
    ours = res[OURS]
    rows = []
    for i, step in enumerate(steps):
        for n in names:
            pt = res[n]["points"][i]
            rows.append([res[n]["label"], step, pt["rss_mib"], pt["kib_per_conn"],
                         ratio(ours["points"][i]["kib_per_conn"], pt["kib_per_conn"]),
                         pt["idle_cpu_pct"], pt["open_s"], "yes" if pt["ok"] else "NO"])
    targets = []
    if "raw" in res:
        for i, step in enumerate(steps):
            targets.append(target(f"idle RSS/conn ≤ 1.3 × raw websockets at {step:,} connections",
                                  ratio(ours["points"][i]["kib_per_conn"], res["raw"]["points"][i]["kib_per_conn"]),
                                  "<=", 1.3, "×"))
    return {
        "scenario": "idle",
        "title": f"4. Idle connections: RSS per connection at {', '.join(f'{s:,}' for s in steps)} connections",
        "params": p,
        "servers": res,
        "tables": [{"columns": ["server", "connections", "server RSS MiB", "KiB/conn", "ours ÷ this",
                                "idle server CPU %", "open s", "ok"],
                    "rows": rows}],
        "targets": targets,
        "notes": [
            "KiB/conn = (server RSS with the connections open − RSS after a 50-connection warm-up) ÷ "
            "connections. Every wsserver connection has said hello and holds a session; every raw "
            "connection has exchanged one message. Idle server CPU % = CPU used over 1 s with all "
            "connections open and silent; open s = time to open the step's new connections (handshake + hello).",
        ],
    }


# ------------------------------------------------------------------ 5 control


async def scenario_control(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params("control")
    names = ctx.servers("control")
    servers = await ctx.start(names)
    cancel: dict[str, dict[str, Any]] = {}
    replay: dict[str, dict[str, Any]] = {}
    try:
        for n in names:
            srv = servers[n]
            ctx.log(f"  control: cancel on {n} (with {p['background']} paced streams in the background)")
            bg = None
            if p["background"]:
                # 60 s of tokens: outlasts the probes (replies are computed up front by
                # wsserver's simulated provider, ~0.3 µs a token, so keep them short)
                bg = LoadGen(base_spec(ctx, srv, "stream", uniq(f"{n}-bg"), conns=p["background"], streams=1,
                                       tokens=1200, rate=20.0, ttft_ms=0.0, stagger_s=1.0, first=0,
                                       total=p["background"], run_timeout=900), ctx.tmp)
                await bg.start(ctx.lifetime)
                await bg.expect("READY", 120)
                bg.send("go")
                await asyncio.sleep(1.5)
            try:
                spec = base_spec(ctx, srv, "cancel", uniq(f"{n}-cancel"), conns=p["probes"], rounds=p["rounds"],
                                 rate=p["rate"], tokens=int(p["rate"] * 10), ttft_ms=0.0, run_timeout=300)
                ph = await run_phase(srv, [spec], logdir=ctx.tmp, setup_timeout=60, run_timeout=300,
                                     quiesce_max=0)
            finally:
                if bg is not None:
                    bg.kill()
            r = ph.results[0]
            lat = read_samples([r["lat_file"]])
            cancel[n] = {"label": ctx.specs[n].label, "samples": r["samples"],
                         "p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99)), "max_ms": ms(lat[-1]) if lat else None,
                         "reasons": r["reasons"], "errors": r["errors"],
                         "ok": r["samples"] == p["probes"] * p["rounds"] and not r["errors"]}
            await srv.quiesce(10)
            ctx.log(f"  control: replay on {n}")
            spec = base_spec(ctx, srv, "replay", uniq(f"{n}-replay"), messages=p["replay_messages"],
                             reps=p["replay_reps"], run_timeout=120)
            ph = await run_phase(srv, [spec], logdir=ctx.tmp, setup_timeout=60, run_timeout=120)
            r = ph.results[0]
            rs = sorted(r["replay_s"])
            replay[n] = {"label": ctx.specs[n].label, "reps": len(rs), "frames": [min(r["frames"], default=0)],
                         "frames_all": r["frames"],
                         "replay_p50_ms": ms(pct(rs, 50)), "replay_max_ms": ms(rs[-1]) if rs else None,
                         "reconnect_p50_ms": ms(median(r["reconnect_s"])),
                         "errors": r["errors"], "ok": len(rs) == p["replay_reps"] and not r["errors"]}
    finally:
        await stop_all(servers)
    oc, orp = cancel[OURS], replay[OURS]
    rows_c = [[c["label"], c["samples"], c["p50_ms"], c["p99_ms"], c["max_ms"], ratio(oc["p99_ms"], c["p99_ms"]),
               ", ".join(f"{k} {v}" for k, v in c["reasons"].items()), "yes" if c["ok"] else "NO"]
              for c in cancel.values()]
    rows_r = [[r["label"], r["frames"][0] if r["frames"] else None, r["replay_p50_ms"], r["replay_max_ms"],
               ratio(orp["replay_p50_ms"], r["replay_p50_ms"]), r["reconnect_p50_ms"], "yes" if r["ok"] else "NO"]
              for r in replay.values()]
    ctx_c = ", ".join(f"{c['label']} {c['p99_ms']:.2f} ms" for k, c in cancel.items() if k != OURS and c["p99_ms"])
    ctx_r = ", ".join(f"{r['label']} {r['replay_p50_ms']:.2f} ms" for k, r in replay.items()
                      if k != OURS and r["replay_p50_ms"])
    return {
        "scenario": "control",
        "title": f"5. Control latency: cancel → stream.end ({p['probes']} probes × {p['rounds']} cancels, "
                 f"{p['background']} paced streams in the background); resume + replay of "
                 f"{p['replay_messages']:,} missed messages ({p['replay_reps']} times)",
        "params": p,
        "servers": {"cancel": cancel, "replay": replay},
        "tables": [
            {"columns": ["server", "cancels", "cancel→end p50 ms", "p99 ms", "max ms", "ours ÷ this (p99)",
                         "end reasons", "ok"], "rows": rows_c},
            {"columns": ["server", "frames replayed (min)", "replay p50 ms", "replay max ms", "ours ÷ this (p50)",
                         "reconnect + replay p50 ms", "ok"], "rows": rows_r},
        ],
        "targets": [
            target("cancel → stream.end p99 ≤ 10 ms", oc["p99_ms"], "<=", 10.0, "ms", f"same run: {ctx_c}"),
            target(f"replay of {p['replay_messages']:,} messages ≤ 50 ms (median)", orp["replay_p50_ms"], "<=",
                   50.0, "ms", f"same run: {ctx_r}"),
        ],
        "notes": [
            f"Cancel: each probe starts a stream paced at {p['rate']:g} tokens/s, waits for 3 deltas and a random "
            "fraction of a token interval, sends cancel and times until its stream.end arrives.",
            "Replay: wsserver — hello, generate (paced at 5,000 tokens/s so that the log holds one frame per "
            "token), wait for stream.start, drop the TCP connection (no close frame), "
            "let the stream finish detached, then time from sending hello {session, last_seq} on a new "
            "connection to the last replayed frame (stream.end). Baselines — one request for the same number of "
            "stored frames, sent one await send() each. 'reconnect + replay' adds TCP connect and the WebSocket "
            "handshake.",
        ],
    }


async def scenario_cluster(ctx: Ctx) -> dict[str, Any]:
    from .cluster import scenario_cluster as run  # (it builds on this module)

    return await run(ctx)


async def scenario_service(ctx: Ctx) -> dict[str, Any]:
    from .service import scenario_service as run  # (it builds on this module)

    return await run(ctx)


async def scenario_workers(ctx: Ctx) -> dict[str, Any]:
    from .workers import scenario_workers as run  # (it builds on this module)

    return await run(ctx)


RUNNERS: dict[str, Callable[[Ctx], Awaitable[dict[str, Any]]]] = {
    "streaming": scenario_streaming,
    "paced": scenario_paced,
    "fanout": scenario_fanout,
    "idle": scenario_idle,
    "control": scenario_control,
    "cluster": scenario_cluster,
    "service": scenario_service,
    "workers": scenario_workers,
}
