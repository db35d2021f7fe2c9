"""The files served over plain HTTP next to the WebSocket endpoint.

``GET /`` is the demo page (``wsserver/static/index.html``), ``/static/NAME``
any other file of ``wsserver/static/``, and ``/client/NAME`` the modules of
the bundled JS client. Those live in ``clients/js/src/`` in the repository;
a built wheel carries a copy in ``wsserver/static/client/`` (see the
``force-include`` in pyproject.toml), and a source checkout (editable
install) serves them straight from ``clients/js/src/``.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["StaticFiles"]

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".ts": "text/plain; charset=utf-8",
}
_SAFE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$")

#: ``wsserver/static/``: data files of the package, next to its modules.
PACKAGE_STATIC = Path(__file__).resolve().parent.parent / "static"


def _client_dir() -> Path:
    shipped = PACKAGE_STATIC / "client"
    if shipped.is_dir():
        return shipped
    return PACKAGE_STATIC.parent.parent / "clients" / "js" / "src"  # a source checkout


class StaticFiles:
    """Maps a request path to ``(content type, body)``, or None."""

    def __init__(self) -> None:
        self.roots = {"/static/": PACKAGE_STATIC, "/client/": _client_dir()}
        self._cache: dict[str, tuple[str, bytes] | None] = {}

    def get(self, path: str) -> tuple[str, bytes] | None:
        if path in self._cache:
            return self._cache[path]
        found = self._load(path)
        if len(self._cache) < 256:
            self._cache[path] = found
        return found

    def _load(self, path: str) -> tuple[str, bytes] | None:
        if path == "/":
            return self._read(PACKAGE_STATIC / "index.html")
        for prefix, root in self.roots.items():
            if path.startswith(prefix):
                name = path[len(prefix) :]
                if not _SAFE.fullmatch(name):  # no "..", no absolute paths, no dotfiles, no newline
                    return None
                return self._read(root / name)
        return None

    @staticmethod
    def _read(file: Path) -> tuple[str, bytes] | None:
        content_type = _TYPES.get(file.suffix)
        if content_type is None or not file.is_file():
            return None
        return content_type, file.read_bytes()
