"""The provider interface: what every LLM backend implements.

A provider turns a :class:`GenerationRequest` into an async iterator of
:data:`ProviderEvent` values. The stream runner (:mod:`wsserver.streams`)
consumes it inside one task per generation; cancelling that task raises
``CancelledError`` at the provider's current ``await``, and the provider MUST
then close whatever it reads from (the upstream HTTP response), because that
is what stops the bill. Write providers as async generators with
``try/finally`` or ``async with`` around the upstream stream.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..wire.messages import ChatMessage, GenerateParams, Tool, ToolChoice

__all__ = [
    "Finish",
    "ReasoningDelta",
    "ReasoningDone",
    "ToolCallDelta",
    "ToolCallStart",
    "GenerationRequest",
    "Provider",
    "ProviderEvent",
    "ProviderFailure",
    "ProviderUnavailable",
    "Providers",
    "TextDelta",
    "UsageReport",
]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the answer. ``tokens`` is its exact token count when known."""

    text: str
    tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning (thinking, or a reasoning summary)."""

    text: str
    tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ReasoningDone:
    """The current reasoning block is complete. ``signature`` (Anthropic) goes
    back with it in the next request; ``redacted`` is an opaque redacted block
    (Anthropic ``redacted_thinking``) that had no text, passed back as it came."""

    signature: str | None = None
    redacted: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """The model opens tool call ``call`` (the provider's id) of tool ``name``."""

    call: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of the arguments JSON of call ``call`` (fragments concatenate)."""

    call: str
    text: str


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Token usage so far. Values are cumulative: a later report overwrites."""

    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """Why the provider stopped (the last event of a stream that was not cut)."""

    reason: Literal["complete", "length", "tool_calls"]


ProviderEvent = TextDelta | ReasoningDelta | ReasoningDone | ToolCallStart | ToolCallDelta | UsageReport | Finish


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a provider is asked: the conversation (content parts, tool calls
    and tool results in the wire's shape), the model, the parameters
    (``params.response_format``, ``params.reasoning`` and
    ``params.provider_options`` included), and the tools."""

    messages: Sequence[ChatMessage]
    model: str
    params: GenerateParams = field(default_factory=GenerateParams)
    tools: Sequence[Tool] = ()
    tool_choice: ToolChoice | None = None


class ProviderFailure(Exception):
    """The provider failed; ``message`` is safe to show to the client."""

    def __init__(self, message: str, *, code: str = "provider_error") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProviderUnavailable(Exception):
    """The requested provider is not configured; the message says what to set."""


class Provider(abc.ABC):
    """One LLM backend."""

    #: The name clients use in ``generate.provider``.
    name: str
    #: The model used when ``generate.model`` is absent.
    default_model: str

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        """Yield the events of one generation."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release clients and connection pools (called at server shutdown)."""


class Providers:
    """The providers a server offers, and the default one.

    ``unconfigured`` maps the names of known providers that are not set up on
    this server to what to set (``"set OPENAI_API_KEY (or --openai-api-key /
    --openai-base-url)"``); asking for one of them gets ``provider_unavailable``
    with that hint instead of the list of available providers.
    """

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        default: str,
        unconfigured: Mapping[str, str] | None = None,
    ) -> None:
        self._by_name: dict[str, Provider] = {p.name: p for p in providers}
        self.default = default
        self.unconfigured: dict[str, str] = {
            name: hint for name, hint in (unconfigured or {}).items() if name not in self._by_name
        }

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def resolve(self, name: str | None, model: str | None) -> tuple[str, str]:
        """Return ``(provider, model)`` for a request, or raise ProviderUnavailable."""
        name = name or self.default
        provider = self._by_name.get(name)
        if provider is None:
            hint = self.unconfigured.get(name)
            if hint is not None:
                raise ProviderUnavailable(f"provider {name!r} is not configured: {hint}")
            raise ProviderUnavailable(
                f"provider {name!r} is not configured on this server; "
                f"available: {', '.join(self.names) or 'none'}"
            )
        return name, model or provider.default_model

    def __getitem__(self, name: str) -> Provider:
        return self._by_name[name]

    def as_mapping(self) -> Mapping[str, Provider]:
        return dict(self._by_name)

    async def aclose(self) -> None:
        for provider in self._by_name.values():
            await provider.aclose()
