"""Backplanes: what several wsserver nodes share.

The :class:`Backplane` interface is what the transport (:mod:`wsserver.server`)
calls at the few points where a node meets the others:

* a ``hello`` may name a session another node owns (:meth:`Backplane.route`);
* every sequenced frame is written to the backplane *before* it is sent
  (:meth:`Backplane.write_log`), so a client never holds a seq that a
  surviving node does not know;
* subscribe, publish and send go through the backplane when ``hub.remote`` is
  set (:meth:`Backplane.call`), because channel offsets, history, presence and
  agent names are shared.

:class:`MemoryBackplane` is the embedded default: one process, the
:class:`~wsserver.hub.Hub` does everything in memory and every method here is
a no-op. :class:`~wsserver.backplane.redis_backplane.RedisBackplane` shares
sessions, channels, presence and agent names through Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..hub import Hub

if TYPE_CHECKING:
    from ..session import HubCall, Session

__all__ = ["Backplane", "MemoryBackplane", "Route"]


class Route:
    """Where a ``hello`` goes: served here (``owner`` None) or tunnelled to ``owner``."""

    __slots__ = ("owner",)

    def __init__(self, owner: str | None = None) -> None:
        self.owner = owner


LOCAL = Route()


class Backplane:
    """The interface; the base class is the memory backplane's behaviour."""

    #: True when other nodes share this backplane.
    shared = False
    #: This node's name (``None`` alone).
    node: str | None = None
    hub: Hub

    async def start(self) -> None:
        """Connect (a shared backplane) before the server accepts connections."""

    async def close(self) -> None:
        """Disconnect; sessions stay in the backplane for other nodes to adopt."""

    def status(self) -> str | None:
        """``None`` when healthy, else why the node is degraded (for ``/readyz``)."""
        return None

    async def route(self, conn: Any, hello: dict[str, Any]) -> Route:
        """Decide where the connection's ``hello`` is served; may adopt a lost node's sessions."""
        return LOCAL

    async def call(self, session: Session, call: HubCall) -> None:
        """Carry out a subscribe, publish or send of ``session`` (only when ``hub.remote``)."""
        raise NotImplementedError

    async def write_log(self, session: Session | None) -> None:
        """Write ``session.unsynced`` (if any) before those frames are sent."""

    def write_log_nowait(self, session: Session) -> None:
        """Write ``session.unsynced`` in order with other writes, without waiting."""

    def session_opened(self, session: Session) -> None:
        """A new session was opened on this node."""

    def session_ended(self, session: Session) -> None:
        """A session ended (expired, replaced, shut down): forget it."""


class MemoryBackplane(Backplane):
    """One process: the hub keeps channels, presence and agent names in memory."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub


def create(server: Any) -> Backplane:
    """The backplane ``server.config`` asks for (Redis when ``redis_url`` is set)."""
    cfg = server.config
    if cfg.redis_url:
        from .redis_backplane import RedisBackplane

        return RedisBackplane(server, cfg.redis_url, node_id=cfg.node_id, node_timeout=cfg.node_timeout)
    return MemoryBackplane(
        Hub(deliver=server._deliver, history_size=cfg.channel_history, history_ttl=cfg.channel_history_ttl)
    )
