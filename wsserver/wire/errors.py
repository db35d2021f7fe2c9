"""Error codes, close codes and exceptions.

Every failure that reaches the wire has a stable, documented code
(:class:`ErrorCode` for ``error`` frames and ``stream.end.error``,
:class:`CloseCode` for WebSocket close frames). Exceptions carry those codes,
so a caller can branch on ``exc.code`` instead of parsing messages.

Exceptions are split by who is at fault, the way h11 splits local and remote
protocol errors::

    WSServerError                  base class of everything raised here
    ├── ProtocolError              the peer sent something invalid; carries code
    │                              (and field for bad_message). Raised by the
    │                              codec and the session core on the server.
    ├── ServerError                the server answered a request with ``error``;
    │   │                          carries code, message, ref, stream
    │   └── RateLimited            code ``rate_limited``; carries retry_after_ms
    ├── StreamFailed               a stream ended with reason ``error``; carries
    │                              the stream's error code and its result
    └── ConnectionLost             the connection closed before an answer came;
                                   carries the close code and reason

Internal exception text never goes on the wire: the server logs it and sends
``internal``.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "CloseCode",
    "ConnectionLost",
    "ErrorCode",
    "ProtocolError",
    "RateLimited",
    "ServerError",
    "StreamFailed",
    "WSServerError",
    "server_error",
]


class ErrorCode(enum.StrEnum):
    """Stable codes of ``error`` frames (and of ``stream.end.error.code``)."""

    # Decoding and the connection's life cycle.
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    BINARY_FRAME = "binary_frame"
    NOT_HELLO = "not_hello"
    DUPLICATE_HELLO = "duplicate_hello"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    NOT_IMPLEMENTED = "not_implemented"
    # Requests.
    DUPLICATE_REQUEST = "duplicate_request"
    TOO_MANY_STREAMS = "too_many_streams"
    STREAM_EXISTS = "stream_exists"
    UNKNOWN_STREAM = "unknown_stream"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    CONVERSATION_TOO_LARGE = "conversation_too_large"
    # A generate's conversation and tools (rich generations).
    BAD_TOOL_SCHEMA = "bad_tool_schema"
    DUPLICATE_TOOL = "duplicate_tool"
    UNKNOWN_TOOL = "unknown_tool"
    UNKNOWN_TOOL_CALL = "unknown_tool_call"
    MISPLACED_CONTENT = "misplaced_content"
    BAD_IMAGE = "bad_image"
    # Agent runs: tool results, approvals, threads.
    NOT_WAITING = "not_waiting"
    UNKNOWN_CALL = "unknown_call"
    CALL_ANSWERED = "call_answered"
    CALL_FORBIDDEN = "call_forbidden"
    APPROVAL_REQUIRED = "approval_required"
    BUSY = "busy"
    # Later features (resume, channels, hardening); listed so the set is whole.
    RESUME_FAILED = "resume_failed"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    BAD_NAME = "bad_name"
    AGENT_NAME_TAKEN = "agent_name_taken"
    UNKNOWN_AGENT = "unknown_agent"
    INBOX_FULL = "inbox_full"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    MESSAGE_TOO_LARGE = "message_too_large"
    BACKPLANE_UNAVAILABLE = "backplane_unavailable"
    # The HTTP transport (the JSON body of a refused request).
    UNKNOWN_CONNECTION = "unknown_connection"
    BAD_REQUEST = "bad_request"
    UNAVAILABLE = "unavailable"
    # Stream failures (stream.end reason "error").
    PROVIDER_ERROR = "provider_error"
    PROVIDER_TIMEOUT = "provider_timeout"
    EXPIRED = "expired"
    SHUTDOWN = "shutdown"
    NODE_LOST = "node_lost"
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses."""

    NORMAL = 1000
    GOING_AWAY = 1001  # graceful shutdown
    POLICY = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL = 1011
    SERVICE_RESTART = 1012  # the node serving the session was lost: reconnect and resume
    TRY_AGAIN_LATER = 1013  # slow consumer / overload
    SESSION_TAKEN_OVER = 4000  # clients must not auto-reconnect
    UNSUPPORTED_PROTOCOL = 4001
    HELLO_TIMEOUT = 4008
    PROTOCOL_VIOLATION = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403


class WSServerError(Exception):
    """Base class of every exception raised by wsserver."""


class ProtocolError(WSServerError):
    """The peer sent something that violates the protocol.

    ``code`` is the wire code the server answers with; ``field`` names the
    offending field (dotted path) for ``bad_message``.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        ref: str | None = None,
        extra: dict[str, Any] | None = None,
        close: int | None = None,
    ) -> None:
        super().__init__(message)
        self.close = close  # close the connection with this code after answering
        self.code = code
        self.message = message
        self.field = field
        self.ref = ref
        self.extra = extra or {}


class ServerError(WSServerError):
    """The server answered a request with an ``error`` frame."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        ref: str | None = None,
        stream: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref
        self.stream = stream
        self.details = details or {}


class RateLimited(ServerError):
    """The request was rate limited; retry after ``retry_after_ms``."""

    @property
    def retry_after_ms(self) -> int | None:
        return self.details.get("retry_after_ms")


class StreamFailed(WSServerError):
    """A stream ended with reason ``error``."""

    def __init__(self, code: str, message: str, result: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.result = result


class ConnectionLost(WSServerError):
    """The connection closed before the awaited answer arrived."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}) {reason}".rstrip())
        self.code = code
        self.reason = reason


_BY_CODE: dict[str, type[ServerError]] = {ErrorCode.RATE_LIMITED: RateLimited}


def server_error(frame: dict[str, Any]) -> ServerError:
    """Build the typed exception for a received ``error`` frame."""
    known = {"type", "seq", "code", "message", "ref", "stream"}
    details = {k: v for k, v in frame.items() if k not in known}
    cls = _BY_CODE.get(frame.get("code", ""), ServerError)
    return cls(
        frame.get("code", "internal"),
        frame.get("message", ""),
        ref=frame.get("ref"),
        stream=frame.get("stream"),
        details=details,
    )
