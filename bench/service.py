"""Scenario 7: as a service runs — users keep arriving, connections churn.

Each user connects, says hello, takes one reply of ``tokens`` tokens paced at
``token_rate``, and disconnects; ``rate`` new users a second for
``duration_s`` (so about ``rate × tokens / token_rate`` streams are live at
once). The server runs with its default settings, so every finished session
stays detached for ``session_ttl`` (120 s): after two minutes a wsserver holds
about ``rate × 120`` of them. The same churn runs against raw websockets,
which keeps nothing.

Measured per time window: the p99 of token latency against the provider's
schedule (as in the paced scenario), the connect + hello time, the server's
RSS and CPU. At the end wsserver's ``/metrics`` is scraped for its garbage
collector's pauses (``wsserver_gc_pause_seconds`` by generation) and its
session counts.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from array import array
from pathlib import Path
from typing import Any

import orjson

from .procs import LoadGen, ServerProc, loadavg, pct, start_profiler, stop_profiler
from .scenarios import OURS, Ctx, base_spec, ms, ratio, stop_all, stream_round, target, uniq
from .wsclient import connect

TITLE = "7. As a service runs"


def _windows(times: array, values: array, width: float, duration: float) -> list[list[float]]:
    """``values`` split by ``times`` into windows of ``width`` s (each sorted)."""
    count = max(1, int(round(duration / width)))
    out: list[list[float]] = [[] for _ in range(count)]
    for t, v in zip(times, values):
        out[min(count - 1, max(0, int(t // width)))].append(v)
    for w in out:
        w.sort()
    return out


def _read(path: str) -> array:
    out = array("d")
    with open(path, "rb") as f:
        out.frombytes(f.read())
    return out


def scrape(port: int) -> dict[str, Any]:
    """wsserver's /metrics: GC pauses by generation and session counts."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    gc: dict[str, dict[str, Any]] = {}
    sessions: dict[str, float] = {}
    paced: dict[str, int] = {}  # the paced collector's gauges (--gc paced)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            gen = s.labels.get("generation")
            if s.name == "wsserver_gc_pause_seconds_bucket":
                gc.setdefault(gen, {}).setdefault("buckets", []).append((float(s.labels["le"]), s.value))
            elif s.name == "wsserver_gc_pause_seconds_count":
                gc.setdefault(gen, {})["count"] = int(s.value)
            elif s.name == "wsserver_gc_pause_seconds_sum":
                gc.setdefault(gen, {})["sum_s"] = s.value
            elif s.name == "wsserver_gc_pause_max_seconds":
                gc.setdefault(gen, {})["max_s"] = s.value
            elif s.name == "wsserver_sessions":
                sessions[s.labels["state"]] = s.value
            elif s.name == "wsserver_sessions_parked":
                sessions["parked"] = s.value
            elif s.name == "wsserver_sessions_parked_bytes":
                sessions["parked_bytes"] = s.value
            elif s.name in ("wsserver_gc_old_objects", "wsserver_gc_full_collections"):
                paced[s.name[len("wsserver_gc_"):]] = int(s.value)
    for g in gc.values():
        g["buckets"].sort()
        g["p50_le_s"] = _bucket_quantile(g["buckets"], g.get("count", 0), 0.5)
        g["p99_le_s"] = _bucket_quantile(g["buckets"], g.get("count", 0), 0.99)
    return {"gc": gc, "sessions": sessions, "paced": paced}


async def raw_gc(port: int) -> dict[str, Any]:
    """The raw baseline's own GC pauses (its ``gc`` request), shaped like :func:`scrape`'s."""
    conn = await connect("127.0.0.1", port)
    try:
        conn.send(b'{"op":"gc"}')
        reply = orjson.loads(await conn.recv())
    finally:
        conn.close()
    return {"gc": {str(g): {"count": c, "sum_s": total, "max_s": longest}
                   for g, (c, total, longest) in enumerate(reply["gc"])}, "sessions": {}}


def _bucket_quantile(buckets: list[tuple[float, float]], count: int, q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (cumulative buckets)."""
    if not count:
        return None
    for le, cumulative in buckets:
        if cumulative >= q * count:
            return le
    return None


async def churn_run(ctx: Ctx, srv: ServerProc, p: dict[str, Any], profile: Path | None = None) -> dict[str, Any]:
    """One server under the churn; samples RSS and CPU every second meanwhile
    (``profile``: py-spy records the server meanwhile, into that file)."""
    tag = uniq(f"{srv.name}-churn")
    procs = p["procs"]
    run_timeout = p["tokens"] / p["token_rate"] + 90
    specs = [
        base_spec(ctx, srv, "churn", f"{tag}-{i}", rate=p["rate"] / procs, offset=i / p["rate"],
                  duration_s=p["duration_s"], tokens=p["tokens"], token_rate=p["token_rate"],
                  ttft_ms=p["ttft_ms"], run_timeout=run_timeout)
        for i in range(procs)
    ]
    gens = [LoadGen(s, ctx.tmp) for s in specs]
    rss: list[tuple[float, float]] = []
    cpu: list[tuple[float, float]] = []
    spy = None
    try:
        for g in gens:
            await g.start(p["duration_s"] + run_timeout + 120)
        for g in gens:
            await g.expect("READY", 60)
        await srv.quiesce(10)
        if profile is not None:
            spy = start_profiler(srv, profile)
        t0 = time.monotonic()
        rss.append((0.0, srv.rss() / 2**20))
        cpu.append((0.0, srv.cpu()))
        for g in gens:
            g.send("go")
        waiting = [asyncio.ensure_future(g.expect("RESULT", p["duration_s"] + run_timeout + 30)) for g in gens]
        while not all(w.done() for w in waiting):
            await asyncio.wait(waiting, timeout=1.0)
            now = time.monotonic() - t0
            rss.append((now, srv.rss() / 2**20))
            cpu.append((now, srv.cpu()))
        results = [w.result() for w in waiting]
        metrics = scrape(srv.port) if srv.spec.kind == "wsserver" else await raw_gc(srv.port)
    finally:
        if spy is not None:
            stop_profiler(spy)
        for g in gens:
            g.kill()
    width, duration = p["window_s"], p["duration_s"]
    lat = _windows(*_merge(results, "lat_t_file", "lat_file"), width, duration)
    hello = _windows(*_merge(results, "hello_t_file", "hello_file"), width, duration)
    everything = sorted(v for w in lat for v in w)
    windows = []
    for i, (w, h) in enumerate(zip(lat, hello)):
        end = (i + 1) * width
        r = _at(rss, end)
        c1, c0 = _at(cpu, end), _at(cpu, end - width)
        windows.append({
            "start_s": i * width, "end_s": end, "tokens": len(w),
            "lat_p50_ms": ms(pct(w, 50)), "lat_p99_ms": ms(pct(w, 99)), "lat_max_ms": ms(w[-1]) if w else None,
            "hello_p99_ms": ms(pct(h, 99)), "users": len(h),
            "rss_mib": r, "cpu_pct": 100 * (c1 - c0) / width if c1 is not None and c0 is not None else None,
        })
    started = sum(r["started"] for r in results)
    completed = sum(r["completed"] for r in results)
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    return {
        "label": srv.spec.label,
        "users_started": started,
        "users_completed": completed,
        "users_failed": sum(r["failed"] for r in results),
        "live_max": sum(r["live_max"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
        "expected_tokens": started * p["tokens"],
        "lat_p50_ms": ms(pct(everything, 50)), "lat_p99_ms": ms(pct(everything, 99)),
        "lat_max_ms": ms(everything[-1]) if everything else None,
        "first_p99_ms": windows[0]["lat_p99_ms"], "last_p99_ms": windows[-1]["lat_p99_ms"],
        "rss_start_mib": rss[0][1], "rss_end_mib": rss[-1][1], "rss_max_mib": max(x[1] for x in rss),
        "cpu_pct": 100 * (cpu[-1][1] - cpu[0][1]) / cpu[-1][0] if cpu[-1][0] else None,
        "windows": windows,
        "rss_series": rss,
        "metrics": metrics,
        "reasons": reasons,
        "errors": [e for r in results for e in r["errors"]][:5],
        "client_cpu_s": sum(r["client_cpu_s"] for r in results),
        "ok": completed == started and not any(r["timed_out"] for r in results)
        and sum(r["tokens"] for r in results) == started * p["tokens"],
        "loadavg": loadavg(),
    }


def _paced_note(ours: dict[str, Any]) -> str:
    paced = (ours.get("metrics") or {}).get("paced") or {}
    if not paced:
        return " wsserver ran Python's own collector (--gc python)."
    return (f" wsserver paced its collector (--gc paced, the default): {paced.get('full_collections', 0)} full "
            f"collection(s) in the run, {paced.get('old_objects', 0):,} objects in the oldest generation at the end.")


def _merge(results: list[dict[str, Any]], t_key: str, v_key: str) -> tuple[array, array]:
    times, values = array("d"), array("d")
    for r in results:
        times.extend(_read(r[t_key]))
        values.extend(_read(r[v_key]))
    return times, values


def _at(series: list[tuple[float, float]], t: float) -> float | None:
    """The last sample taken at or before ``t`` s."""
    found = None
    for when, value in series:
        if when > t + 0.5:
            break
        found = value
    return found


async def scenario_service(ctx: Ctx) -> dict[str, Any]:
    p = ctx.params("service")
    names = ctx.servers("service")
    res: dict[str, dict[str, Any]] = {}
    for n in names:  # one at a time, each fresh: they would compete for the 2 cores
        servers = await ctx.start([n])
        try:
            await stream_round(ctx, servers[n], conns=10, streams=1, tokens=200, procs=1)  # warm-up
            ctx.log(f"  service: {n}, {p['rate']:g} users/s for {p['duration_s']:g} s")
            res[n] = await churn_run(ctx, servers[n], p)
        finally:
            await stop_all(servers)
    profile = None
    if ctx.profile_dir is not None:  # once more, under py-spy (not counted), a minute at most
        profile = ctx.profile_dir / "profile-service.raw"
        servers = await ctx.start([OURS])
        try:
            ctx.log("  service: profiling wsserver (py-spy, not counted)")
            await churn_run(ctx, servers[OURS], {**p, "duration_s": min(p["duration_s"], 60.0)}, profile)
        finally:
            await stop_all(servers)
    ours = res[OURS]
    gc = (ours.get("metrics") or {}).get("gc", {})
    sessions = (ours.get("metrics") or {}).get("sessions", {})
    detached = int(sessions.get("detached", 0))
    longest = max((g.get("max_s", 0.0) for g in gc.values()), default=None)
    # What a retained session costs: the bytes it keeps parked, and the RSS growth
    # over the run per retained session beyond raw websockets' own growth (an upper
    # bound: it includes what the allocator kept of the live connections' memory).
    parked = int(sessions.get("parked", 0))
    held_b = sessions["parked_bytes"] / parked if parked and "parked_bytes" in sessions else None
    growth = ours["rss_end_mib"] - ours["rss_start_mib"]
    if "raw" in res:
        growth -= res["raw"]["rss_end_mib"] - res["raw"]["rss_start_mib"]
    rss_kib = growth * 1024 / detached if detached else None
    memory = {"parked_bytes_per_session": held_b, "rss_kib_per_retained_session": rss_kib,
              "sessions_per_gib": 2**20 / rss_kib if rss_kib and rss_kib > 0 else None}
    rows = []
    for n in names:
        s = res[n]
        rows.append([
            s["label"], s["users_completed"], s["live_max"], s["lat_p50_ms"], s["lat_p99_ms"],
            ratio(ours["lat_p99_ms"], s["lat_p99_ms"]), s["first_p99_ms"], s["last_p99_ms"],
            ratio(s["last_p99_ms"], s["first_p99_ms"]), s["rss_start_mib"], s["rss_end_mib"], s["cpu_pct"],
            "yes" if s["ok"] else "NO",
        ])
    win_cols = ["window s"]
    for n in names:
        short = "ours" if n == OURS else res[n]["label"]
        win_cols += [f"{short} p99 ms", f"{short} hello p99 ms", f"{short} RSS MiB", f"{short} CPU %"]
    win_rows = []
    for i, w in enumerate(ours["windows"]):
        row: list[Any] = [f"{w['start_s']:g}–{w['end_s']:g}"]
        for n in names:
            x = res[n]["windows"][i]
            row += [x["lat_p99_ms"], x["hello_p99_ms"], x["rss_mib"], x["cpu_pct"]]
        win_rows.append(row)
    gc_rows = []
    for n in names:
        their = (res[n].get("metrics") or {}).get("gc", {})
        gc_rows += [
            [res[n]["label"], g, their[g].get("count"), ms(their[g].get("p50_le_s")), ms(their[g].get("p99_le_s")),
             ms(their[g].get("max_s")), ms(their[g]["sum_s"] / their[g]["count"]) if their[g].get("count") else None,
             their[g].get("sum_s")]
            for g in sorted(their)
        ]
    targets = []
    if "raw" in res:
        targets.append(target("service: p99 ≤ 2 × raw websockets under churn",
                              ratio(ours["lat_p99_ms"], res["raw"]["lat_p99_ms"]), "<=", 2.0, "×",
                              f"ours {ours['lat_p99_ms']:.1f} ms, raw websockets {res['raw']['lat_p99_ms']:.1f} ms"))
    targets.append(target("service: last window's p99 ≤ 1.3 × the first's",
                          ratio(ours["last_p99_ms"], ours["first_p99_ms"]), "<=", 1.3, "×",
                          f"{ours['first_p99_ms']:.1f} → {ours['last_p99_ms']:.1f} ms"))
    targets.append(target(f"service: no GC pause over 20 ms with {detached:,} detached sessions",
                          ms(longest), "<=", 20.0, "ms",
                          "longest collection, any generation (wsserver_gc_pause_max_seconds)"))
    return {
        "scenario": "service",
        "title": f"{TITLE}: {p['rate']:g} new connections/s for {p['duration_s']:g} s, each one reply of "
                 f"{p['tokens']} tokens at {p['token_rate']:g} tokens/s, then gone (default session_ttl)",
        "params": p,
        "servers": res,
        "tables": [
            {"columns": ["server", "users", "live max", "latency p50 ms", "p99 ms", "ours ÷ this (p99)",
                         "first window p99 ms", "last window p99 ms", "last ÷ first", "RSS start MiB",
                         "RSS end MiB", "server CPU %", "ok"],
             "rows": rows},
            {"columns": win_cols, "rows": win_rows},
            {"columns": ["server", "GC generation", "collections", "p50 ms (≤)", "p99 ms (≤)", "max ms",
                         "mean ms", "total s"],
             "rows": gc_rows},
            {"columns": ["retained (detached) sessions at the end", "parked", "bytes kept per parked session",
                         "RSS growth per retained session KiB", "retained sessions per GiB of RSS"],
             "rows": [[detached, parked, held_b, rss_kib, memory["sessions_per_gib"]]]},
        ],
        "memory": memory,
        "targets": targets,
        "profile": str(profile) if profile else None,
        "notes": [
            "Latency of token i = its arrival − (generate sent + ttft + i / rate), the provider's schedule, as in "
            "the paced scenario; windows by arrival time. 'hello' = TCP connect + WebSocket handshake + hello → "
            "welcome (the baseline's hello is one request and one reply).",
            f"At the end wsserver held {detached:,} detached sessions ({int(sessions.get('parked', 0)):,} of them "
            f"parked) and {int(sessions.get('attached', 0)):,} attached (its /metrics, scraped after the last user "
            "left). GC pauses are measured inside each server "
            "with gc.callbacks (wsserver: wsserver_gc_pause_seconds, whose p50/p99 are bucket bounds; raw "
            "websockets: its own timer, asked at the end); max is exact." + _paced_note(ours),
            "Servers run one after the other, each fresh after a warm-up, with their default settings apart from "
            "the benchmark's (see the README).",
            "Bytes kept = wsserver_sessions_parked_bytes ÷ parked sessions (the log's frames and the session's "
            "state as one bytes each). RSS growth per retained session = (wsserver's RSS growth over the run − raw "
            "websockets' growth under the same churn) ÷ retained sessions: an upper bound, the allocator keeps "
            "some of the live connections' memory too.",
        ],
    }
