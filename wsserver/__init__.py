"""wsserver: a bidirectional WebSocket server for interactive LLM sessions.

``wsserver.connect(url)`` opens a Python client (see :mod:`wsserver.client`);
``wsserver serve`` runs the server (see :mod:`wsserver.cli`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "connect"]

if TYPE_CHECKING:
    from .client import connect


def __getattr__(name: str) -> Any:
    # The client is imported lazily so that `import wsserver` stays cheap.
    if name == "connect":
        from .client import connect

        return connect
    raise AttributeError(f"module 'wsserver' has no attribute {name!r}")
