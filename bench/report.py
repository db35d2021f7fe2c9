"""Tables (Markdown, printed and written), targets, JSON and PNG charts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

OURS_COLOR = "#1f5fbf"
BASE_COLORS = ["#8c8c8c", "#c9a227", "#6aa86a", "#b25d91"]
PASS, FAIL = "#2e9e44", "#d0342c"


def fmt(value: Any, column: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if "÷" in column or "/frame" in column:
            return f"{value:.2f}"
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.0f}"
        if a >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def render_table(table: dict[str, Any]) -> str:
    cols = table["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in table["rows"]:
        lines.append("| " + " | ".join(fmt(v, c) for v, c in zip(row, cols)) + " |")
    return "\n".join(lines)


def target_value(t: dict[str, Any]) -> str:
    v = t["value"]
    if v is None:
        return "–"
    return f"{v:.2f}{'×' if t['unit'] == '×' else ' ' + t['unit']}"


def render_targets(targets: list[dict[str, Any]]) -> str:
    if not targets:
        return ""
    lines = ["| target | measured | result | context |", "|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['name']} | {target_value(t)} | {'PASS' if t['pass'] else 'FAIL'} | {t.get('detail') or ''} |")
    return "\n".join(lines)


def render_scenario(result: dict[str, Any]) -> str:
    parts = [f"### {result['title']}", ""]
    for table in result["tables"]:
        parts += [render_table(table), ""]
    if result.get("targets"):
        parts += [render_targets(result["targets"]), ""]
    for note in result.get("notes", []):
        parts.append(f"- {note}")
    return "\n".join(parts).rstrip() + "\n"


def write_json(path: Path, data: Any) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


# -------------------------------------------------------------------- charts


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.MaxNLocator = matplotlib.ticker.MaxNLocator
    return plt


def _colors(labels: list[str]) -> list[str]:
    out, k = [], 0
    for label in labels:
        if "ours" in label:
            out.append(OURS_COLOR)
        else:
            out.append(BASE_COLORS[k % len(BASE_COLORS)])
            k += 1
    return out


def _bars(ax: Any, labels: list[str], values: list[float | None], title: str, unit: str,
          ratio_to: float | None = None, lower_is_better: bool = False) -> None:
    vals = [v if v is not None else 0.0 for v in values]
    colors = _colors(labels)
    y = range(len(labels))
    ax.barh(list(y), vals, color=colors)
    ax.set_yticks(list(y), [lab.replace(" (ours)", "\n(ours)") for lab in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title + ("  (lower is better)" if lower_is_better else ""), fontsize=9)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    top = max(vals) if vals and max(vals) > 0 else 1
    ax.set_xlim(0, top * 1.75)
    ax.xaxis.set_major_formatter(_ticks())
    ax.xaxis.set_major_locator(_plt().MaxNLocator(4))
    for i, (v, raw) in enumerate(zip(vals, values)):
        text = "–" if raw is None else fmt(float(raw))
        if raw is not None and ratio_to and "ours" not in labels[i] and v:
            text += f"  (ours {ratio_to / v:.2f}×)"
        ax.text(v + top * 0.02, i, text, va="center", fontsize=7)


def ms_or_none(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _ticks():  # type: ignore[no-untyped-def]
    from matplotlib.ticker import FuncFormatter

    def f(x: float, _pos: int) -> str:
        if abs(x) >= 1e6:
            return f"{x / 1e6:g}M"
        if abs(x) >= 1e3:
            return f"{x / 1e3:g}k"
        return f"{x:g}"

    return FuncFormatter(f)


def chart_scenario(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    sc = result["scenario"]
    if sc == "streaming":
        s = result["servers"]
        labels = [v["label"] for v in s.values()]
        ours = s["wsserver"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        _bars(axes[0], labels, [v["tokens_per_s"] for v in s.values()], "tokens/s delivered", "tokens/s",
              ours["tokens_per_s"])
        _bars(axes[1], labels, [v["server_cpu_us_per_token"] for v in s.values()], "server CPU per token",
              "µs/token", ours["server_cpu_us_per_token"], True)
        _bars(axes[2], labels, [v["gap_p99_ms"] for v in s.values()], "p99 gap between deliveries",
              "ms", ours["gap_p99_ms"], True)
    elif sc == "paced":
        s = result["servers"]
        labels = [v["label"] for v in s.values()]
        ours = s["wsserver"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        _bars(axes[0], labels, [v["lat_p50_ms"] for v in s.values()], "latency p50 vs schedule", "ms",
              ours["lat_p50_ms"], True)
        _bars(axes[1], labels, [v["lat_p99_ms"] for v in s.values()], "latency p99 vs schedule", "ms",
              ours["lat_p99_ms"], True)
        _bars(axes[2], labels, [v["server_cpu_pct"] for v in s.values()], "server CPU", "% of one core",
              ours["server_cpu_pct"], True)
    elif sc == "fanout":
        res = result["servers"]
        subs = sorted({v["subs"] for v in res.values()})
        keys = []
        for k in res:
            base = k.split("@")[0]
            if base not in keys:
                keys.append(base)
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
        width = 0.8 / max(1, len(keys))
        labels = [next(v["label"] for kk, v in res.items() if kk.startswith(k + "@")) for k in keys]
        colors = _colors(labels)
        for j, k in enumerate(keys):
            xs = [i + j * width for i in range(len(subs))]
            d = [res.get(f"{k}@{n}", {}).get("deliveries_per_s") or 0 for n in subs]
            l99 = [res.get(f"{k}@{n}", {}).get("lat_p99_ms") or 0 for n in subs]
            axes[0].bar(xs, d, width, color=colors[j], label=labels[j])
            axes[1].bar(xs, l99, width, color=colors[j], label=labels[j])
        for ax, title in ((axes[0], "deliveries/s"), (axes[1], "delivery latency p99 ms (lower is better)")):
            ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(subs))],
                          [f"{n:,} subscribers" for n in subs], fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
        axes[0].yaxis.set_major_formatter(_ticks())
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(keys), fontsize=7)
        fig.subplots_adjust(bottom=0.2)
    elif sc == "idle":
        res = result["servers"]
        names = list(res)
        steps = [pt["conns"] for pt in res[names[0]]["points"]]
        labels = [res[n]["label"] for n in names]
        colors = _colors(labels)
        fig, ax = plt.subplots(1, 1, figsize=(8, 3.4))
        width = 0.8 / len(names)
        for j, n in enumerate(names):
            xs = [i + j * width for i in range(len(steps))]
            vals = [pt["kib_per_conn"] for pt in res[n]["points"]]
            ax.bar(xs, vals, width, color=colors[j], label=labels[j])
            for x, v in zip(xs, vals):
                ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(steps))],
                      [f"{s:,} connections" for s in steps], fontsize=8)
        ax.set_title("server RSS per idle connection, KiB (lower is better)", fontsize=9)
        ax.legend(fontsize=7)
    elif sc == "control":
        c, r = result["servers"]["cancel"], result["servers"]["replay"]
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.2))
        _bars(axes[0], [v["label"] for v in c.values()], [v["p99_ms"] for v in c.values()],
              "cancel → stream.end p99", "ms", c["wsserver"]["p99_ms"], True)
        _bars(axes[1], [v["label"] for v in r.values()], [v["replay_p50_ms"] for v in r.values()],
              "replay of missed messages, median", "ms", r["wsserver"]["replay_p50_ms"], True)
    elif sc == "cluster":
        if not result["tables"]:
            return  # skipped (no redis-server)
        rows = [t["rows"] for t in result["tables"][:3]]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        labels = ["one node", "2 nodes + Redis"]
        _bars(axes[0], labels, [r[1] for r in rows[0]], "streaming tokens/s", "tokens/s")
        _bars(axes[1], labels, [r[2] for r in rows[1]], "paced latency p99", "ms", None, True)
        _bars(axes[2], labels, [r[1] for r in rows[2]], "fan-out deliveries/s", "deliveries/s")
    elif sc == "workers":
        if not result["tables"]:
            return  # skipped (no redis-server)
        rows = [t["rows"] for t in result["tables"]]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.0))
        labels = [r[0] for r in rows[0]]
        _bars(axes[0], labels, [r[1] for r in rows[0]], "streaming tokens/s", "tokens/s")
        _bars(axes[1], labels, [r[1] for r in rows[1]], "fan-out deliveries/s", "deliveries/s")
    elif sc == "service":
        res = result["servers"]
        labels = [v["label"] for v in res.values()]
        colors = _colors(labels)
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for (name, v), color in zip(res.items(), colors):
            mids = [(w["start_s"] + w["end_s"]) / 2 for w in v["windows"]]
            axes[0].plot(mids, [w["lat_p99_ms"] or 0 for w in v["windows"]], marker="o", ms=3, color=color,
                         label=v["label"])
            axes[1].plot([t for t, _ in v["rss_series"]], [r for _, r in v["rss_series"]], color=color,
                         label=v["label"])
        axes[0].set_title("token latency p99 per window, ms (lower is better)", fontsize=9)
        axes[1].set_title("server RSS, MiB", fontsize=9)
        for ax in axes[:2]:
            ax.set_xlabel("s since the first user", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        gc = ((res.get("wsserver") or {}).get("metrics") or {}).get("gc", {})
        gens = sorted(gc)
        _bars(axes[2], [f"generation {g}" for g in gens], [ms_or_none(gc[g].get("max_s")) for g in gens],
              "wsserver's longest GC pause (20 ms target)", "ms")
        axes[2].axvline(20, color=FAIL, lw=1, ls="--")
    else:  # pragma: no cover
        return
    fig.suptitle(result["title"], fontsize=9.5)
    fig.tight_layout(rect=(0, 0.07 if sc == "fanout" else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_summary(results: list[dict[str, Any]], path: Path, subtitle: str) -> None:
    """Every target as a margin: ≥ 1 passes (value ÷ threshold, or threshold ÷ value for ≤ targets)."""
    plt = _plt()
    targets = [t for r in results for t in r.get("targets", [])]
    if not targets:
        return
    fig, ax = plt.subplots(1, 1, figsize=(11, 0.45 * len(targets) + 1.4))
    margins = []
    for t in targets:
        v = t["value"]
        if v is None or v == 0:
            margins.append(0.0)
        else:
            margins.append(v / t["threshold"] if t["op"] == ">=" else t["threshold"] / v)
    y = list(range(len(targets)))
    ax.barh(y, margins, color=[PASS if t["pass"] else FAIL for t in targets])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(y, [t["name"] for t in targets], fontsize=8)
    ax.invert_yaxis()
    top = max(margins + [1.0])
    ax.set_xlim(0, top * 1.45)
    for i, (m, t) in enumerate(zip(margins, targets)):
        ax.text(m + top * 0.01, i, f"{target_value(t)}  {'PASS' if t['pass'] else 'FAIL'}", va="center", fontsize=8)
    ax.set_xlabel("margin to target (≥ 1 passes: measured ÷ target for '≥', target ÷ measured for '≤')",
                  fontsize=8)
    ax.set_title(f"wsserver benchmark targets — {subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
