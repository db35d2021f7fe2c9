"""What the session core and the connection's state machine ask the transport to do.

The core does no I/O: :meth:`Session.handle` and
:meth:`ServerProtocol.receive_text` return these values, and the transport
carries them out (start or stop a generation task, carry a messaging request
to the backplane, close the connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..wire.messages import Publish, Send, Subscribe, ToolResult, Unsubscribe
    from .streams import Stream

__all__ = [
    "Action",
    "AnswerCall",
    "ArmTimer",
    "CloseConnection",
    "MessagingCall",
    "RouteCall",
    "StartGeneration",
    "StopGeneration",
]


@dataclass(frozen=True, slots=True)
class StartGeneration:
    stream: Stream


@dataclass(frozen=True, slots=True)
class StopGeneration:
    """Stop the stream's generation task (if one runs) and its calls' timers."""

    stream_id: str


@dataclass(frozen=True, slots=True)
class RouteCall:
    """Send a run's call to the session holding agent name ``agent`` (a
    ``tool_call`` frame there, ``call`` = ``route``); the transport reports
    back with :meth:`Session.call_routed`."""

    stream_id: str
    call_id: str
    route: str
    agent: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """In ``seconds``, tell the session (:meth:`Session.call_timed_out`) unless the call has its result."""

    stream_id: str
    call_id: str
    seconds: float


@dataclass(frozen=True, slots=True)
class AnswerCall:
    """This session answers a call routed to it: the backplane checks it was
    routed here and not answered otherwise, hands the result to the run that
    made the call, and reports with :meth:`Session.call_answered` (carried
    out before the connection's next request, like a ``MessagingCall``)."""

    msg: ToolResult
    #: ``content`` as JSON, encoded once.
    encoded: bytes


@dataclass(frozen=True, slots=True)
class MessagingCall:
    """A messaging request the session checked and the backplane carries out.

    The transport carries it out before it reads the connection's next
    request (awaiting it on a shared backplane), then the backplane reports
    back through :meth:`Session.subscribed`, :meth:`Session.published`,
    :meth:`Session.sent` or :meth:`Session.failed`, so replies still leave in
    request order. ``unsubscribe`` is answered already and only tells the
    backplane.
    """

    kind: Literal["subscribe", "unsubscribe", "publish", "send"]
    msg: Subscribe | Unsubscribe | Publish | Send
    #: ``data`` of a publish or send, encoded once.
    encoded: bytes | None = None


@dataclass(frozen=True, slots=True)
class CloseConnection:
    code: int
    reason: str


Action = StartGeneration | StopGeneration | MessagingCall | RouteCall | ArmTimer | AnswerCall
