"""``python -m bench``: run the scenarios, print tables, write JSON + PNG + Markdown.

Examples::

    python -m bench                      # full run -> bench/results/
    python -m bench --quick              # < 2 min -> bench/results/quick/
    python -m bench --scenario streaming --scenario fanout --profile
    python -m bench --quick --scenario streaming --set conns=4 --set tokens=200 --out /tmp/b
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from . import report
from .procs import REPO, BenchError, machine_info, server_specs
from .scenarios import RUNNERS, SCENARIOS, Ctx

RESULTS = REPO / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller counts; the whole run takes < 2 min")
    p.add_argument("--scenario", action="append", choices=SCENARIOS,
                   help="run only this scenario (repeatable); default: all eight")
    p.add_argument("--set", action="append", default=[], metavar="[SCENARIO.]KEY=VALUE",
                   help="override a parameter, e.g. conns=4, fanout.subs=100,500 (see bench/scenarios.py)")
    p.add_argument("--servers", help="comma list of other servers to include (wsserver always runs): wsserver-sse,raw,sse,naive")
    p.add_argument("--out", type=Path, help="results folder (default bench/results, or bench/results/quick)")
    p.add_argument("--profile", action="store_true",
                   help="also run wsserver once more under py-spy in streaming, fanout and service; "
                        "writes profile-*.txt")
    p.add_argument("--keep-tmp", action="store_true", help="keep the scratch folder (logs, samples)")
    p.add_argument("--wsserver-args", default="", metavar="ARGS",
                   help="extra flags for `wsserver serve`, e.g. --wsserver-args=--no-coalesce")
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.split(",") if "," in value else value
    return out


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def write_tokens(path: Path) -> None:
    """The simulated provider's reply to the bench's request, for the baselines."""
    from wsserver.wire.messages import ChatMessage
    from wsserver.providers.simulated import simulated_reply

    from .loadgen import MESSAGES

    msgs = [ChatMessage(**m) for m in MESSAGES]
    path.write_bytes(orjson.dumps(simulated_reply(msgs, 20_000)))


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Top frames of a py-spy ``--format raw`` file: self time and inclusive time."""
    selfc: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # one entry per function: "name (path:line)" -> "name (path)"
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")
                  if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        selfc[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        leaf_file = frames[-1].rpartition("(")[2].split(":")[0]
        files[_area(leaf_file)] += n
    if not total:
        return "no samples (py-spy missing or not permitted?)\n"
    out = [f"{total} samples of wsserver's busy time (py-spy, 250 Hz, idle excluded; C code such as "
           "the socket write counts against the Python line that called it)", "", "self time by area:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in files.most_common(12)]
    out += ["", f"top {top} frames by self time:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in selfc.most_common(top)]
    out += ["", f"top {top} frames by inclusive time:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in incl.most_common(top)]
    return "\n".join(out) + "\n"


def _area(path: str) -> str:
    for key in ("wsserver/", "websockets/", "uvloop", "asyncio/", "orjson", "pydantic", "json/"):
        if key in path:
            return key.strip("/")
    return path.rsplit("/", 1)[-1] or "?"


async def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out: Path = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="wsbench-"))
    nofile = raise_nofile()
    tokens = tmp / "tokens.json"
    write_tokens(tokens)
    scenarios = args.scenario or SCENARIOS
    overrides = parse_overrides(args.set)
    only = [s.strip() for s in args.servers.split(",")] if args.servers else None

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    specs = server_specs(tokens)
    specs["wsserver"].argv += shlex.split(args.wsserver_args)
    ctx = Ctx(quick=args.quick, tmp=tmp, specs=specs, overrides=overrides,
              only_servers=only, profile_dir=out if args.profile else None, log=log,
              lifetime=900 if args.quick else 3600)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "rlimit_nofile": nofile,
        "servers": {n: " ".join(Path(a).name if a == sys.executable else a for a in s.argv)
                    for n, s in ctx.specs.items()},
    }
    m = meta["machine"]
    log(f"machine: {m['cpus']} cores ({m['cpu_model']}), {m['mem_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; RLIMIT_NOFILE {nofile}; scratch {tmp}")
    results: list[dict[str, Any]] = []
    failed = False
    try:
        for name in scenarios:
            log(f"scenario {name}")
            t0 = time.monotonic()
            try:
                result = await RUNNERS[name](ctx)
            except BenchError as exc:
                log(f"scenario {name} FAILED: {exc}")
                failed = True
                continue
            result["duration_s"] = round(time.monotonic() - t0, 1)
            result["meta"] = meta
            results.append(result)
            text = report.render_scenario(result)
            print("\n" + text, flush=True)
            report.write_json(out / f"{name}.json", result)
            report.chart_scenario(result, out / f"{name}.png")
            if result.get("profile"):
                raw = Path(result["profile"])
                if raw.exists():
                    summary = summarize_profile(raw)
                    (out / f"profile-{name}.txt").write_text(summary)
                    print(f"profile of wsserver ({name}), top of {out / f'profile-{name}.txt'}:")
                    print("\n".join(summary.splitlines()[:20]) + "\n", flush=True)
    finally:
        if failed or args.keep_tmp:
            log(f"scratch kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    meta["elapsed_s"] = round(elapsed, 1)
    if results:
        write_summary(out, results + earlier_results(out, results), meta)
    targets = [t for r in results for t in r.get("targets", [])]
    print("\n## Targets\n")
    print(report.render_targets(targets) or "(none)")
    passed = sum(t["pass"] for t in targets)
    print(f"\n{passed} of {len(targets)} targets passed; {len(results)} scenario(s) in {elapsed:.0f} s; "
          f"results in {out}", flush=True)
    return 1 if failed else 0


def earlier_results(out: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored results of scenarios this invocation did not run (marked as such)."""
    ran = {r["scenario"] for r in results}
    extra = []
    for name in SCENARIOS:
        path = out / f"{name}.json"
        if name in ran or not path.exists():
            continue
        try:
            r = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            continue
        r["title"] += f" — from an earlier run ({r.get('meta', {}).get('date', '?')})"
        extra.append(r)
    return extra


def write_summary(out: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    m = meta["machine"]
    subtitle = (f"{meta['mode']} run {meta['date'][:10]}, {m['cpus']} cores, "
                f"wsserver {m.get('git_commit') or '?'}{' + local changes' if m.get('wsserver_dirty') else ''}")
    report.chart_summary(results, out / "summary.png", subtitle)
    lines = [
        f"Run of {meta['date']} ({meta['mode']}, `{meta['command']}`, {meta['elapsed_s']:.0f} s) on "
        f"{m['cpus']} cores ({m['cpu_model']}), {m['mem_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; "
        f"wsserver at {m.get('git_commit')}{' with local changes' if m.get('wsserver_dirty') else ''}. "
        "Every figure was measured in this one invocation; the machine is shared, so compare ratios, "
        "not absolute numbers.",
        "",
        "#### Targets",
        "",
        report.render_targets([t for r in results for t in r.get("targets", [])]),
        "",
    ]
    for r in results:
        lines += [report.render_scenario(r).replace("### ", "#### ", 1), ""]
    (out / "summary.md").write_text("\n".join(lines))
    report.write_json(out / "summary.json", {
        "meta": meta,
        "targets": [t for r in results for t in r.get("targets", [])],
        "scenarios": [r["scenario"] for r in results],
    })


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(run(args))
