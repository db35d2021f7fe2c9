"""What the three vendor mappings (Chat Completions, Responses, Anthropic
Messages) share on the request side: reading the wire's rich messages,
``data:`` URLs, the arguments JSON, merging ``params.provider_options``, and
refusing what an API cannot take.

An input a vendor's API has no place for is refused before any request is
sent, with a :class:`~wsserver.providers.base.ProviderFailure` (the stream
ends with ``error provider_error``) whose message names the provider, the
input and, where there is one, what to send instead. Nothing a client sent
is dropped silently; the one documented exception is reasoning that the
target API cannot verify or has no field for (README "Real providers").
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

from ..wire.messages import ChatMessage, ContentPart, GenerateParams, ImagePart, TextPart
from .base import ProviderFailure

__all__ = [
    "RESPONSES_SIGNATURE",
    "SIMULATED_SIGNATURE",
    "arguments_json",
    "data_url",
    "merge_options",
    "parts_of",
    "sampling",
    "sdk_arguments",
    "text_only",
    "unsupported",
]

#: Prefix of the signature this server gives reasoning from the OpenAI
#: Responses API: ``responses:<reasoning item id>:<encrypted_content>``.
#: Anthropic signatures are base64 and never contain ``:``.
RESPONSES_SIGNATURE = "responses:"
#: Prefix of the simulated provider's fake signatures (no upstream can verify them).
SIMULATED_SIGNATURE = "sim-"
#: Keyword arguments of the SDK methods that are not part of the request body.
_SDK_ONLY = frozenset({"extra_body", "extra_headers", "extra_query", "timeout"})


def unsupported(label: str, what: str) -> ProviderFailure:
    """The failure for an input the upstream API cannot take."""
    return ProviderFailure(f"{label}: {what}")


def parts_of(message: ChatMessage) -> list[ContentPart]:
    """A message's content as a list of parts (a string is one text part)."""
    if isinstance(message.content, str):
        return [TextPart(type="text", text=message.content)] if message.content else []
    return list(message.content)


def text_only(label: str, message: ChatMessage, where: str) -> str:
    """The text of a message whose place in the vendor's request takes text
    only (``where`` says which place, for the error)."""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            raise unsupported(label, f"images are not accepted in {where}")
        # reasoning parts: only in assistant messages (checked by the server)
    return "".join(texts)


def data_url(label: str, url: str) -> tuple[str, str]:
    """``(media type, base64 data)`` of a ``data:...;base64,...`` URL."""
    head, sep, data = url.partition(",")
    meta = head[len("data:") :].split(";")
    if not sep or "base64" not in (p.strip().lower() for p in meta[1:]):
        raise unsupported(label, "a data: image URL must be base64-encoded (data:image/png;base64,...)")
    return (meta[0].strip().lower() or "text/plain"), data


def arguments_json(arguments: Mapping[str, Any]) -> str:
    """Parsed tool-call arguments as the JSON text OpenAI's APIs take back."""
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def sampling(params: GenerateParams) -> dict[str, Any]:
    """``temperature`` and ``top_p`` as the OpenAI APIs take them (when set)."""
    out: dict[str, Any] = {}
    if params.temperature is not None:
        out["temperature"] = params.temperature
    if params.top_p is not None:
        out["top_p"] = params.top_p
    return out


def merge_options(body: dict[str, Any], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``params.provider_options`` merged into the request body: objects are
    merged key by key (recursively), anything else replaces what the mapping
    built."""
    for key, value in (options or {}).items():
        mine = body.get(key)
        if isinstance(mine, dict) and isinstance(value, Mapping):
            body[key] = merge_options(dict(mine), value)
        else:
            body[key] = value
    return body


_signatures: dict[Any, frozenset[str]] = {}


def sdk_arguments(method: Callable[..., Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for an SDK ``create`` method: the body's fields the
    method declares are passed by name (the SDK's own handling, headers
    included), the others ride in ``extra_body`` exactly as they are."""
    key = getattr(method, "__func__", method)
    names = _signatures.get(key)
    if names is None:
        names = _signatures[key] = frozenset(inspect.signature(method).parameters) - _SDK_ONLY
    kwargs = {k: v for k, v in body.items() if k in names}
    extra = {k: v for k, v in body.items() if k not in names}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs
