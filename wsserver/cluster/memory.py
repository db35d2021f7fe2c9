"""The memory backplane: one process; channels, presence and agent names in memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.channels import Channels, Delivery
from .backplane import Backplane, ClusterEvents

if TYPE_CHECKING:
    from ..core.actions import MessagingCall
    from ..core.session import Session

__all__ = ["MemoryBackplane"]


class MemoryBackplane(Backplane):
    """Every messaging call is answered at once by :class:`~wsserver.core.channels.Channels`.

    Args:
        history: the channels' history bounds (``history_size``,
            ``history_ttl``, ``history_bytes``, ``history_bytes_per_publisher``:
            see :class:`~wsserver.core.channels.Channels`).
    """

    def __init__(self, **history: Any) -> None:
        super().__init__()
        self.channels = Channels(**history)

    async def start(self, events: ClusterEvents) -> None:
        self.channels.on_output = events.deliveries_pending

    def session_ended(self, session: Session) -> None:
        self.channels.leave_all(session)

    def agent_held(self, name: str) -> bool:
        return name in self.channels.agents

    def claim_agent(self, name: str, session: Session) -> None:
        self.channels.claim_agent(name, session)

    def call(self, session: Session, call: MessagingCall) -> None:
        self.channels.carry_out(session, call)

    def publish_nowait(self, channel: str, sender: str, data: bytes, publisher: str = "") -> None:
        self.channels.publish(channel, sender, data, publisher)

    def take_deliveries(self) -> list[Delivery]:
        return self.channels.take_deliveries()

    def sweep(self) -> None:
        self.channels.sweep()
