"""OpenAI Chat Completions, both ways: the wire's request as a
``POST /chat/completions`` body, and its streamed chunks as provider events.
Also what OpenAI-compatible servers (vLLM, Ollama, llama.cpp) speak.

Request. Messages keep their roles. ``user`` content parts become ``text``
and ``image_url`` parts (an ``http(s)`` or ``data:`` URL, passed as is);
``system`` and ``tool`` messages and assistant text take text only, so an
image there is refused. An assistant's ``tool_calls`` go back as
``{"id", "type": "function", "function": {"name", "arguments"}}`` with the
arguments as a JSON string, and a ``tool`` message as ``{"role": "tool",
"tool_call_id", "content"}``. Reasoning parts are not sent: Chat Completions
has no field for them (and DeepSeek-style servers reject
``reasoning_content`` in a request). ``tools`` become function tools,
``tool_choice`` is passed as is (``{"name"}`` as ``{"type": "function",
"function": {"name"}}``), ``params.response_format`` as ``response_format``
(``json_schema`` wrapped in ``{"json_schema": {"name", "schema",
"strict"}}``), ``params.reasoning.effort`` as ``reasoning_effort``;
``budget_tokens`` alone is refused (the API takes an effort, not a budget).

Stream. ``delta.content`` is text; ``delta.refusal`` (the model declined)
is text too, since the wire has no refusal part: the client sees the
refusal as the answer. ``delta.reasoning_content`` or ``delta.reasoning``
(vLLM, DeepSeek, llama.cpp, Ollama, OpenRouter; not api.openai.com, whose
models keep their reasoning) is reasoning, closed without a signature when
the answer starts. ``delta.tool_calls`` arrive by ``index``: the first delta
of a call has its ``id`` and ``function.name``, the next ones fragments of
``function.arguments``; several calls may be open at once. A call without an
``id`` (some local servers) gets one made here. ``finish_reason``: ``stop``
→ ``complete``, ``length`` → ``length``, ``tool_calls`` → ``tool_calls``,
``content_filter`` and ``function_call`` → ``complete``; usage comes in the
last chunk (``choices: []``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from ..wire.messages import ChatMessage, ImagePart, JsonSchemaFormat, TextPart
from .base import GenerationRequest, ProviderEvent, UsageReport
from .mapping import arguments_json, merge_options, sampling, text_only, unsupported
from .upstream import InBandError, Reader

__all__ = ["FINISH_REASONS", "ChatReader", "chat_body"]

FINISH_REASONS = {
    "stop": "complete",
    "length": "length",
    "content_filter": "complete",
    "tool_calls": "tool_calls",
    "function_call": "complete",
}
#: Where OpenAI-compatible servers put reasoning text in a delta.
_REASONING_FIELDS = ("reasoning_content", "reasoning")


def chat_body(request: GenerationRequest, *, label: str, max_tokens_param: str, images: bool) -> dict[str, Any]:
    """The Chat Completions request body for ``request``."""
    params = request.params
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [_message(m, label, images) for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.max_tokens is not None:
        body[max_tokens_param] = params.max_tokens
    if params.stop:
        body["stop"] = params.stop
    body.update(sampling(params))
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    **({"description": tool.description} if tool.description is not None else {}),
                    **({"parameters": tool.parameters} if tool.parameters is not None else {}),
                },
            }
            for tool in request.tools
        ]
    choice = request.tool_choice
    if choice is not None:
        body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
    fmt = params.response_format
    if isinstance(fmt, JsonSchemaFormat):
        schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None:
        body["response_format"] = {"type": "json_object"}
    reasoning = params.reasoning
    if reasoning is not None:
        if reasoning.effort is not None:
            body["reasoning_effort"] = reasoning.effort
        elif reasoning.budget_tokens is not None:
            raise unsupported(
                label, "reasoning.budget_tokens is not supported by Chat Completions; give reasoning.effort"
            )
    merge_options(body, params.provider_options)
    body["stream"] = True
    return body


def _message(m: ChatMessage, label: str, images: bool) -> dict[str, Any]:
    if m.role == "system":
        return {"role": "system", "content": text_only(label, m, "system messages")}
    if m.role == "tool":
        return {
            "role": "tool",
            "tool_call_id": m.tool_call_id or "",
            "content": text_only(label, m, "tool results by Chat Completions"),
        }
    if m.role == "user":
        if isinstance(m.content, str):
            return {"role": "user", "content": m.content}
        parts: list[dict[str, Any]] = []
        for part in m.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                if not images:
                    raise unsupported(label, "images are turned off for this provider (--no-openai-images)")
                parts.append({"type": "image_url", "image_url": {"url": part.url}})
        return {"role": "user", "content": parts}
    # assistant: text (reasoning is not sent back) and tool calls
    text = m.content if isinstance(m.content, str) else text_only(label, m, "assistant messages")
    out: dict[str, Any] = {"role": "assistant"}
    if text or not m.tool_calls:
        out["content"] = text
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments_json(c.arguments)}}
            for c in m.tool_calls
        ]
    return out


def _reasoning_of(delta: Any) -> str | None:
    """The reasoning text of a delta (servers in transition send both fields alike)."""
    for field in _REASONING_FIELDS:
        value = getattr(delta, field, None)
        if isinstance(value, str) and value:
            return value
    return None


@dataclass(slots=True)
class _Call:
    id: str | None
    name: str | None
    pending: str = ""  # arguments that came before the name
    started: bool = False


class ChatReader(Reader):
    """Chat Completions chunks -> provider events (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._by_index: dict[int, _Call] = {}

    def events(self, chunk: Any) -> list[ProviderEvent]:
        out: list[ProviderEvent] = []
        for choice in getattr(chunk, "choices", None) or ():  # the usage chunk has none
            if getattr(choice, "index", 0) != 0:
                continue
            delta = choice.delta
            if delta is not None:
                out += self.reasoning(_reasoning_of(delta))
                out += self.text(delta.content)
                out += self.text(getattr(delta, "refusal", None))
                for call in getattr(delta, "tool_calls", None) or ():
                    out += self._tool_call(call)
            if choice.finish_reason:
                self.reason = FINISH_REASONS.get(choice.finish_reason, "complete")
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            out.append(UsageReport(usage.prompt_tokens, usage.completion_tokens))
        return out

    def _tool_call(self, delta: Any) -> list[ProviderEvent]:
        function = delta.function
        name = getattr(function, "name", None)
        arguments = getattr(function, "arguments", None) or ""
        call = self._by_index.get(delta.index)
        if call is None:
            call = self._by_index[delta.index] = _Call(delta.id, name)
        else:
            call.id = call.id or delta.id
            call.name = call.name or name
        if call.started:
            return self.call_delta(call.id or "", arguments)
        if not call.name:  # arguments before the name: hold them
            call.pending += arguments
            return []
        call.id = call.id or f"call_{secrets.token_hex(12)}"
        call.started = True
        return [*self.call_start(call.id, call.name), *self.call_delta(call.id, call.pending + arguments)]

    def finish(self) -> list[ProviderEvent]:
        if any(not call.started for call in self._by_index.values()):
            raise InBandError("tool call without a name", retryable=False)
        return super().finish()
