"""LLM providers. ``simulated`` is built in and needs no key or network."""

from .base import (
    Finish,
    GenerationRequest,
    Provider,
    ProviderEvent,
    ProviderFailure,
    ProviderUnavailable,
    Providers,
    TextDelta,
    UsageReport,
)
from .simulated import SimulatedProvider, simulated_reply

__all__ = [
    "Finish",
    "GenerationRequest",
    "Provider",
    "ProviderEvent",
    "ProviderFailure",
    "ProviderUnavailable",
    "Providers",
    "SimulatedProvider",
    "TextDelta",
    "UsageReport",
    "simulated_reply",
]
