"""Running one generation: the glue between a provider and the session core.

:func:`run_generation` is the body of the task the transport starts for each
``StartGeneration`` action. It reads the provider's events and reports them to
the session; it never touches a socket. Cancelling the task (``cancel``,
connection loss) raises ``CancelledError`` inside the provider, whose own
``finally`` closes the upstream; the session has usually ended the stream
already, so late events are ignored there. A step of an agent run that ends
with tool calls leaves the stream waiting: the task ends, and a new one runs
the next step when the results are in.
"""

from __future__ import annotations

import asyncio
import logging

from ..wire.errors import ErrorCode
from ..providers.base import (
    Finish,
    GenerationRequest,
    Provider,
    ProviderFailure,
    ReasoningDelta,
    ReasoningDone,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)
from ..core.session import Session
from ..core.streams import Stream, StreamState

__all__ = ["run_generation"]

logger = logging.getLogger("wsserver.streams")


async def run_generation(session: Session, stream: Stream, provider: Provider) -> None:
    """Run one step of ``stream`` (the whole of it unless it is an agent run)."""
    request = GenerationRequest(
        messages=stream.step_messages(),
        model=stream.model,
        params=stream.params,
        tools=stream.tools,
        tool_choice=stream.tool_choice,
    )
    reason = "complete"
    delta, usage = session.stream_delta, session.stream_usage
    try:
        events = provider.stream(request)
        try:
            async for event in events:
                kind = type(event)
                if kind is TextDelta:
                    delta(stream, event.text, event.tokens)  # type: ignore[union-attr]
                elif kind is ToolCallDelta:
                    session.stream_tool_delta(stream, event.call, event.text)  # type: ignore[union-attr]
                elif kind is ReasoningDelta:
                    session.stream_reasoning(stream, event.text, event.tokens)  # type: ignore[union-attr]
                elif kind is ToolCallStart:
                    session.stream_tool_call(stream, event.call, event.name)  # type: ignore[union-attr]
                elif kind is ReasoningDone:
                    session.stream_reasoning_done(stream, event.signature, event.redacted)  # type: ignore[union-attr]
                elif kind is UsageReport:
                    usage(stream, event.input_tokens, event.output_tokens)  # type: ignore[union-attr]
                elif kind is Finish:
                    reason = event.reason  # type: ignore[union-attr]
                if stream.state is not StreamState.RUNNING:
                    break  # ended by the session (its output bound): stop reading, close the upstream
        finally:
            await events.aclose()  # type: ignore[attr-defined]
    except asyncio.CancelledError:
        session.stream_end(stream, "cancelled")
        raise
    except ProviderFailure as exc:
        session.stream_end(stream, "error", (exc.code, exc.message))
    except Exception:
        logger.exception("stream %s: provider %s failed", stream.id, provider.name)
        session.stream_end(stream, "error", (ErrorCode.INTERNAL.value, "internal error"))
    else:
        session.step_end(stream, reason)  # ends it, or (an agent run) it waits for tool results
