"""The WebSocket transport and everything that runs a node: ``Server``.

Imports core, cluster, providers and wire; nothing below imports it.
"""

from __future__ import annotations

from .app import Server, default_providers

__all__ = ["Server", "default_providers"]
