"""Fixtures of the provider tests: a fake upstream on 127.0.0.1 and the real
providers (real SDKs) pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.providers.fake_upstream import FakeUpstream
from wsserver.providers import AnthropicProvider, OpenAIProvider, RetryPolicy

#: Retries as in production, with delays short enough for tests.
FAST_RETRY = RetryPolicy(retries=2, backoff_s=0.01, max_delay_s=0.5)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


def _factory(make: Callable[..., Any]) -> Callable[..., Any]:
    class _Ctx:
        """``async with factory(api="responses") as p``: a provider, closed after."""

        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("retry", FAST_RETRY)
            self.p = make(**kwargs)

        async def __aenter__(self) -> Any:
            return self.p

        async def __aexit__(self, *exc: object) -> None:
            await self.p.aclose()

    return _Ctx


@pytest.fixture
def openai_provider(upstream: FakeUpstream) -> Callable[..., Any]:
    """``async with openai_provider(api="responses") as p`` bound to the fake upstream."""
    return _factory(lambda **kw: OpenAIProvider(api_key="test", base_url=upstream.url + "/v1", **kw))


@pytest.fixture
def anthropic_provider(upstream: FakeUpstream) -> Callable[..., Any]:
    """``async with anthropic_provider() as p`` bound to the fake upstream."""
    return _factory(lambda **kw: AnthropicProvider(api_key="test", base_url=upstream.url, **kw))
