"""The Python client: ``async with wsserver.client.connect(url) as c: ...``.

See :mod:`wsserver.client.client` for reconnection and resume. Imports only
the wire; the exceptions it raises live in :mod:`wsserver.wire.errors` and
are re-exported here.
"""

from __future__ import annotations

from ..wire.errors import ConnectionLost, RateLimited, ServerError, StreamFailed
from .channels import Subscription
from .client import Client, connect
from .streams import ClientStream
from .tools import Tools
from .types import (
    Backoff,
    ChannelMessage,
    DirectMessage,
    PendingCall,
    Presence,
    StreamEvent,
    StreamResult,
    ToolCall,
    ToolCallRequest,
    Usage,
    WaitingCall,
)

__all__ = [
    "Backoff",
    "ChannelMessage",
    "Client",
    "ClientStream",
    "ConnectionLost",
    "DirectMessage",
    "PendingCall",
    "Presence",
    "RateLimited",
    "ServerError",
    "StreamEvent",
    "StreamFailed",
    "StreamResult",
    "Subscription",
    "ToolCall",
    "ToolCallRequest",
    "Tools",
    "Usage",
    "WaitingCall",
    "connect",
]
