"""Backplanes: what several wsserver nodes share, and the seam to the server.

The :class:`Backplane` interface is what the transport (:mod:`wsserver.server`)
calls at the few points where a node meets the others:

* a ``hello`` may name a session another node owns (:meth:`Backplane.route`);
* every sequenced frame is written to the backplane *before* it is sent
  (:meth:`Backplane.write_log`), so a client never holds a seq that a
  surviving node does not know;
* subscribe, publish and send are carried out by the backplane
  (:meth:`Backplane.call`), because channel offsets, history, presence and
  agent names may be shared; channel traffic for this node's subscribers is
  pulled with :meth:`Backplane.take_deliveries`;
* an agent run's call for an agent is routed to the session holding that
  name (:meth:`Backplane.route_call`), and that session's answer goes back
  to the run (:meth:`Backplane.answer_call`, then
  :meth:`ClusterEvents.call_result` on the run's node).

Events go the other way through :class:`ClusterEvents`, the narrow, typed
interface the server implements: the backplane never reaches into the
server or into a session's private state.

:class:`~wsserver.cluster.memory.MemoryBackplane` is the embedded default
(one process, everything in memory);
:class:`~wsserver.cluster.redis.RedisBackplane` shares sessions, channels,
presence and agent names through Redis.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..core.channels import Delivery
from ..core.limits import ChannelRules
from ..wire.messages import ChatMessage, GenerateParams, Tool, ToolChoice

#: How long a routed call's record is kept for its answer (beyond the call's own timeout).
ROUTE_TTL_S = 3600.0

if TYPE_CHECKING:
    from ..core.actions import AnswerCall, MessagingCall, RouteCall
    from ..core.session import Session
    from .tunnel import Tunnel, TunnelEnd

__all__ = ["LOCAL", "ROUTE_TTL_S", "AdoptedSession", "Backplane", "ClusterEvents", "LostStream", "Route"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where a ``hello`` is served, and what the backplane settled for it.

    ``owner`` set: another node owns the session; ``connect()`` opens the
    tunnel to it. Otherwise it is served here; ``session_id`` is the id a new
    session must get (its agent name was claimed for that id) and
    ``agent_taken`` says another session holds the hello's agent name.
    """

    owner: str | None = None
    connect: Callable[[], Awaitable[Tunnel]] | None = None
    session_id: str | None = None
    agent_taken: bool = False


LOCAL = Route()


@dataclass(frozen=True, slots=True)
class LostStream:
    """The request of a stream that ran on a lost node (an interrupt continues it)."""

    provider: str = "?"
    model: str = "?"
    messages: tuple[ChatMessage, ...] = ()
    params: GenerateParams = field(default_factory=GenerateParams)
    channel: str | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    thread: str | None = None
    #: ``running`` (a step ran), ``waiting`` (a run waited for tool results) or ``queued``.
    state: str = "running"
    queued_after: str | None = None
    #: The index of its next delta-like frame (where a waiting run goes on).
    next_index: int = 0
    #: An agent run (:meth:`wsserver.core.runs.Run.state`).
    run: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class AdoptedSession:
    """What the backplane kept of a lost node's session."""

    id: str
    identity: str
    agent: str | None
    public_id: str | None
    rules: ChannelRules | None
    #: The session's last seq, its client's last ack, and its log from seq ``first``.
    seq: int
    acked: int
    first: int
    frames: list[bytes]
    subscriptions: list[str]
    #: Streams that were running, by id.
    running: dict[str, LostStream]


class ClusterEvents(Protocol):
    """What a backplane tells the server (the server implements it)."""

    def local_session(self, session_id: str) -> Session | None:
        """This node's live session with that id."""

    def local_sessions(self) -> list[Session]:
        """Every session of this node (a parked one is woken: rebuilt from its bytes)."""

    def local_session_ids(self) -> list[str]:
        """The ids of this node's sessions (parked ones stay parked)."""

    def adopt(self, adopted: AdoptedSession) -> Session:
        """Run a lost node's session here (detached until its client resumes)."""

    def fence_session(self, session_id: str) -> None:
        """Another node owns the session now: drop it here, write nothing more."""

    def node_lost(self, node: str | None) -> None:
        """``node`` is gone (None: every other node is out of reach): end tunnels to and from it."""

    def tunnel_opened(self, end: TunnelEnd, hello: str, token: str | None, ip: str) -> None:
        """A client of another node resumes a session of ours: serve it through ``end``."""

    def tunnel_input(self, tunnel: str, data: str | bytes) -> None:
        """A client message relayed through ``tunnel`` (``bytes``: a binary frame)."""

    def tunnel_closed(self, tunnel: str) -> None:
        """The client's node closed ``tunnel`` (or is gone)."""

    def tunnel_peers(self) -> set[str]:
        """Nodes whose clients are tunnelled here."""

    def deliveries_pending(self) -> None:
        """Channel traffic waits in :meth:`Backplane.take_deliveries` (a wake-up)."""

    def call_result(self, session_id: str, stream_id: str, call_id: str, content: Any, sender: str) -> None:
        """An agent answered a call that a run of this node's session ``session_id`` routed to it."""


class Backplane(abc.ABC):
    """The interface between a node and whatever it shares with other nodes."""

    #: True when other nodes share this backplane (sessions are journaled:
    #: their frames are written here before they are sent).
    shared = False
    #: This node's name (``None`` alone).
    node: str | None = None

    def __init__(self) -> None:
        #: Counters for the tests and /metrics.
        self.stats: dict[str, int] = {}

    @abc.abstractmethod
    async def start(self, events: ClusterEvents) -> None:
        """Connect (a shared backplane) before the server accepts connections."""

    async def close(self) -> None:
        """Disconnect; sessions stay in the backplane for other nodes to adopt."""

    def status(self) -> str | None:
        """``None`` when healthy, else why the node is degraded (for ``/readyz``)."""
        return None

    def tunnel_count(self) -> int:
        """Connections of this node relayed to their session's node."""
        return 0

    # ---------------------------------------------------------------- hello

    async def route(self, hello: dict[str, Any]) -> Route:
        """Decide where the connection's ``hello`` is served; may adopt a lost node's sessions."""
        return LOCAL

    async def reserve_agent(self, hello: dict[str, Any]) -> Route:
        """Claim the hello's agent name for a session served here (a tunnelled hello)."""
        return LOCAL

    # -------------------------------------------------------------- sessions

    def session_opened(self, session: Session) -> None:
        """A new session was opened on this node."""

    def session_resumed(self, session: Session, *, rights_changed: bool = False) -> None:
        """A client resumed ``session`` here (its replay is taken): direct
        messages held for it while it was away may follow; ``rights_changed``:
        its channel rights are now those of the resuming credential."""

    @abc.abstractmethod
    def session_ended(self, session: Session) -> None:
        """A session ended (expired, replaced, shut down): it leaves its
        channels, its agent name is free, the backplane forgets it."""

    async def write_log(self, session: Session | None) -> None:
        """Write the session's journal before those frames are sent."""

    def write_log_nowait(self, session: Session) -> None:
        """Write the session's journal in order with other writes, without waiting."""

    # ----------------------------------------------------------- messaging

    @abc.abstractmethod
    def agent_held(self, name: str) -> bool:
        """Another session of this node holds agent name ``name``."""

    @abc.abstractmethod
    def claim_agent(self, name: str, session: Session) -> None:
        """Register ``session`` as the holder of ``name`` (checked before)."""

    @abc.abstractmethod
    def call(self, session: Session, call: MessagingCall) -> Awaitable[None] | None:
        """Carry out a session's messaging request; returns something to await
        when the answer is not there yet (the session hears it either way)."""

    @abc.abstractmethod
    async def route_call(self, session: Session, call: RouteCall) -> bool:
        """Send a run's call to the session holding agent name ``call.agent``
        (a ``tool_call`` frame in its log), once per ``call.route``; False
        when no live session holds the name."""

    @abc.abstractmethod
    async def answer_call(self, session: Session, answer: AnswerCall) -> str:
        """``session`` answers routed call ``answer.msg.call``: hand the result
        to the run that made it. Returns ``ok``, ``same`` (answered before with
        this content), ``different`` (answered before otherwise), ``unknown``
        (no such routed call) or ``forbidden`` (it was routed to another session)."""

    @abc.abstractmethod
    def publish_nowait(self, channel: str, sender: str, data: bytes, publisher: str = "") -> None:
        """Publish a stream's frame into ``channel``, in order, without waiting
        (``publisher``: whose channel-history bound it counts against)."""

    @abc.abstractmethod
    def take_deliveries(self) -> list[Delivery]:
        """Channel frames for this node's subscribers, in order, since the last call."""

    @abc.abstractmethod
    def sweep(self) -> None:
        """Forget idle channels (called every 0.25 s)."""
