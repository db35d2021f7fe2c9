"""The memory backplane: one process; channels, presence, agent names and routed calls in memory."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ..core.channels import Channels, Delivery
from .backplane import ROUTE_TTL_S, Backplane, ClusterEvents

if TYPE_CHECKING:
    from ..core.actions import AnswerCall, MessagingCall, RouteCall
    from ..core.session import Session


@dataclass(slots=True, eq=False)
class _Routed:
    """A call routed to an agent's session: whose run made it, and its answer."""

    requester: str
    stream: str
    call: str
    agent: Session
    expires: float
    answered: bytes | None = None

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
        #: Calls routed to agents, by route id.
        self.routes: dict[str, _Routed] = {}
        self.events: ClusterEvents | None = None

    async def start(self, events: ClusterEvents) -> None:
        self.events = events
        self.channels.on_output = events.deliveries_pending

    def session_ended(self, session: Session) -> None:
        self.channels.leave_all(session)

    def agent_held(self, name: str) -> bool:
        return name in self.channels.agents

    def claim_agent(self, name: str, session: Session) -> None:
        self.channels.claim_agent(name, session)

    def call(self, session: Session, call: MessagingCall) -> None:
        self.channels.carry_out(session, call)

    async def route_call(self, session: Session, call: RouteCall) -> bool:
        agent = self.channels.agents.get(call.agent)
        if agent is None:
            return False
        if call.route not in self.routes:
            expires = time.monotonic() + ROUTE_TTL_S
            self.routes[call.route] = _Routed(session.id, call.stream_id, call.call_id, agent, expires)
            agent.members.deliver_tool_call(session.name, call.route, call.name, call.arguments)
        return True

    async def answer_call(self, session: Session, answer: AnswerCall) -> str:
        routed = self.routes.get(answer.msg.call)
        if routed is None:
            return "unknown"
        if routed.agent is not session:
            return "forbidden"
        if routed.answered is not None:
            return "same" if routed.answered == answer.encoded else "different"
        routed.answered = answer.encoded
        assert self.events is not None
        self.events.call_result(routed.requester, routed.stream, routed.call, orjson.loads(answer.encoded), session.name)
        return "ok"

    def publish_nowait(self, channel: str, sender: str, data: bytes, publisher: str = "") -> None:
        self.channels.publish(channel, sender, data, publisher)

    def take_deliveries(self) -> list[Delivery]:
        return self.channels.take_deliveries()

    def sweep(self) -> None:
        self.channels.sweep()
        now = time.monotonic()
        for route in [r for r, routed in self.routes.items() if routed.expires < now]:
            del self.routes[route]
