"""The simulated provider (PROTOCOL.md "Providers")."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from tests.helpers import until
from tests.providers.fake_upstream import calls_of
from wsserver.wire.messages import ChatMessage, GenerateParams, ImagePart, TextPart, Tool, ToolCall, ToolChoiceName
from wsserver.providers import (
    Finish,
    GenerationRequest,
    ReasoningDelta,
    SimulatedProvider,
    TextDelta,
    ToolCallDelta,
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


# ------------------------------------------------------------ rich generations

WEATHER = Tool(
    name="get_weather",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}, "days": {"type": "integer"}},
        "required": ["city", "unit", "days"],
    },
)
TIME = Tool(name="get_time", parameters={"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]})


async def rich(messages: list[ChatMessage], tools: list[Tool] | None = None, choice: Any = None, **params: Any) -> list[Any]:
    params.setdefault("tokens_per_s", 0)
    params.setdefault("ttft_ms", 0)
    request = GenerationRequest(messages, "sim-1", GenerateParams(**params), tools=tools or (), tool_choice=choice)
    return [event async for event in SimulatedProvider().stream(request)]


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def test_reasoning_comes_first_and_ends_with_a_fake_signature() -> None:
    events = await rich(user("why is the sky blue"), reasoning={})  # effort: medium
    kinds = [type(e).__name__ for e in events]
    first_text = kinds.index("TextDelta")
    assert kinds[1:first_text] == ["ReasoningDelta"] * 32 + ["ReasoningDone"]
    thought = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert thought.startswith('The user asks "why is the sky blue". I can answer directly.')
    done = events[first_text - 1]
    assert done.signature.startswith("sim-") and len(done.signature) == 28 and done.redacted is None
    assert events == await rich(user("why is the sky blue"), reasoning={})  # deterministic
    # reasoning counts as output, the text keeps its length
    assert events[-2] == UsageReport(output_tokens=32 + kinds.count("TextDelta"))
    low = await rich(user("why is the sky blue"), reasoning={"effort": "minimal"})
    thought = "".join(e.text for e in low if isinstance(e, ReasoningDelta))
    assert thought == 'The user asks "why is the sky blue". I can answer directly.'  # kept whole
    short = await rich(user("why"), reasoning={"effort": "high", "budget_tokens": 5})
    assert len([e for e in short if isinstance(e, ReasoningDelta)]) == 5


async def test_a_named_tool_is_called_with_arguments_from_its_schema() -> None:
    events = await rich(user("What is get_weather in Oslo today?"), [WEATHER, TIME])
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "Calling get_weather."
    (call,) = calls_of(events).items()
    call_id, (name, arguments) = call
    assert call_id.startswith("call_") and name == "get_weather"
    assert orjson.loads(arguments) == {"city": "Oslo", "unit": "c", "days": 3}
    assert len([e for e in events if isinstance(e, ToolCallDelta)]) >= 2  # several fragments
    assert events[-1] == Finish("tool_calls")


async def test_two_tools_named_are_two_parallel_calls_in_the_order_named() -> None:
    events = await rich(user("get_time UTC and then get_weather Paris"), [WEATHER, TIME])
    calls = list(calls_of(events).values())
    assert [name for name, _ in calls] == ["get_time", "get_weather"]
    assert orjson.loads(calls[0][1]) == {"zone": "UTC"}
    assert orjson.loads(calls[1][1])["city"] == "Paris"
    assert len(set(calls_of(events))) == 2  # distinct ids


@pytest.mark.parametrize(
    ("prompt", "choice", "called"),
    [
        ("use get_weather for Rome", "none", []),
        ("tell me a joke", "auto", []),
        ("tell me a joke", None, []),
        ("tell me a joke", "required", ["get_weather"]),
        ("get_weather in Rome", {"name": "get_time"}, ["get_time"]),
    ],
)
async def test_tool_choice(prompt: str, choice: Any, called: list[str]) -> None:
    tool_choice = ToolChoiceName(**choice) if isinstance(choice, dict) else choice
    events = await rich(user(prompt), [WEATHER, TIME], tool_choice)
    assert [name for name, _ in calls_of(events).values()] == called
    assert events[-1] == Finish("tool_calls" if called else "complete")


async def test_after_a_tool_result_it_quotes_it_and_calls_nothing() -> None:
    first = await rich(user("get_weather in Oslo"), [WEATHER])
    (call_id,) = calls_of(first)
    conversation = [
        *user("get_weather in Oslo"),
        ChatMessage(
            role="assistant",
            content="Calling get_weather.",
            tool_calls=[ToolCall(id=call_id, name="get_weather", arguments={"city": "Oslo", "unit": "c", "days": 3})],
        ),
        ChatMessage(role="tool", tool_call_id=call_id, content='{"temp_c": 4, "sky": "rain"}'),
    ]
    events = await rich(conversation, [WEATHER], "required")
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text.startswith('get_weather returned "{"temp_c": 4, "sky": "rain"}".')
    assert calls_of(events) == {} and events[-1] == Finish("complete")


async def test_stages_call_one_step_after_another_then_answer() -> None:
    """", then" separates stages: one per step of an agent run (what the agent-run tests use)."""
    prompt = "get_weather in Oslo, then get_time in CET. Then get_weather Bergen"
    conversation = user(prompt)
    called = []
    for step in range(3):
        events = await rich(conversation, [WEATHER, TIME], "required")
        ((call_id, (name, arguments)),) = calls_of(events).items()
        called.append((name, orjson.loads(arguments).get("city") or orjson.loads(arguments).get("zone")))
        assert events[-1] == Finish("tool_calls")
        conversation = [
            *conversation,
            ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id=call_id, name=name, arguments=orjson.loads(arguments))]),
            ChatMessage(role="tool", tool_call_id=call_id, content=f"result {step}"),
        ]
    assert called == [("get_weather", "Oslo"), ("get_time", "CET"), ("get_weather", "Bergen")]
    events = await rich(conversation, [WEATHER, TIME], "required")
    assert calls_of(events) == {} and events[-1] == Finish("complete")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).startswith('get_weather returned "result 2".')


async def test_max_tokens_cuts_the_arguments() -> None:
    events = await rich(user("get_weather in Oslo"), [WEATHER], max_tokens=6)
    assert events[-1] == Finish("length")
    (name, arguments), = calls_of(events).values()
    assert name == "get_weather" and not arguments.endswith("}")


async def test_content_parts_count_and_echo_their_text() -> None:
    messages = [
        ChatMessage(
            role="user",
            content=[TextPart(type="text", text="what is"), ImagePart(type="image", url="https://x.test/a.png"), TextPart(type="text", text="this")],
        )
    ]
    events = await rich(messages, reply_tokens=6)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == 'You said "what is this'
    assert events[0] == UsageReport(input_tokens=count_tokens("what is this") + 3)
