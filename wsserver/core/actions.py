"""What the session core and the connection's state machine ask the transport to do.

The core does no I/O: :meth:`Session.handle` and
:meth:`ServerProtocol.receive_text` return these values, and the transport
carries them out (start or stop a generation task, carry a messaging request
to the backplane, close the connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..wire.messages import Publish, Send, Subscribe, Unsubscribe
    from .streams import Stream

__all__ = ["Action", "CloseConnection", "MessagingCall", "StartGeneration", "StopGeneration"]


@dataclass(frozen=True, slots=True)
class StartGeneration:
    stream: Stream


@dataclass(frozen=True, slots=True)
class StopGeneration:
    stream_id: str


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


Action = StartGeneration | StopGeneration | MessagingCall
