"""LLM providers. ``simulated`` is built in and needs no key or network;
``openai`` and ``anthropic`` stream from the real APIs (their SDKs are
imported only when such a provider is constructed)."""

from .anthropic_provider import AnthropicProvider
from .base import (
    Finish,
    GenerationRequest,
    Provider,
    ProviderEvent,
    ProviderFailure,
    ProviderUnavailable,
    Providers,
    ReasoningDelta,
    ReasoningDone,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)
from .openai_provider import OpenAIProvider
from .simulated import SimulatedProvider, simulated_reply
from .upstream import RetryPolicy

__all__ = [
    "AnthropicProvider",
    "Finish",
    "GenerationRequest",
    "OpenAIProvider",
    "Provider",
    "ProviderEvent",
    "ProviderFailure",
    "ProviderUnavailable",
    "Providers",
    "ReasoningDelta",
    "ReasoningDone",
    "RetryPolicy",
    "SimulatedProvider",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallStart",
    "UsageReport",
    "simulated_reply",
]
