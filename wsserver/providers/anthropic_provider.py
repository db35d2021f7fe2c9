"""The ``anthropic`` provider: the Messages API through the official
``anthropic`` SDK (async client), streaming.

Messages: every ``system`` message of the conversation (wherever it is) goes
into the ``system`` parameter, joined by a blank line, since the Messages API
has no system role; the ``user``/``assistant`` messages are sent in order.
``max_tokens`` is required by the API: ``params.max_tokens``, else the
provider's default (``--anthropic-max-tokens``, 4096). ``stop`` is sent as
``stop_sequences``. ``temperature`` and ``top_p`` are not sent: the Messages
API of the installed SDK (anthropic 2.x) has no such parameters, so they are
ignored for this provider.

Events: ``message_start`` gives the input tokens (``input_tokens`` plus the
cache creation and cache read tokens, i.e. the whole prompt), reported at once
so a stream that fails later still ends with the real input count;
``content_block_delta`` with a ``text_delta`` is text (thinking and tool
deltas are ignored); ``message_delta`` gives ``stop_reason`` and the output
tokens (cumulative); ``ping`` events are skipped by the SDK. An
``event: error`` (``overloaded_error``…) fails the stream with
``provider_error`` (retried only if no text had been sent yet).

``stop_reason`` → ``stream.end.reason``: ``end_turn`` and ``stop_sequence``
→ ``complete``; ``max_tokens`` and ``model_context_window_exceeded`` →
``length``; ``tool_use``, ``pause_turn`` and ``refusal`` → ``complete`` (no
tools are offered; a refusal is a finished answer); anything else →
``complete``. A stream that ends without a ``stop_reason`` fails with
``provider_error`` (it was cut).

Retries, errors and closing the upstream: :mod:`wsserver.providers.upstream`.
The SDK (about 1-2 s to import) is imported when the provider is constructed,
which only happens when it is configured, never at ``import wsserver``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import Finish, GenerationRequest, ProviderEvent, ProviderFailure, TextDelta, UsageReport
from .upstream import HTTPProvider, InBandError, RetryPolicy, StreamState

__all__ = ["DEFAULT_BASE_URL", "AnthropicProvider", "PLACEHOLDER_KEY", "STOP_REASONS"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
#: Sent when a base URL is configured without a key (a proxy that adds its own).
PLACEHOLDER_KEY = "no-key-configured"
STOP_REASONS = {
    "end_turn": "complete",
    "stop_sequence": "complete",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "complete",
    "pause_turn": "complete",
    "refusal": "complete",
}


class AnthropicProvider(HTTPProvider):
    """Anthropic Messages streaming (see the module docstring)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        auth_token: str | None = None,
        base_url: str | None = None,
        default_model: str = "claude-haiku-4-5",
        default_max_tokens: int = 4096,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        name: str = "anthropic",
    ) -> None:
        super().__init__(retry=retry)
        import anthropic
        import httpx2

        self._sdk = anthropic
        self.name = self.label = name
        self.default_model = default_model
        self.default_max_tokens = default_max_tokens
        self.base_url = base_url or DEFAULT_BASE_URL
        credentials: dict[str, str] = (
            {"auth_token": auth_token}
            if auth_token and not api_key
            else {"api_key": api_key or PLACEHOLDER_KEY}
        )
        self._client = anthropic.AsyncAnthropic(
            **credentials,
            base_url=self.base_url,
            max_retries=0,  # wsserver retries itself, only before the first token
            timeout=httpx2.Timeout(timeout, connect=min(timeout, 10.0)),
        )

    async def _open(self, request: GenerationRequest) -> Any:
        params = request.params
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        messages = [{"role": m.role, "content": m.content} for m in request.messages if m.role != "system"]
        if not messages:
            raise ProviderFailure(f"{self.label}: at least one user or assistant message is required")
        kwargs: dict[str, Any] = {
            "model": request.model,
            "max_tokens": params.max_tokens or self.default_max_tokens,
            "messages": messages,
            "stream": True,
        }
        if system:
            kwargs["system"] = system
        if params.stop:
            kwargs["stop_sequences"] = params.stop
        return await self._client.messages.create(**kwargs)

    def _convert(self, event: Any, state: StreamState) -> Iterable[ProviderEvent]:
        kind = getattr(event, "type", None)
        if kind == "content_block_delta":
            delta = event.delta
            if getattr(delta, "type", None) == "text_delta" and delta.text:
                return [TextDelta(delta.text)]
            return []
        if kind == "message_start":
            usage = event.message.usage
            total = (
                (usage.input_tokens or 0)
                + (getattr(usage, "cache_creation_input_tokens", None) or 0)
                + (getattr(usage, "cache_read_input_tokens", None) or 0)
            )
            return [UsageReport(input_tokens=total)]
        if kind == "message_delta":
            stop_reason = getattr(event.delta, "stop_reason", None)
            if stop_reason:
                state.reason = STOP_REASONS.get(stop_reason, "complete")
            usage = getattr(event, "usage", None)
            if usage is not None and usage.output_tokens is not None:
                return [UsageReport(output_tokens=usage.output_tokens)]
            return []
        if kind == "message_stop":
            state.done = True
        return []

    def _finish(self, state: StreamState) -> Iterable[ProviderEvent]:
        if state.reason is None:
            raise InBandError("stream ended early", retryable=True)
        return [Finish(state.reason)]  # type: ignore[arg-type]
