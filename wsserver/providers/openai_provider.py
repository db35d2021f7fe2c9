"""The ``openai`` provider: OpenAI, or any OpenAI-compatible server, through
the official ``openai`` SDK (async client).

Two APIs (``api=``, ``--openai-api``):

* ``chat`` (default): Chat Completions streaming with
  ``stream_options={"include_usage": true}``. The first chunk carries only the
  role, text arrives in ``choices[0].delta.content``, the chunk with
  ``finish_reason`` has an empty delta, and the usage arrives last in a chunk
  with ``choices: []`` (then ``data: [DONE]``, which the SDK consumes).
* ``responses``: the Responses API (``POST /responses``, ``store: false``):
  text from ``response.output_text.delta``, usage and status from
  ``response.completed`` / ``response.incomplete``; ``response.failed`` and
  ``error`` events fail the stream. ``params.stop`` is not supported by that
  API and is ignored.

``base_url`` is any OpenAI-compatible endpoint and must include the version
path (``http://127.0.0.1:11434/v1``): the SDK posts to
``{base_url}/chat/completions`` and ``{base_url}/responses``. Local servers
(Ollama, vLLM, llama.cpp) that do not check keys get a placeholder key.

Parameters: ``max_tokens`` is sent as ``max_completion_tokens`` to
api.openai.com (its reasoning models reject ``max_tokens``) and as
``max_tokens`` to other base URLs, which is what OpenAI-compatible servers
understand (``max_tokens_param=`` overrides); ``max_output_tokens`` with the
Responses API. ``temperature``, ``top_p`` and ``stop`` are passed through when
set; the upstream rejects values it does not support (a safe
``provider_error``).

``finish_reason`` → ``stream.end.reason``: ``stop`` → ``complete``;
``length`` → ``length``; ``content_filter``, ``tool_calls`` and
``function_call`` → ``complete`` (this server sends no tools, and a filtered
answer simply ends; the text so far is what the client got); anything else →
``complete``. A stream that ends without any ``finish_reason`` fails with
``provider_error`` (it was cut). Responses API: ``completed`` → ``complete``;
``incomplete`` with reason ``max_output_tokens`` → ``length``, with another
reason (``content_filter``) → ``complete``.

Usage: ``prompt_tokens``/``completion_tokens`` (``input_tokens``/
``output_tokens`` with the Responses API) as reported at the end of the
stream; a stream that fails before that ends with the server's estimate.

Retries, errors and closing the upstream: :mod:`wsserver.providers.upstream`.
The SDK is imported when the provider is constructed (only when it is
configured), never at ``import wsserver``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import urlsplit

from .base import Finish, GenerationRequest, ProviderEvent, TextDelta, UsageReport
from .upstream import HTTPProvider, InBandError, RetryPolicy, StreamState

__all__ = ["DEFAULT_BASE_URL", "FINISH_REASONS", "OpenAIProvider", "PLACEHOLDER_KEY"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Sent when a base URL is configured without a key (local servers ignore it).
PLACEHOLDER_KEY = "no-key-configured"
FINISH_REASONS = {
    "stop": "complete",
    "length": "length",
    "content_filter": "complete",
    "tool_calls": "complete",
    "function_call": "complete",
}
_RETRYABLE_CODES = frozenset({"server_error", "rate_limit_exceeded"})


class OpenAIProvider(HTTPProvider):
    """OpenAI Chat Completions or Responses streaming (see the module docstring)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        default_model: str = "gpt-5-mini",
        api: Literal["chat", "responses"] = "chat",
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        max_tokens_param: str | None = None,
        name: str = "openai",
    ) -> None:
        super().__init__(retry=retry)
        if api not in ("chat", "responses"):
            raise ValueError(f"api must be 'chat' or 'responses', not {api!r}")
        import httpx2
        import openai

        self._sdk = openai
        self.name = self.label = name
        self.default_model = default_model
        self.api = api
        self.base_url = base_url or DEFAULT_BASE_URL
        official = (urlsplit(self.base_url).hostname or "").endswith("api.openai.com")
        self.max_tokens_param = max_tokens_param or (
            "max_completion_tokens" if official else "max_tokens"
        )
        self._client = openai.AsyncOpenAI(
            api_key=api_key or PLACEHOLDER_KEY,
            base_url=self.base_url,
            max_retries=0,  # wsserver retries itself, only before the first token
            timeout=httpx2.Timeout(timeout, connect=min(timeout, 10.0)),
        )

    async def _open(self, request: GenerationRequest) -> Any:
        params = request.params
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if self.api == "responses":
            kwargs: dict[str, Any] = {
                "model": request.model,
                "input": messages,
                "stream": True,
                "store": False,
            }
            if params.max_tokens is not None:
                kwargs["max_output_tokens"] = params.max_tokens
        else:
            kwargs = {
                "model": request.model,
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if params.max_tokens is not None:
                kwargs[self.max_tokens_param] = params.max_tokens
            if params.stop:
                kwargs["stop"] = params.stop
        if params.temperature is not None:
            kwargs["temperature"] = params.temperature
        if params.top_p is not None:
            kwargs["top_p"] = params.top_p
        if self.api == "responses":
            return await self._client.responses.create(**kwargs)
        return await self._client.chat.completions.create(**kwargs)

    def _convert(self, event: Any, state: StreamState) -> Iterable[ProviderEvent]:
        if self.api == "responses":
            return self._convert_response_event(event, state)
        out: list[ProviderEvent] = []
        for choice in getattr(event, "choices", None) or ():  # the usage chunk has none
            if getattr(choice, "index", 0) != 0:
                continue
            delta = choice.delta
            if delta is not None:
                if delta.content:
                    out.append(TextDelta(delta.content))
                refusal = getattr(delta, "refusal", None)
                if refusal:
                    out.append(TextDelta(refusal))
            if choice.finish_reason:
                state.reason = FINISH_REASONS.get(choice.finish_reason, "complete")
        usage = getattr(event, "usage", None)
        if usage is not None:
            out.append(UsageReport(usage.prompt_tokens, usage.completion_tokens))
        return out

    def _convert_response_event(self, event: Any, state: StreamState) -> Iterable[ProviderEvent]:
        kind = getattr(event, "type", None)
        if kind in ("response.output_text.delta", "response.refusal.delta"):
            return [TextDelta(event.delta)] if event.delta else []
        if kind in ("response.completed", "response.incomplete"):
            response = event.response
            state.done = True
            state.reason = "complete"
            if kind == "response.incomplete":
                details = getattr(response, "incomplete_details", None)
                if getattr(details, "reason", None) == "max_output_tokens":
                    state.reason = "length"
            usage = getattr(response, "usage", None)
            if usage is not None:
                return [UsageReport(usage.input_tokens, usage.output_tokens)]
            return []
        if kind == "response.failed":
            error = getattr(event.response, "error", None)
            code = getattr(error, "code", None) or "response_failed"
            raise InBandError(
                code, retryable=code in _RETRYABLE_CODES, detail=getattr(error, "message", None)
            )
        if kind == "error":
            code = getattr(event, "code", None) or "error"
            raise InBandError(
                code, retryable=code in _RETRYABLE_CODES, detail=getattr(event, "message", None)
            )
        return []

    def _finish(self, state: StreamState) -> Iterable[ProviderEvent]:
        if state.reason is None:
            raise InBandError("stream ended early", retryable=True)
        return [Finish(state.reason)]  # type: ignore[arg-type]
