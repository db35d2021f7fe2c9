"""Which real providers a server offers, from its config and the environment.

A provider is *configured* when it has a key or a base URL:

=============  ==========================================  ==========================================
provider       key (first set wins)                        base URL (first set wins)
=============  ==========================================  ==========================================
``openai``     ``--openai-api-key``,                       ``--openai-base-url``, ``--base-url`` (when
               ``WSSERVER_OPENAI_API_KEY``,                ``--provider openai``),
               ``OPENAI_API_KEY``                          ``WSSERVER_OPENAI_BASE_URL``,
                                                           ``OPENAI_BASE_URL``, else api.openai.com
``anthropic``  ``--anthropic-api-key``,                    ``--anthropic-base-url``, ``--base-url``
               ``WSSERVER_ANTHROPIC_API_KEY``,             (when ``--provider anthropic``),
               ``ANTHROPIC_API_KEY`` (or                   ``WSSERVER_ANTHROPIC_BASE_URL``,
               ``ANTHROPIC_AUTH_TOKEN``, sent as a         ``ANTHROPIC_BASE_URL``, else
               bearer token)                               api.anthropic.com
=============  ==========================================  ==========================================

A base URL without a key is enough (local OpenAI-compatible servers such as
Ollama, vLLM or llama.cpp do not check keys; a placeholder is sent). A known
provider that is not configured stays in :attr:`Providers.unconfigured` with
a hint, so a ``generate`` naming it gets ``provider_unavailable`` saying what
to set; the server starts either way.

The SDKs are imported only here, when a provider is configured (the provider
constructors import them): ``import wsserver.server`` imports neither.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .base import Provider
from .upstream import RetryPolicy

__all__ = ["HINTS", "ProviderSettings", "real_providers"]

logger = logging.getLogger("wsserver.providers")

HINTS = {
    "openai": "set OPENAI_API_KEY (or --openai-api-key / --openai-base-url)",
    "anthropic": "set ANTHROPIC_API_KEY (or --anthropic-api-key / --anthropic-base-url)",
}


@dataclass(frozen=True, kw_only=True)
class ProviderSettings:
    """What choosing and building the providers needs (the server's options of
    the same names; see ``wsserver serve --help``)."""

    provider: str = "simulated"
    model: str | None = None
    base_url: str | None = None
    openai_api_key: str | None = dataclasses.field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_model: str = "gpt-5-mini"
    openai_api: Literal["chat", "responses"] = "chat"
    openai_images: bool = True
    anthropic_api_key: str | None = dataclasses.field(default=None, repr=False)
    anthropic_base_url: str | None = None
    anthropic_model: str = "claude-haiku-4-5"
    anthropic_max_tokens: int = 4096
    provider_retries: int = 2
    provider_backoff: float = 0.5
    provider_retry_max: float = 10.0
    provider_timeout: float = 120.0

    @classmethod
    def of(cls, options: Any) -> ProviderSettings:
        """The settings of the same names from any object that has them (a server config)."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})


def _first(*values: str | None) -> str | None:
    for value in values:
        if value:
            return value
    return None


def real_providers(
    config: ProviderSettings, environ: Mapping[str, str] | None = None
) -> tuple[list[Provider], dict[str, str]]:
    """The configured real providers, and a hint for each one that is not."""
    env = os.environ if environ is None else environ
    retry = RetryPolicy(
        retries=max(0, config.provider_retries),
        backoff_s=max(0.0, config.provider_backoff),
        max_delay_s=max(0.0, config.provider_retry_max),
    )
    providers: list[Provider] = []
    unconfigured: dict[str, str] = {}

    def default_model(name: str, own: str) -> str:
        return config.model if config.provider == name and config.model else own

    def generic_base(name: str) -> str | None:
        return config.base_url if config.provider == name else None

    key = _first(config.openai_api_key, env.get("OPENAI_API_KEY"))
    base = _first(config.openai_base_url, generic_base("openai"), env.get("OPENAI_BASE_URL"))
    if key or base:
        try:
            from .openai_provider import OpenAIProvider

            providers.append(
                OpenAIProvider(
                    api_key=key,
                    base_url=base,
                    default_model=default_model("openai", config.openai_model),
                    api=config.openai_api,
                    images=config.openai_images,
                    timeout=config.provider_timeout,
                    retry=retry,
                )
            )
        except ImportError:
            unconfigured["openai"] = "the openai package is not installed (pip install openai)"
    else:
        unconfigured["openai"] = HINTS["openai"]

    key = _first(config.anthropic_api_key, env.get("ANTHROPIC_API_KEY"))
    token = None if key else env.get("ANTHROPIC_AUTH_TOKEN") or None
    base = _first(config.anthropic_base_url, generic_base("anthropic"), env.get("ANTHROPIC_BASE_URL"))
    if key or token or base:
        try:
            from .anthropic_provider import AnthropicProvider

            providers.append(
                AnthropicProvider(
                    api_key=key,
                    auth_token=token,
                    base_url=base,
                    default_model=default_model("anthropic", config.anthropic_model),
                    default_max_tokens=config.anthropic_max_tokens,
                    timeout=config.provider_timeout,
                    retry=retry,
                )
            )
        except ImportError:
            unconfigured["anthropic"] = "the anthropic package is not installed (pip install anthropic)"
    else:
        unconfigured["anthropic"] = HINTS["anthropic"]

    if config.base_url and config.provider not in HINTS:
        logger.warning(
            "--base-url applies to the default provider when it is openai or anthropic; "
            "ignored for provider %r",
            config.provider,
        )
    return providers, unconfigured
