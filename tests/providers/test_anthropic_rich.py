"""Rich generations through the ``anthropic`` provider (real SDK, fake
upstream): ``tool_use`` blocks with ``input_json_delta``, ``thinking`` with
its ``signature_delta``, ``redacted_thinking``, round-tripped in the next
request; images, ``tool_choice``, thinking budgets and structured output;
inputs the API cannot take; cancel and retry in the new states."""

from __future__ import annotations

from typing import Any

import pytest

from tests.providers.fake_upstream import SSE, FakeUpstream, Reply, anthropic_error, calls_of, cancel_to_eof, collect
from tests.providers.test_openai import CANCEL_CLOSE_BOUND_S
from tests.providers.test_openai_rich import ANTHROPIC_CALLS, PARIS, PNG, ROME, WEATHER, ask, follow_up
from tests.providers.vendor_streams import a_redacted, a_text, a_thinking, a_tool_use, anthropic_message, json_fragments
from wsserver.providers import (
    Finish,
    ReasoningDelta,
    ReasoningDone,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)

SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds=="
REDACTED = "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP=="


def step_one(**kwargs: Any) -> list[Any]:
    return anthropic_message(
        [
            a_thinking(["Two ", "cities, ", "two calls."], SIGNATURE),
            a_redacted(REDACTED),
            a_text("Checking."),
            a_tool_use("toolu_a", "get_weather", json_fragments(PARIS, 4)),
            a_tool_use("toolu_b", "get_weather", json_fragments(ROME, 4)),
        ],
        stop_reason="tool_use",
        input_tokens=50,
        output_tokens=31,
        **kwargs,
    )


async def test_thinking_redacted_text_and_parallel_tool_use(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    upstream.script = [SSE(step_one())]
    async with anthropic_provider() as p:
        events, failure = await collect(p, ask(reasoning={"budget_tokens": 2000}, tool_choice="auto"))
    assert failure is None
    paris, rome = json_fragments(PARIS, 4), json_fragments(ROME, 4)
    assert len(paris) >= 3 and len(rome) >= 3
    assert events == [
        UsageReport(input_tokens=50),
        ReasoningDelta("Two "),
        ReasoningDelta("cities, "),
        ReasoningDelta("two calls."),
        ReasoningDone(signature=SIGNATURE),
        ReasoningDone(redacted=REDACTED),
        TextDelta("Checking."),
        ToolCallStart("toolu_a", "get_weather"),
        *[ToolCallDelta("toolu_a", f) for f in paris],  # the empty first partial_json is no event
        ToolCallStart("toolu_b", "get_weather"),
        *[ToolCallDelta("toolu_b", f) for f in rome],
        UsageReport(output_tokens=31),
        Finish("tool_calls"),
    ]
    body = upstream.requests[0].body
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    assert body["max_tokens"] == 4096 + 2000  # the default leaves room for the answer after the budget
    assert body["tools"] == [{"name": "get_weather", "description": "Weather of a city", "input_schema": WEATHER.parameters}]
    assert body["tool_choice"] == {"type": "auto"}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"}), ({"name": "get_weather"}, {"type": "tool", "name": "get_weather"})],
)
async def test_tool_choice(upstream: FakeUpstream, anthropic_provider: Any, choice: Any, expected: dict[str, str]) -> None:
    upstream.script = [SSE(anthropic_message([a_text("ok")]))]
    async with anthropic_provider() as p:
        await collect(p, ask(tool_choice=choice))
    assert upstream.requests[0].body["tool_choice"] == expected


async def test_follow_up_carries_thinking_signature_and_tool_results(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    upstream.script = [SSE(anthropic_message([a_text("Paris 18°C, Rome 21°C.")]))]
    messages = follow_up(SIGNATURE)
    # the assistant message as stream.end.message gives it: thinking, the redacted block, text
    messages[2]["content"].insert(1, {"type": "reasoning", "redacted": REDACTED})
    messages[1]["content"].append({"type": "image", "url": PNG})
    messages[4]["content"].append({"type": "image", "url": PNG})  # a tool result with an image
    messages.append({"role": "user", "content": "And tomorrow?"})
    async with anthropic_provider() as p:
        events, failure = await collect(p, ask(messages, tool_choice={"name": "get_weather"}, reasoning={"budget_tokens": 2000}))
    assert failure is None and events[-1] == Finish("complete")
    body = upstream.requests[0].body
    assert body["system"] == "Be brief."
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather in Paris and Rome?"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/map.png"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Two cities.", "signature": SIGNATURE},
                {"type": "redacted_thinking", "data": REDACTED},
                {"type": "text", "text": "Checking."},
                *ANTHROPIC_CALLS,
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "18°C, sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_b",
                    "content": [
                        {"type": "text", "text": "21°C"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    ],
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather"}


async def test_reasoning_anthropic_cannot_verify_is_not_sent(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    """Reasoning without a signature, or with the Responses API's, is left
    out; an assistant message left with nothing is left out too."""
    upstream.script = [SSE(anthropic_message([a_text("ok")]))] * 3
    only_reasoning = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "reasoning", "text": "unsigned"}]},
        {"role": "user", "content": "again"},
    ]
    async with anthropic_provider() as p:
        await collect(p, ask(follow_up("responses:rs_1:gAAAA")))
        await collect(p, ask(follow_up("sim-cc0141b29343544ee0f4402d")))  # the simulated provider's
        await collect(p, ask(only_reasoning))
    first, simulated, third = (r.body for r in upstream.requests)
    assert first["messages"][1]["content"][0] == {"type": "text", "text": "Checking."}
    assert simulated["messages"][1]["content"][0] == {"type": "text", "text": "Checking."}
    assert third["messages"] == [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]


async def test_thinking_without_text_keeps_its_signature(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    """``display: "omitted"``: no thinking text, only the signature."""
    upstream.script = [SSE(anthropic_message([a_thinking([], SIGNATURE), a_text("Hi")]))]
    async with anthropic_provider() as p:
        events, _ = await collect(p, ask(reasoning={"effort": "low"}))
    assert events[1:3] == [ReasoningDone(signature=SIGNATURE), TextDelta("Hi")]
    assert upstream.requests[0].body["thinking"] == {"type": "enabled", "budget_tokens": 2048}


async def test_tool_without_arguments_gets_an_empty_object(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    upstream.script = [SSE(anthropic_message([a_tool_use("toolu_1", "now", [])], stop_reason="tool_use"))]
    async with anthropic_provider() as p:
        events, _ = await collect(p, ask())
    assert calls_of(events) == {"toolu_1": ("now", "{}")}
    assert events[-1] == Finish("tool_calls")


async def test_request_params(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    upstream.script = [SSE(anthropic_message([a_text("{}")]))] * 2
    async with anthropic_provider() as p:
        await collect(
            p,
            ask(
                tool_choice="none",
                max_tokens=9000,
                reasoning={"effort": "medium"},
                response_format={"type": "json_schema", "name": "count", "schema": schema, "strict": True},
                provider_options={"output_config": {"effort": "medium"}, "thinking": {"display": "summarized"}, "top_k": 5},
            ),
        )
        await collect(p, ask(tools=False, tool_choice="auto"))
    first, second = (r.body for r in upstream.requests)
    assert first["max_tokens"] == 9000
    assert first["thinking"] == {"type": "enabled", "budget_tokens": 8192, "display": "summarized"}  # merged
    assert first["output_config"] == {"format": {"type": "json_schema", "schema": schema}, "effort": "medium"}
    assert first["tool_choice"] == {"type": "none"} and first["top_k"] == 5
    assert second["tool_choice"] == {"type": "auto"} and "tools" not in second and "thinking" not in second


@pytest.mark.parametrize(
    ("messages", "params", "expected"),
    [
        (None, {"response_format": {"type": "json_object"}}, "anthropic: response_format json_object is not supported by Anthropic; give a json_schema"),
        (None, {"reasoning": {"budget_tokens": 500}}, "anthropic: reasoning.budget_tokens must be at least 1024 for Anthropic thinking"),
        (None, {"reasoning": {"budget_tokens": 2000}, "max_tokens": 2000}, "anthropic: max_tokens (2000) must be larger than the thinking budget (2000)"),
        ([{"role": "user", "content": [{"type": "image", "url": "data:image/svg+xml;base64,PHN2Zz4="}]}], {}, "anthropic: image type 'image/svg+xml' is not supported (jpeg, png, gif or webp)"),
        ([{"role": "user", "content": [{"type": "image", "url": "data:image/png,rawbytes"}]}], {}, "anthropic: a data: image URL must be base64-encoded (data:image/png;base64,...)"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image", "url": PNG}]}, {"role": "user", "content": "y"}],
            {},
            "anthropic: images are not accepted in assistant messages",
        ),
        ([{"role": "system", "content": [{"type": "image", "url": PNG}]}, {"role": "user", "content": "x"}], {}, "anthropic: images are not accepted in system messages"),
    ],
    ids=["json-object", "small-budget", "budget-over-max-tokens", "svg", "not-base64", "image-in-assistant", "image-in-system"],
)
async def test_refuses_what_it_cannot_take(
    upstream: FakeUpstream, anthropic_provider: Any, messages: Any, params: dict[str, Any], expected: str
) -> None:
    async with anthropic_provider() as p:
        events, failure = await collect(p, ask(messages, **params))
    assert events == [] and failure is not None
    assert failure.code == "provider_error" and failure.message == expected
    assert upstream.requests == []


async def test_upstream_400_for_thinking_is_passed_on_safely(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    refusal = {"type": "error", "error": {"type": "invalid_request_error", "message": "thinking: this model does not support extended thinking"}}
    upstream.script = [Reply(400, refusal)]
    async with anthropic_provider() as p:
        events, failure = await collect(p, ask(reasoning={"budget_tokens": 2000}))
    assert events == [] and failure is not None
    assert failure.message == "anthropic: request rejected (400): thinking: this model does not support extended thinking"
    assert len(upstream.requests) == 1


async def test_nothing_is_retried_after_thinking_started(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    partial = step_one()[:5]  # message_start, ping, thinking start, two thinking deltas
    upstream.script = [SSE([*partial, anthropic_error("overloaded_error")]), SSE(step_one())]
    async with anthropic_provider() as p:
        events, failure = await collect(p, ask())
    assert events == [UsageReport(input_tokens=50), ReasoningDelta("Two "), ReasoningDelta("cities, ")]
    assert failure is not None and failure.message == "anthropic: upstream error (overloaded_error)"
    assert len(upstream.requests) == 1


async def test_retry_before_any_output_still_works(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    upstream.script = [SSE([step_one()[0], anthropic_error("overloaded_error")]), SSE(step_one())]
    async with anthropic_provider() as p:
        events, failure = await collect(p, ask())
    assert failure is None and len(upstream.requests) == 2
    assert calls_of(events) == {"toolu_a": ("get_weather", '{"city": "Paris"}'), "toolu_b": ("get_weather", '{"city": "Rome"}')}


async def test_redacted_block_alone_is_output(upstream: FakeUpstream, anthropic_provider: Any) -> None:
    """A redacted block is an event: nothing is retried after it."""
    upstream.script = [SSE(anthropic_message([a_redacted(REDACTED), a_text("x")], cut_after_blocks=1)), SSE(step_one())]
    async with anthropic_provider() as p:
        events, failure = await collect(p, ask())
    assert events == [UsageReport(input_tokens=7), ReasoningDone(redacted=REDACTED)]
    assert failure is not None and len(upstream.requests) == 1  # the cut stream was not retried


@pytest.mark.parametrize("state", ["thinking", "mid-arguments"])
async def test_cancel_closes_the_upstream(upstream: FakeUpstream, anthropic_provider: Any, state: str) -> None:
    stream = step_one()
    kind = "thinking_delta" if state == "thinking" else "input_json_delta"
    cut = next(i for i, (_, d) in enumerate(stream) if d.get("delta", {}).get("type") == kind and (kind != "input_json_delta" or d["delta"]["partial_json"])) + 1
    upstream.script = [SSE(stream[:cut], hold=10.0)]
    at = (lambda e: isinstance(e, ReasoningDelta)) if state == "thinking" else (lambda e: isinstance(e, ToolCallDelta))
    async with anthropic_provider() as p:
        latency = await cancel_to_eof(upstream, p, ask(), at=at)
    assert latency < CANCEL_CLOSE_BOUND_S
    assert not upstream.requests[0].finished
