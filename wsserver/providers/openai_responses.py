"""The OpenAI Responses API, both ways: the wire's request as a
``POST /responses`` body (``store: false``), and its stream events as
provider events.

Request. ``system`` and ``user`` messages become input messages (``user``
parts as ``input_text`` and ``input_image`` with ``detail: "auto"``); an
assistant message becomes, in its own order, ``reasoning`` items (for
reasoning parts that came from this API, see below), an assistant message
with its text, and one ``function_call`` item per tool call (``call_id``,
``name``, ``arguments`` as a JSON string); a ``tool`` message becomes a
``function_call_output`` item (text, or ``input_text``/``input_image``
parts). ``tools`` become function tools with ``strict: false`` (the API
makes function tools strict by default, which refuses most ordinary
schemas; ``provider_options`` cannot change that per tool), ``tool_choice``
passes as is (``{"name"}`` as ``{"type": "function", "name"}``),
``params.response_format`` becomes ``text.format``, and ``params.reasoning``
becomes ``reasoning: {"effort"?, "summary": "auto"}`` (summaries are what
streams; ``budget_tokens`` alone is refused: the API takes an effort).
``params.stop`` is refused: the API has no stop sequences.

Reasoning round trip. With ``store: false`` a reasoning item can only go
back with its ``encrypted_content``, so a request with ``params.reasoning``
asks for it (``include: ["reasoning.encrypted_content"]``; not asked
otherwise, since models without reasoning refuse it; ``provider_options``
can ask for it anyway) and the reasoning part's ``signature`` is
``responses:<item id>:<encrypted_content>``: opaque to the client, sent back
as ``{"type": "reasoning", "id", "summary", "encrypted_content"}``.
Reasoning parts without such a signature (from another provider, or an
item without encrypted content) are not sent: the API could not use them.

Stream. ``response.output_text.delta`` and ``response.refusal.delta`` are
text; ``response.reasoning_summary_text.delta`` (summary parts separated by
a blank line) and ``response.reasoning_text.delta`` are reasoning, closed by
the reasoning item's ``response.output_item.done`` (with the signature);
``response.output_item.added`` with a ``function_call`` item opens a call
(its ``call_id`` is the call's id), ``response.function_call_arguments.delta``
carries its argument fragments and ``.done`` (or the item's
``output_item.done``) the rest, if the deltas did not bring it all.
``response.completed`` → ``complete``, or ``tool_calls`` when the model
called functions; ``response.incomplete`` for ``max_output_tokens`` →
``length``, for another reason → ``complete``; ``response.failed`` and
``error`` fail the stream.
"""

from __future__ import annotations

import secrets
from typing import Any

from ..wire.messages import ChatMessage, ImagePart, JsonSchemaFormat, ReasoningPart, TextPart
from .base import GenerationRequest, ProviderEvent, UsageReport
from .mapping import RESPONSES_SIGNATURE, arguments_json, merge_options, parts_of, sampling, text_only, unsupported
from .upstream import InBandError, Reader

__all__ = ["ResponsesReader", "responses_body"]

_RETRYABLE_CODES = frozenset({"server_error", "rate_limit_exceeded"})
_EMPTY_SCHEMA = {"type": "object", "properties": {}}


def responses_body(request: GenerationRequest, *, label: str, images: bool) -> dict[str, Any]:
    """The Responses API request body for ``request``."""
    params = request.params
    if params.stop:
        raise unsupported(label, "params.stop is not supported by the Responses API")
    items: list[dict[str, Any]] = []
    for m in request.messages:
        items += _items(m, label, images)
    body: dict[str, Any] = {
        "model": request.model,
        "input": items,
        "stream": True,
        "store": False,
    }
    if params.max_tokens is not None:
        body["max_output_tokens"] = params.max_tokens
    body.update(sampling(params))
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "name": tool.name,
                **({"description": tool.description} if tool.description is not None else {}),
                "parameters": tool.parameters if tool.parameters is not None else _EMPTY_SCHEMA,
                "strict": False,
            }
            for tool in request.tools
        ]
    choice = request.tool_choice
    if choice is not None:
        body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function", "name": choice.name}
    fmt = params.response_format
    if isinstance(fmt, JsonSchemaFormat):
        text_format: dict[str, Any] = {"type": "json_schema", "name": fmt.name, "schema": fmt.schema_}
        if fmt.strict is not None:
            text_format["strict"] = fmt.strict
        body["text"] = {"format": text_format}
    elif fmt is not None:
        body["text"] = {"format": {"type": "json_object"}}
    reasoning = params.reasoning
    if reasoning is not None:
        if reasoning.effort is None and reasoning.budget_tokens is not None:
            raise unsupported(
                label, "reasoning.budget_tokens is not supported by the Responses API; give reasoning.effort"
            )
        body["reasoning"] = {**({"effort": reasoning.effort} if reasoning.effort else {}), "summary": "auto"}
        body["include"] = ["reasoning.encrypted_content"]
    merge_options(body, params.provider_options)
    body["stream"] = True
    return body


def _parts(m: ChatMessage, label: str, images: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in parts_of(m):
        if isinstance(part, TextPart):
            out.append({"type": "input_text", "text": part.text})
        elif isinstance(part, ImagePart):
            if not images:
                raise unsupported(label, "images are turned off for this provider (--no-openai-images)")
            out.append({"type": "input_image", "image_url": part.url, "detail": "auto"})
    return out


def _items(m: ChatMessage, label: str, images: bool) -> list[dict[str, Any]]:
    if m.role == "system":
        return [{"role": "system", "content": text_only(label, m, "system messages")}]
    if m.role == "user":
        return [{"role": "user", "content": m.content if isinstance(m.content, str) else _parts(m, label, images)}]
    if m.role == "tool":
        output: Any = m.content if isinstance(m.content, str) else _parts(m, label, images)
        return [{"type": "function_call_output", "call_id": m.tool_call_id or "", "output": output}]
    if isinstance(m.content, str) and not m.tool_calls:
        return [{"role": "assistant", "content": m.content}]
    items: list[dict[str, Any]] = []
    text = ""
    for part in parts_of(m):
        if isinstance(part, TextPart):
            text += part.text
        elif isinstance(part, ImagePart):
            raise unsupported(label, "images are not accepted in assistant messages")
        elif isinstance(part, ReasoningPart) and (part.signature or "").startswith(RESPONSES_SIGNATURE):
            item_id, _, encrypted = part.signature[len(RESPONSES_SIGNATURE) :].partition(":")  # type: ignore[index]
            if text:
                items.append({"role": "assistant", "content": text})
                text = ""
            summary = [{"type": "summary_text", "text": part.text}] if part.text else []
            items.append({"type": "reasoning", "id": item_id, "summary": summary, "encrypted_content": encrypted})
    if text:
        items.append({"role": "assistant", "content": text})
    for call in m.tool_calls or ():
        items.append(
            {"type": "function_call", "call_id": call.id, "name": call.name, "arguments": arguments_json(call.arguments)}
        )
    return items


class ResponsesReader(Reader):
    """Responses API stream events -> provider events (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._by_item: dict[str, str] = {}  # function_call item id -> call id
        self._arguments: dict[str, str] = {}  # call id -> argument text so far
        self._summary: int | None = None  # summary part being streamed

    def events(self, event: Any) -> list[ProviderEvent]:
        kind = getattr(event, "type", None)
        if kind in ("response.output_text.delta", "response.refusal.delta"):
            return self.text(event.delta)
        if kind == "response.reasoning_summary_text.delta":
            gap = "\n\n" if self._summary is not None and event.summary_index != self._summary else ""
            self._summary = event.summary_index
            return self.reasoning(gap + event.delta if event.delta else "")
        if kind == "response.reasoning_text.delta":
            return self.reasoning(event.delta)
        if kind == "response.output_item.added":
            return self._item_added(event.item)
        if kind == "response.function_call_arguments.delta":
            return self._arguments_delta(event.item_id, event.delta)
        if kind == "response.function_call_arguments.done":
            return self._arguments_done(event.item_id, event.arguments)
        if kind == "response.output_item.done":
            item = event.item
            if item.type == "function_call":
                return self._arguments_done(item.id or item.call_id, item.arguments)
            if item.type == "reasoning":
                encrypted = getattr(item, "encrypted_content", None)
                signature = f"{RESPONSES_SIGNATURE}{item.id}:{encrypted}" if encrypted else None
                return self.close_reasoning(signature)
            return []
        if kind in ("response.completed", "response.incomplete"):
            response = event.response
            self.reason = "complete"
            if kind == "response.incomplete":
                details = getattr(response, "incomplete_details", None)
                if getattr(details, "reason", None) == "max_output_tokens":
                    self.reason = "length"
            usage = getattr(response, "usage", None)
            return [UsageReport(usage.input_tokens, usage.output_tokens)] if usage is not None else []
        if kind == "response.failed":
            error = getattr(event.response, "error", None)
            code = getattr(error, "code", None) or "response_failed"
            raise InBandError(code, retryable=code in _RETRYABLE_CODES, detail=getattr(error, "message", None))
        if kind == "error":
            code = getattr(event, "code", None) or "error"
            raise InBandError(code, retryable=code in _RETRYABLE_CODES, detail=getattr(event, "message", None))
        return []

    def _item_added(self, item: Any) -> list[ProviderEvent]:
        if item.type == "reasoning":
            self._summary = None
            return []
        if item.type != "function_call":
            return []
        call = item.call_id or item.id or f"call_{secrets.token_hex(12)}"
        self._by_item[item.id or call] = call
        self._arguments[call] = ""
        return [*self.call_start(call, item.name), *self._arguments_delta(item.id or call, item.arguments)]

    def _arguments_delta(self, item_id: str, text: str | None) -> list[ProviderEvent]:
        call = self._by_item.get(item_id)
        if call is None or not text:
            return []
        self._arguments[call] += text
        return self.call_delta(call, text)

    def _arguments_done(self, item_id: str, arguments: str | None) -> list[ProviderEvent]:
        """The whole arguments text: send what the deltas did not bring."""
        call = self._by_item.get(item_id)
        if call is None:
            return []
        sent = self._arguments[call]
        if arguments and arguments.startswith(sent):
            return self._arguments_delta(item_id, arguments[len(sent) :])
        return []
