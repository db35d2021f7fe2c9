"""The simulated provider (PROTOCOL.md "Providers")."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.helpers import until
from wsserver.wire.messages import ChatMessage, GenerateParams
from wsserver.providers import (
    Finish,
    GenerationRequest,
    SimulatedProvider,
    TextDelta,
    UsageReport,
    simulated_reply,
)
from wsserver.providers.simulated import UNPACED_BURST, count_tokens


def conversation(text: str = "hello there, how are you") -> list[ChatMessage]:
    return [ChatMessage(role="system", content="be nice"), ChatMessage(role="user", content=text)]


async def collect(provider: SimulatedProvider, **params: Any) -> list[Any]:
    request = GenerationRequest(conversation(), "sim-1", GenerateParams(**params))
    return [event async for event in provider.stream(request)]


def test_reply_is_deterministic_and_depends_on_the_conversation() -> None:
    assert simulated_reply(conversation()) == simulated_reply(conversation())
    assert simulated_reply(conversation("a")) != simulated_reply(conversation("b"))


def test_reply_starts_with_an_echo_of_the_last_user_message() -> None:
    text = "".join(simulated_reply(conversation("what is the capital of France")))
    assert text.startswith('You said "what is the capital of France".')
    long = "".join(simulated_reply(conversation("one two three four five six seven eight nine ten")))
    assert long.startswith('You said "one two three four five six seven eight …".')


def test_natural_length_is_whole_sentences() -> None:
    for i in range(20):
        tokens = simulated_reply(conversation(f"question {i}"))
        assert 24 <= len(tokens) <= 80
        assert tokens[-1] in (".", "!", "?")


def test_reply_tokens_is_exact() -> None:
    assert len(simulated_reply(conversation(), reply_tokens=1000)) == 1000
    assert len(simulated_reply(conversation(), reply_tokens=3)) == 3


async def test_events_usage_and_finish() -> None:
    events = await collect(SimulatedProvider(tokens_per_s=0, ttft_ms=0), reply_tokens=40)
    assert events[0] == UsageReport(input_tokens=count_tokens("be nice") + 3 + count_tokens("hello there, how are you") + 3)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == 40 and all(d.tokens == 1 for d in deltas)
    assert "".join(d.text for d in deltas) == "".join(simulated_reply(conversation(), 40))
    assert events[-2:] == [UsageReport(output_tokens=40), Finish("complete")]


async def test_max_tokens_ends_with_length() -> None:
    events = await collect(SimulatedProvider(tokens_per_s=0, ttft_ms=0), reply_tokens=40, max_tokens=5)
    assert len([e for e in events if isinstance(e, TextDelta)]) == 5
    assert events[-1] == Finish("length")


async def test_pacing_and_ttft() -> None:
    provider = SimulatedProvider(tokens_per_s=0, ttft_ms=0)
    t0 = time.monotonic()
    await collect(provider, reply_tokens=10, tokens_per_s=100, ttft_ms=100)
    elapsed = time.monotonic() - t0
    # 100 ms to the first token, then 9 intervals of 10 ms: ~0.19 s (generous bounds)
    assert 0.18 <= elapsed < 2.0


async def test_unpaced_stream_yields_to_the_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await collect(SimulatedProvider(tokens_per_s=0, ttft_ms=0), reply_tokens=200)
    task.cancel()
    assert ticks >= 200 // UNPACED_BURST  # the other task ran between bursts


async def test_cancel_stops_at_once_and_runs_cleanup() -> None:
    provider = SimulatedProvider(tokens_per_s=0, ttft_ms=0)
    request = GenerationRequest(conversation(), "sim-1", GenerateParams(reply_tokens=100_000, tokens_per_s=1000))
    seen = 0
    events = provider.stream(request)

    async def consume() -> None:
        nonlocal seen
        async for event in events:
            if isinstance(event, TextDelta):
                seen += 1

    task = asyncio.ensure_future(consume())
    await until(lambda: seen > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 0 < seen < 1000
    assert events.ag_frame is None  # type: ignore[attr-defined]  # the generator is closed
