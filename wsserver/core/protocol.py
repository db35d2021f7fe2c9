"""The per-connection protocol state machine (sans-I/O).

``ServerProtocol`` owns what happens on one WebSocket connection before and
after ``hello``: the hello gate, protocol version negotiation, ``ping``, and
the routing of everything else to the :class:`~wsserver.core.session.Session`.
Frames in (``receive_text``/``receive_binary``), frames out
(``data_to_send``), and actions for the transport (start/stop a generation,
close the connection). Like :mod:`wsserver.core.session`, it does no I/O.

States::

    AWAITING_HELLO --hello--> OPEN --(close / taken over)--> CLOSED
          |  any other message: error not_hello, close 4400
          |  unsupported protocol: error unsupported_protocol, close 4001
          |  a refused hello (bad_name, agent_name_taken): error, still AWAITING_HELLO

The session is not the connection's: opening, resuming and ending sessions
is left to the ``open_session`` callback and the transport. When the
connection closes (or another connection takes the session over) the
protocol lets go of the session and takes no more output from it.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..wire.codec import encode
from ..wire.errors import CloseCode, ErrorCode, ProtocolError
from ..wire.messages import SUPPORTED_PROTOCOLS, Error, Hello, Pong, Welcome, decode_client
from .actions import Action, CloseConnection
from .limits import TokenBucket
from .session import Session

#: The window over which refused messages are counted for the abuse threshold.
ABUSE_WINDOW_S = 10.0

__all__ = ["CloseConnection", "ConnState", "Opened", "ServerProtocol"]


class ConnState(enum.IntEnum):
    AWAITING_HELLO = 0
    OPEN = 1
    CLOSED = 2


@dataclass(frozen=True, slots=True)
class Opened:
    """What ``open_session`` decided for a ``hello``."""

    session: Session
    resumed: bool
    #: Frames sent before ``welcome`` (an ``error resume_failed``).
    before: list[bytes] = field(default_factory=list)
    #: Frames sent right after ``welcome`` (the replay).
    after: list[bytes] = field(default_factory=list)


class ServerProtocol:
    """One connection's protocol state.

    Args:
        open_session: opens or resumes the session for a valid ``hello``.
        welcome: the static fields of ``welcome`` (``heartbeat_ms``,
            ``limits``, ``server``).
    """

    __slots__ = (
        "_bucket", "_open_session", "_out", "_violations", "_welcome",
        "abuse_threshold", "clock", "last_type", "session", "state",
    )

    def __init__(
        self,
        *,
        open_session: Callable[[Hello], Opened],
        welcome: dict[str, Any],
        message_rate: float = 0.0,
        abuse_threshold: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self._bucket = TokenBucket(message_rate, message_rate * 2)
        #: Close with 1008 after this many refused messages within ABUSE_WINDOW_S (0 = never).
        self.abuse_threshold = abuse_threshold
        self._violations: deque[float] | None = None  # made on the first one (a deque is 760 bytes)
        #: Type of the last message received ("invalid" if it did not decode).
        self.last_type = ""
        self.state = ConnState.AWAITING_HELLO
        self.session: Session | None = None
        self._open_session = open_session
        self._welcome = welcome
        self._out: list[bytes] = []  # frames that carry no seq

    # ------------------------------------------------------------------ input

    def receive_text(self, data: str | bytes) -> list[Action | CloseConnection]:
        if self.state is ConnState.CLOSED:
            return []
        wait = self._bucket.take(self.clock())
        if wait > 0:
            self._reject(
                ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    "too many messages on this connection",
                    extra={"retry_after_ms": max(1, int(wait * 1000))},
                )
            )
            return self._violation()
        try:
            msg = decode_client(data)
        except ProtocolError as exc:
            self.last_type = "invalid"
            self._reject(exc)
            return self._violation()
        self.last_type = msg.type
        if self.state is ConnState.AWAITING_HELLO:
            return self._hello(msg)
        assert self.session is not None
        msg_type = msg.type
        if msg_type == "ping":
            # queued with the session's frames: replies leave in request order
            self.session.emit_unsequenced(encode(Pong(ref=msg.id)))
            return []
        if msg_type == "hello":
            self._reject(
                ProtocolError(
                    ErrorCode.DUPLICATE_HELLO,
                    "hello was already received on this connection",
                    ref=msg.id,
                )
            )
            return []
        return list(self.session.handle(msg))

    def receive_binary(self, data: bytes) -> list[Action | CloseConnection]:
        if self.state is ConnState.CLOSED:
            return []
        self._reject(
            ProtocolError(
                ErrorCode.BINARY_FRAME,
                "binary frames are not part of protocol v1; send JSON in text frames",
            )
        )
        return self._violation()

    def _violation(self) -> list[Action | CloseConnection]:
        """Count a refused message; past the threshold the connection is closed (1008)."""
        if not self.abuse_threshold:
            return []
        now = self.clock()
        window = self._violations
        if window is None:
            window = self._violations = deque()
        window.append(now)
        while window and window[0] < now - ABUSE_WINDOW_S:
            window.popleft()
        if len(window) < self.abuse_threshold:
            return []
        self.state = ConnState.CLOSED
        return [CloseConnection(CloseCode.POLICY, "too many refused messages")]

    def _hello(self, msg: Any) -> list[Action | CloseConnection]:
        if msg.type != "hello":
            return self._violate(
                ProtocolError(
                    ErrorCode.NOT_HELLO,
                    f"the first message must be hello, got {msg.type!r}",
                    ref=msg.id,
                ),
                CloseCode.PROTOCOL_VIOLATION,
                "expected hello",
            )
        if msg.protocol not in SUPPORTED_PROTOCOLS:
            supported = list(SUPPORTED_PROTOCOLS)
            return self._violate(
                ProtocolError(
                    ErrorCode.UNSUPPORTED_PROTOCOL,
                    f"protocol {msg.protocol} is not supported; supported: {supported}",
                    ref=msg.id,
                    extra={"supported": supported},
                ),
                CloseCode.UNSUPPORTED_PROTOCOL,
                "unsupported protocol",
            )
        try:
            opened = self._open_session(msg)
        except ProtocolError as exc:  # e.g. agent_name_taken: the client may say hello again
            if exc.close is not None:  # e.g. unauthorized: 4401
                return self._violate(exc, exc.close, exc.code)
            self._reject(exc)
            return []
        self.session = opened.session
        self.state = ConnState.OPEN
        self._out.extend(opened.before)
        self._out.append(
            encode(
                Welcome(
                    protocol=msg.protocol,
                    session=opened.session.id,
                    resumed=opened.resumed,
                    **self._welcome,
                )
            )
        )
        self._out.extend(opened.after)
        return []

    def _violate(
        self, exc: ProtocolError, code: int, reason: str
    ) -> list[Action | CloseConnection]:
        self._reject(exc)
        self.state = ConnState.CLOSED
        return [CloseConnection(code, reason)]

    def _reject(self, exc: ProtocolError) -> None:
        if self.session is not None:
            self.session.reject(exc)
        else:
            fields = {"ref": exc.ref, "field": exc.field, **exc.extra}
            self._out.append(
                encode(Error(code=str(exc.code), message=exc.message, **fields))
            )

    # ----------------------------------------------------------------- output

    @property
    def has_output(self) -> bool:
        return bool(self._out) or (self.session is not None and self.session.has_output)

    @property
    def backlog(self) -> int:
        """Frames produced but not yet taken by :meth:`data_to_send`."""
        return len(self._out) + (self.session.backlog if self.session is not None else 0)

    def send_unsequenced(self, frame: bytes) -> None:
        """Queue a frame without seq (``shutdown``) in order with the rest."""
        if self.session is not None:
            self.session.emit_unsequenced(frame)
        else:
            self._out.append(frame)

    def data_to_send(self) -> list[bytes]:
        out = self._out
        self._out = []
        if self.session is not None:
            out.extend(self.session.take_output())
        return out

    def release(self) -> Session | None:
        """The connection is closing or was taken over: let go of the session.

        Returns the session it held (if any). No more input is processed and
        no more output is taken from the session after this.
        """
        session, self.session = self.session, None
        self.state = ConnState.CLOSED
        self._open_session = _closed  # the transport's callback refers back to it: no cycle
        return session


def _closed(hello: Hello) -> Opened:  # pragma: no cover - never called once CLOSED
    raise AssertionError("the connection is closed")
