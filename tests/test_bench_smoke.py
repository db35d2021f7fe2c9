"""Smoke test of the benchmark harness (``python -m bench``).

Runs the streaming scenario with tiny counts against wsserver and every
baseline, and checks only that the harness runs, prints its table and writes
its JSON and chart. No performance thresholds: the numbers of a shared
2-core machine mean nothing at this size. Needs the ``bench`` extra
(``pip install -e '.[test,bench]'``); skipped without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

for _module in ("psutil", "matplotlib", "fastapi", "sse_starlette", "uvicorn", "aiohttp", "httptools"):
    pytest.importorskip(_module, reason="the bench extra is not installed")

REPO = Path(__file__).resolve().parent.parent


def test_quick_streaming_runs_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "bench", "--quick", "--scenario", "streaming", "--out", str(out),
        "--set", "conns=4", "--set", "tokens=200", "--set", "procs=1",
        "--set", "warmup_conns=2", "--set", "warmup_tokens=20",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| server | tokens/s |" in proc.stdout
    assert "| wsserver (ours) |" in proc.stdout
    result = json.loads((out / "streaming.json").read_text())
    assert result["scenario"] == "streaming"
    assert set(result["servers"]) == {"wsserver", "wsserver-sse", "raw", "sse", "naive"}
    for server in result["servers"].values():
        assert server["ok"], server  # every token arrived, every stream ended
    assert (out / "streaming.png").stat().st_size > 0
    assert (out / "summary.md").exists()
