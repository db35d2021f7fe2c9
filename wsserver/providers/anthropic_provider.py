"""The ``anthropic`` provider: the Messages API through the official
``anthropic`` SDK (async client), streaming, mapped both ways.

Request. Every ``system`` message of the conversation (wherever it is) goes
into the ``system`` parameter, joined by a blank line (text only), since the
Messages API has no system role in this mapping; the other messages are
sent in order:

* ``user`` content: a string stays a string; parts become ``text`` and
  ``image`` blocks: a ``data:`` URL as a ``base64`` source (``image/jpeg``,
  ``png``, ``gif`` or ``webp``; another type is refused), an ``http(s)`` URL
  as a ``url`` source.
* ``assistant``: a string without tool calls stays a string; otherwise its
  parts in their order, then a ``tool_use`` block per tool call (``id``,
  ``name``, ``input``: the parsed arguments). A reasoning part goes back as
  the block it came from: ``thinking`` with its ``signature``, or
  ``redacted_thinking`` with its ``data`` (the part's ``redacted``). A
  reasoning part without an Anthropic signature (none, the Responses API's
  ``responses:…``, the simulated provider's fake ``sim-…``) cannot be
  verified by the API and is not sent; an assistant message left with
  nothing is left out. Images are refused (the API takes none from the
  assistant).
* ``tool``: a ``tool_result`` block (``tool_use_id``, ``content``: the text,
  or text and image blocks) in a user message; the results that follow one
  another share one user message, and a user message right after them
  joins it (after the results, as the API requires).

``max_tokens`` is required by the API: ``params.max_tokens``, else the
provider's default (``--anthropic-max-tokens``, 4096), plus the thinking
budget when thinking is on. ``stop`` is sent as ``stop_sequences``.
``temperature`` and ``top_p`` are not sent: the Messages API of the
installed SDK (anthropic 2.x) has no such parameters, so they are ignored
for this provider (``provider_options`` can still send them).

``tools`` become ``{"name", "description"?, "input_schema"}`` (an empty
object schema when there are no parameters); ``tool_choice`` ``auto`` →
``{"type": "auto"}``, ``required`` → ``any``, ``none`` → ``none``,
``{"name"}`` → ``{"type": "tool", "name"}``. ``params.reasoning`` turns
thinking on: ``{"type": "enabled", "budget_tokens"}`` with
``budget_tokens``, or, given only an ``effort``, a budget for it
(:data:`EFFORT_BUDGETS`; ``{}`` counts as ``medium``); a budget under 1024 (the API's minimum) or not
below ``max_tokens`` is refused before sending. ``params.response_format``
``json_schema`` → ``output_config.format`` (``{"type": "json_schema",
"schema"}``: the API's structured outputs, always strict, no name);
``json_object`` is refused (the API has no JSON mode without a schema).
``params.provider_options`` is merged into the body last (objects key by
key), e.g. ``{"thinking": {"type": "adaptive"}}`` or
``{"output_config": {"effort": "high"}}``.

Events: ``message_start`` gives the input tokens (``input_tokens`` plus the
cache creation and cache read tokens, i.e. the whole prompt), reported at once
so a stream that fails later still ends with the real input count. Content
blocks: ``text`` (``text_delta`` → text), ``thinking`` (``thinking_delta`` →
reasoning, ``signature_delta`` → the signature of the ``ReasoningDone`` at
the block's stop), ``redacted_thinking`` (its ``data`` at once, as a
``ReasoningDone(redacted=…)``), ``tool_use`` (``content_block_start`` opens
the call with its ``id`` and ``name``, each ``input_json_delta.partial_json``
is an argument fragment). ``message_delta`` gives ``stop_reason`` and the
output tokens (cumulative); ``ping`` events are skipped by the SDK. An
``event: error`` (``overloaded_error``…) fails the stream with
``provider_error`` (retried only if nothing had been sent yet).

``stop_reason`` → ``stream.end.reason``: ``end_turn`` and ``stop_sequence``
→ ``complete``; ``max_tokens`` and ``model_context_window_exceeded`` →
``length``; ``tool_use`` → ``tool_calls``; ``pause_turn`` and ``refusal`` →
``complete`` (a refusal is a finished answer); anything else → ``complete``.
A stream that ends without a ``stop_reason`` fails with ``provider_error``
(it was cut).

Retries, errors and closing the upstream: :mod:`wsserver.providers.upstream`.
The SDK (about 1-2 s to import) is imported when the provider is constructed,
which only happens when it is configured, never at ``import wsserver``.
"""

from __future__ import annotations

import json
from typing import Any

from ..wire.messages import ChatMessage, ImagePart, JsonSchemaFormat, ReasoningPart, TextPart
from .base import GenerationRequest, ProviderEvent, ProviderFailure, UsageReport
from .mapping import (
    RESPONSES_SIGNATURE,
    SIMULATED_SIGNATURE,
    data_url,
    merge_options,
    parts_of,
    sdk_arguments,
    text_only,
    unsupported,
)
from .upstream import HTTPProvider, Reader, RetryPolicy

__all__ = ["DEFAULT_BASE_URL", "EFFORT_BUDGETS", "AnthropicProvider", "PLACEHOLDER_KEY", "STOP_REASONS"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
#: Sent when a base URL is configured without a key (a proxy that adds its own).
PLACEHOLDER_KEY = "no-key-configured"
STOP_REASONS = {
    "end_turn": "complete",
    "stop_sequence": "complete",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "pause_turn": "complete",
    "refusal": "complete",
}
#: Thinking budget for ``params.reasoning.effort`` when no ``budget_tokens`` is given.
EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384}
MIN_BUDGET = 1024
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_EMPTY_SCHEMA = {"type": "object", "properties": {}}


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
        create = self._client.messages.create
        return await create(**sdk_arguments(create, self.body(request)))

    def _reader(self) -> Reader:
        return MessagesReader()

    # ------------------------------------------------------------- request

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The Messages API request body for ``request``."""
        label, params = self.label, request.params
        system = "\n\n".join(text_only(label, m, "system messages") for m in request.messages if m.role == "system")
        messages = _Turns(label)
        for m in request.messages:
            if m.role != "system":
                messages.add(m)
        if not messages.turns:
            raise ProviderFailure(f"{label}: at least one user or assistant message is required")
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": params.max_tokens or self.default_max_tokens,
            "messages": messages.turns,
            "stream": True,
        }
        if system:
            body["system"] = system
        if params.stop:
            body["stop_sequences"] = params.stop
        if request.tools:
            body["tools"] = [
                {
                    "name": tool.name,
                    **({"description": tool.description} if tool.description is not None else {}),
                    "input_schema": tool.parameters if tool.parameters is not None else _EMPTY_SCHEMA,
                }
                for tool in request.tools
            ]
        choice = request.tool_choice
        if choice is not None:
            kinds = {"auto": "auto", "required": "any", "none": "none"}
            body["tool_choice"] = {"type": kinds[choice]} if isinstance(choice, str) else {"type": "tool", "name": choice.name}
        reasoning = params.reasoning
        if reasoning is not None:
            budget = reasoning.budget_tokens or EFFORT_BUDGETS[reasoning.effort or "medium"]
            if budget < MIN_BUDGET:
                raise unsupported(label, f"reasoning.budget_tokens must be at least {MIN_BUDGET} for Anthropic thinking")
            if params.max_tokens is None:
                body["max_tokens"] = self.default_max_tokens + budget
            elif params.max_tokens <= budget:
                raise unsupported(
                    label, f"max_tokens ({params.max_tokens}) must be larger than the thinking budget ({budget})"
                )
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        fmt = params.response_format
        if isinstance(fmt, JsonSchemaFormat):
            body["output_config"] = {"format": {"type": "json_schema", "schema": fmt.schema_}}
        elif fmt is not None:
            raise unsupported(label, "response_format json_object is not supported by Anthropic; give a json_schema")
        merge_options(body, params.provider_options)
        body["stream"] = True
        return body


class _Turns:
    """The ``messages`` of a Messages API request, built message by message."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.turns: list[dict[str, Any]] = []
        self._results: dict[str, Any] | None = None  # the user turn holding tool results

    def add(self, m: ChatMessage) -> None:
        if m.role == "tool":
            block = {"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": self._result(m)}
            if self._results is None:
                self._results = {"role": "user", "content": []}
                self.turns.append(self._results)
            self._results["content"].append(block)
            return
        if m.role == "user":
            if self._results is not None:  # joins the tool results, after them
                self._results["content"] += self._user_blocks(m)
                self._results = None
            else:
                content = m.content if isinstance(m.content, str) else self._user_blocks(m)
                self.turns.append({"role": "user", "content": content})
            return
        self._results = None
        if isinstance(m.content, str) and not m.tool_calls:
            self.turns.append({"role": "assistant", "content": m.content})
            return
        blocks = self._assistant_blocks(m)
        if blocks:
            self.turns.append({"role": "assistant", "content": blocks})

    def _image(self, url: str) -> dict[str, Any]:
        if url.startswith("data:"):
            media_type, data = data_url(self.label, url)
            if media_type not in IMAGE_TYPES:
                raise unsupported(self.label, f"image type {media_type!r} is not supported (jpeg, png, gif or webp)")
            return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
        if url.startswith(("http://", "https://")):
            return {"type": "image", "source": {"type": "url", "url": url}}
        raise unsupported(self.label, "an image URL must be http(s) or data:")

    def _user_blocks(self, m: ChatMessage) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        for part in parts_of(m):
            if isinstance(part, TextPart):
                blocks.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                blocks.append(self._image(part.url))
        return blocks

    def _result(self, m: ChatMessage) -> Any:
        return m.content if isinstance(m.content, str) else self._user_blocks(m)

    def _assistant_blocks(self, m: ChatMessage) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        for part in parts_of(m):
            if isinstance(part, TextPart):
                if part.text:  # the API refuses empty text blocks
                    blocks.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                raise unsupported(self.label, "images are not accepted in assistant messages")
            elif isinstance(part, ReasoningPart):
                if part.redacted is not None:
                    blocks.append({"type": "redacted_thinking", "data": part.redacted})
                elif part.signature and not part.signature.startswith((RESPONSES_SIGNATURE, SIMULATED_SIGNATURE)):
                    blocks.append({"type": "thinking", "thinking": part.text, "signature": part.signature})
        for call in m.tool_calls or ():
            blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments})
        return blocks


class MessagesReader(Reader):
    """Messages API stream events -> provider events (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, Any] = {}  # index -> the block's start (thinking / tool_use)
        self._signatures: dict[int, str] = {}

    def events(self, event: Any) -> list[ProviderEvent]:
        kind = getattr(event, "type", None)
        if kind == "content_block_delta":
            delta = event.delta
            dkind = getattr(delta, "type", None)
            if dkind == "text_delta":
                return self.text(delta.text)
            if dkind == "thinking_delta":
                return self.reasoning(delta.thinking)
            if dkind == "signature_delta":
                self._signatures[event.index] = self._signatures.get(event.index, "") + delta.signature
                return []
            if dkind == "input_json_delta":
                block = self._blocks.get(event.index)
                return self.call_delta(block.id, delta.partial_json) if block is not None else []
            return []
        if kind == "content_block_start":
            return self._block_start(event.index, event.content_block)
        if kind == "content_block_stop":
            block = self._blocks.pop(event.index, None)
            if block is None:
                return []
            if block.type == "thinking":
                signature = self._signatures.pop(event.index, None) or getattr(block, "signature", None)
                return self.close_reasoning(signature)
            start = getattr(block, "input", None)
            return self.call_end(block.id, json.dumps(start) if start else None)
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
                self.reason = STOP_REASONS.get(stop_reason, "complete")
            usage = getattr(event, "usage", None)
            if usage is not None and usage.output_tokens is not None:
                return [UsageReport(output_tokens=usage.output_tokens)]
            return []
        return []

    def _block_start(self, index: int, block: Any) -> list[ProviderEvent]:
        btype = getattr(block, "type", None)
        if btype == "text":
            return self.text(block.text)
        if btype == "thinking":
            self._blocks[index] = block
            return self.close_reasoning() + self.reasoning(block.thinking)
        if btype == "redacted_thinking":
            return self.redacted(block.data)
        if btype == "tool_use":
            self._blocks[index] = block
            return self.call_start(block.id, block.name)
        return []
