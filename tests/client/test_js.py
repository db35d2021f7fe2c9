"""The bundled JS client's own tests (``clients/js``, ``node --test``), run from pytest.

They cover the client with a mock WebSocket and a fake clock, the protocol
vectors, the client against this server (started by the tests as
``python -m wsserver serve`` with this interpreter), and the demo page in
headless Chromium. Without ``node`` the test is skipped, unless ``CI`` is
set: then it fails, as does a missing browser inside the node tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "clients" / "js"
CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _tail(text: str, limit: int = 20_000) -> str:
    return text if len(text) <= limit else "…\n" + text[-limit:]


@pytest.mark.timeout(300)
def test_js_client() -> None:
    node = shutil.which("node")
    if node is None:
        if CI:
            pytest.fail("node is not installed (CI=true): the JS client's tests need Node >= 20")
        pytest.skip("node is not installed: the JS client's tests need Node >= 20")
    env = {**os.environ, "WSSERVER_PYTHON": sys.executable}
    if not (JS / "node_modules").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("clients/js/node_modules is missing and npm is not installed: run `npm ci` in clients/js")
        install = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=JS, env=env, capture_output=True, text=True, timeout=240
        )
        assert install.returncode == 0, f"npm ci failed:\n{_tail(install.stdout + install.stderr)}"
    files = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))
    assert files, "no JS test files in clients/js/test"
    proc = subprocess.run(
        [node, "--test", "--test-reporter=spec", *files],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = proc.stdout + proc.stderr
    summary = "\n".join(line for line in output.splitlines() if line.startswith("ℹ "))
    assert proc.returncode == 0, f"node --test failed (exit {proc.returncode}):\n{_tail(output)}"
    print(summary)
