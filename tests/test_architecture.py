"""The house (ARCHITECTURE.md): imports only run downward, parts keep out of
each other's private state, and no module or class grows past its size.

    cli -> server -> cluster -> core -> wire
    server -> providers -> wire;  client -> wire;  config: imported by cli and server

The checks read the source (ast); nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wsserver"

#: Which parts each part may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "core": {"wire"},
    "cluster": {"core", "wire"},
    "providers": {"wire"},
    "server": {"cluster", "core", "wire", "providers", "config", "root"},
    "client": {"wire"},
    "config": set(),
    "cli": {"server", "client", "wire", "config", "root"},
    "root": {"client"},  # wsserver.connect, imported lazily
    "main": {"cli"},
}
#: Libraries the sans-I/O parts must not import.
NO_IO = {"asyncio", "websockets", "redis", "uvloop", "httpx", "httpx2", "openai", "anthropic", "socket"}
FORBIDDEN_LIBS = {"wire": NO_IO, "core": NO_IO}
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 420


def part_of(module: str) -> str:
    """``wsserver.core.session`` -> ``core``."""
    parts = module.split(".")
    if parts == ["wsserver"]:
        return "root"
    if parts[1] == "__main__":
        return "main"
    return parts[1]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out.append((name.removesuffix(".__init__"), path))
    return out


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """Every module ``module`` imports (relative imports resolved), with its line.
    ``from . import name`` counts as importing ``package.name``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if node.module is None:
                found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((base, node.lineno))
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    here = part_of(module)
    wrong = []
    for target, line in imports(module, source, is_package):
        top = target.split(".")[0]
        if top == "wsserver":
            if target == "wsserver.__version__":
                target = "wsserver"
            there = part_of(target)
            if there != here and there not in ALLOWED[here]:
                wrong.append(f"{line}: {here} imports {there} ({target})")
        elif top in FORBIDDEN_LIBS.get(here, ()):
            wrong.append(f"{line}: {here} imports {top} (it does no I/O)")
    return wrong


def test_the_check_sees_an_upward_import() -> None:
    bad = "import asyncio\nfrom ..server.app import Server\nfrom . import session\n"
    assert violations("wsserver.core.x", bad) == [
        "1: core imports asyncio (it does no I/O)",
        "2: core imports server (wsserver.server.app)",
    ]
    assert violations("wsserver.cluster.redis", "from ..core.session import Session\n") == []


def test_imports_run_downward_only() -> None:
    wrong = []
    for module, path in modules():
        for problem in violations(module, path.read_text(), path.name == "__init__.py"):
            wrong.append(f"{path.relative_to(PACKAGE.parent)}:{problem}")
    assert not wrong, "imports that run upward or sideways:\n" + "\n".join(wrong)


def test_nothing_imports_cli() -> None:
    for module, path in modules():
        if part_of(module) in ("cli", "main"):
            continue
        targets = [t for t, _ in imports(module, path.read_text(), path.name == "__init__.py")]
        assert not [t for t in targets if t == "wsserver.cli" or t.startswith("wsserver.cli.")], module


def private_access(source: str) -> list[int]:
    """Lines where ``x._private`` is read on something other than ``self``/``cls``."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]


def test_the_check_sees_a_private_member() -> None:
    assert sorted(private_access("self._a = 1\nserver._sessions.get(x)\nself._bp._queue\nobj.__class__\n")) == [2, 3]


@pytest.mark.parametrize("part", ["cluster", "server", "core", "providers", "wire"])
def test_no_private_member_of_another_object(part: str) -> None:
    """``x._private`` only on ``self`` (or ``cls``): parts talk through public members."""
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for module, path in modules()
        if part_of(module) == part
        for line in private_access(path.read_text())
    ]
    assert not wrong, "private members reached from outside:\n" + "\n".join(wrong)


def test_sizes() -> None:
    """No module over ~600 lines, no class over ~400 (ARCHITECTURE.md)."""
    wrong = []
    for _, path in modules():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            wrong.append(f"{path.relative_to(PACKAGE.parent)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not wrong, "\n".join(wrong)
