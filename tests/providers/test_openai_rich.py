"""Rich generations through the ``openai`` provider (real SDK, fake upstream):
tool calls, reasoning, refusals, images, structured output and provider
options, both ways, for Chat Completions (and OpenAI-compatible servers) and
the Responses API; inputs an API cannot take; cancel and retry in the new
states."""

from __future__ import annotations

from typing import Any

import pytest

from tests.providers.fake_upstream import SSE, FakeUpstream, Reply, calls_of, cancel_to_eof, collect
from tests.providers.test_openai import CANCEL_CLOSE_BOUND_S
from tests.providers.vendor_streams import (
    chat_deltas,
    chat_tool_calls,
    json_fragments,
    r_function_call,
    r_message,
    r_reasoning,
    responses_stream,
)
from wsserver.providers import (
    Finish,
    GenerationRequest,
    ReasoningDelta,
    ReasoningDone,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)
from wsserver.wire.messages import ChatMessage, GenerateParams, Tool, ToolChoiceName

WEATHER = Tool(
    name="get_weather",
    description="Weather of a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
PARIS, ROME = {"city": "Paris"}, {"city": "Rome"}
PNG = "data:image/png;base64,iVBORw0KGgo="
#: The two calls of ``follow_up`` as each API takes them back.
CHAT_CALLS = [
    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
    {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
]
RESPONSES_CALLS = [
    {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city":"Paris"}'},
    {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": '{"city":"Rome"}'},
]
ANTHROPIC_CALLS = [
    {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": PARIS},
    {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": ROME},
]


def ask(messages: list[dict[str, Any]] | None = None, *, tools: bool = True, tool_choice: Any = None, **params: Any) -> GenerationRequest:
    messages = messages or [{"role": "user", "content": "Weather in Paris and Rome?"}]
    return GenerationRequest(
        messages=[ChatMessage.model_validate(m) for m in messages],
        model="m",
        params=GenerateParams.model_validate(params),
        tools=[WEATHER] if tools else (),
        tool_choice=ToolChoiceName(**tool_choice) if isinstance(tool_choice, dict) else tool_choice,
    )


def follow_up(signature: str | None) -> list[dict[str, Any]]:
    """The conversation after step 1: the assistant's message exactly as
    ``stream.end.message`` gives it back, then the two tool results."""
    reasoning: dict[str, Any] = {"type": "reasoning", "text": "Two cities."}
    if signature:
        reasoning["signature"] = signature
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}, {"type": "image", "url": "https://example.com/map.png"}]},
        {
            "role": "assistant",
            "content": [reasoning, {"type": "text", "text": "Checking."}],
            "tool_calls": [
                {"id": "call_a", "name": "get_weather", "arguments": PARIS},
                {"id": "call_b", "name": "get_weather", "arguments": ROME},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18°C, sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "21°C"}]},
    ]


# ================================================================ Chat Completions


@pytest.mark.parametrize("interleave", [False, True], ids=["sequential", "interleaved"])
async def test_chat_parallel_tool_calls(upstream: FakeUpstream, openai_provider: Any, interleave: bool) -> None:
    paris, rome = json_fragments(PARIS, 4), json_fragments(ROME, 4)
    assert len(paris) >= 3 and len(rome) >= 3  # several fragments per call
    deltas = chat_tool_calls([("call_a", "get_weather", paris), ("call_b", "get_weather", rome)], interleave=interleave)
    upstream.script = [SSE(chat_deltas(deltas, finish="tool_calls", usage=(30, 12)))]
    async with openai_provider() as p:
        events, failure = await collect(p, ask(tool_choice="required"))
    assert failure is None
    if not interleave:
        assert events[:-2] == [
            ToolCallStart("call_a", "get_weather"),
            *[ToolCallDelta("call_a", f) for f in paris],
            ToolCallStart("call_b", "get_weather"),
            *[ToolCallDelta("call_b", f) for f in rome],
        ]
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert starts == [ToolCallStart("call_a", "get_weather"), ToolCallStart("call_b", "get_weather")]
    assert [e.text for e in events if isinstance(e, ToolCallDelta) and e.call == "call_a"] == paris
    assert [e.text for e in events if isinstance(e, ToolCallDelta) and e.call == "call_b"] == rome
    assert calls_of(events) == {"call_a": ("get_weather", '{"city": "Paris"}'), "call_b": ("get_weather", '{"city": "Rome"}')}
    assert events[-2:] == [UsageReport(30, 12), Finish("tool_calls")]
    body = upstream.requests[0].body
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER.parameters},
        }
    ]
    assert body["tool_choice"] == "required"


async def test_chat_follow_up_carries_tool_calls_and_results(upstream: FakeUpstream, openai_provider: Any) -> None:
    upstream.script = [SSE(chat_deltas([{"content": "Paris 18°C, "}, {"content": "Rome 21°C."}]))]
    async with openai_provider() as p:
        events, failure = await collect(p, ask(follow_up("sig"), tool_choice={"name": "get_weather"}))
    assert failure is None and events[-1] == Finish("complete")
    body = upstream.requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather in Paris and Rome?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/map.png"}},
            ],
        },
        {
            # reasoning is not sent back: Chat Completions has no field for it
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": CHAT_CALLS,
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18°C, sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "21°C"},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


async def test_chat_assistant_with_calls_only_has_no_content(upstream: FakeUpstream, openai_provider: Any) -> None:
    upstream.script = [SSE(chat_deltas([{"content": "ok"}]))]
    messages = follow_up(None)
    messages[2]["content"] = []
    async with openai_provider() as p:
        await collect(p, ask(messages))
    assistant = upstream.requests[0].body["messages"][2]
    assert "content" not in assistant and len(assistant["tool_calls"]) == 2


async def test_chat_reasoning_of_compatible_servers(upstream: FakeUpstream, openai_provider: Any) -> None:
    """vLLM/DeepSeek/llama.cpp stream ``reasoning_content``, Ollama/OpenRouter ``reasoning``."""
    upstream.script = [
        SSE(chat_deltas([{"reasoning_content": "Think"}, {"reasoning_content": "ing."}, {"content": "Done"}])),
        # a server in transition sends both fields with the same text: once
        SSE(chat_deltas([{"reasoning": "Hm.", "reasoning_content": "Hm."}, *chat_tool_calls([("call_1", "get_weather", ['{"city"', ':"Oslo"}'])])], finish="tool_calls")),
    ]
    async with openai_provider() as p:
        first, _ = await collect(p, ask(reasoning={"effort": "high"}))
        second, _ = await collect(p, ask())
    assert first == [
        ReasoningDelta("Think"),
        ReasoningDelta("ing."),
        ReasoningDone(),  # no signature: these servers give none
        TextDelta("Done"),
        UsageReport(5, 6),
        Finish("complete"),
    ]
    assert second[:3] == [ReasoningDelta("Hm."), ReasoningDone(), ToolCallStart("call_1", "get_weather")]
    assert second[-1] == Finish("tool_calls")
    assert upstream.requests[0].body["reasoning_effort"] == "high"
    assert "reasoning_effort" not in upstream.requests[1].body


async def test_chat_refusal_is_the_answer(upstream: FakeUpstream, openai_provider: Any) -> None:
    upstream.script = [SSE(chat_deltas([{"refusal": "I can't "}, {"refusal": "help with that."}]))]
    async with openai_provider() as p:
        events, failure = await collect(p, ask())
    assert failure is None
    assert events == [TextDelta("I can't "), TextDelta("help with that."), UsageReport(5, 6), Finish("complete")]


async def test_chat_quirks_of_compatible_servers(upstream: FakeUpstream, openai_provider: Any) -> None:
    """A whole call in one delta with finish ``stop`` (Ollama), a call without
    an id and with its arguments before its name, and a call with no
    arguments: each still comes out as a complete call, and the stream ends
    ``tool_calls``."""
    one_delta = {"tool_calls": [{"index": 0, "id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Lima"}'}}]}
    no_id = [
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 1, "function": {"name": "get_weather", "arguments": '"Quito"}'}}]},
    ]
    no_args = {"tool_calls": [{"index": 2, "id": "call_z", "type": "function", "function": {"name": "now", "arguments": ""}}]}
    upstream.script = [SSE(chat_deltas([one_delta, *no_id, no_args], finish="stop"))]
    async with openai_provider() as p:
        events, failure = await collect(p, ask())
    assert failure is None
    calls = calls_of(events)
    generated = next(c for c in calls if c not in ("call_x", "call_z"))
    assert generated.startswith("call_") and len(generated) > 10
    assert calls == {"call_x": ("get_weather", '{"city":"Lima"}'), generated: ("get_weather", '{"city":"Quito"}'), "call_z": ("now", "{}")}
    assert events[-1] == Finish("tool_calls")


async def test_chat_call_id_used_twice_is_an_upstream_error(upstream: FakeUpstream, openai_provider: Any) -> None:
    deltas = chat_tool_calls([("call_0", "get_weather", ['{"city":"A"}']), ("call_0", "get_weather", ['{"city":"B"}'])])
    upstream.script = [SSE(chat_deltas(deltas, finish="tool_calls"))]
    async with openai_provider() as p:
        events, failure = await collect(p, ask())
    assert events == [ToolCallStart("call_0", "get_weather"), ToolCallDelta("call_0", '{"city":"A"}')]
    assert failure is not None and failure.message == "openai: upstream error (tool call id used twice)"


async def test_chat_request_params(upstream: FakeUpstream, openai_provider: Any) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    upstream.script = [SSE(chat_deltas([{"content": "{}"}])), SSE(chat_deltas([{"content": "{}"}]))]
    async with openai_provider() as p:
        await collect(
            p,
            ask(
                tools=False,
                response_format={"type": "json_schema", "name": "reply", "schema": schema, "strict": True},
                reasoning={"effort": "minimal", "budget_tokens": 2000},
                provider_options={"parallel_tool_calls": False, "stream_options": {"extra": 1}, "stream": False, "seed": 7},
            ),
        )
        await collect(p, ask(tools=False, response_format={"type": "json_object"}))
    first, second = (r.body for r in upstream.requests)
    assert first["response_format"] == {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    assert first["reasoning_effort"] == "minimal"  # the API takes the effort; budget_tokens is for Anthropic
    assert first["parallel_tool_calls"] is False and first["seed"] == 7
    assert first["stream_options"] == {"include_usage": True, "extra": 1}  # objects merge key by key
    assert first["stream"] is True  # provider_options cannot turn streaming off
    assert "tools" not in first and "tool_choice" not in first
    assert second["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    ("messages", "params", "kwargs", "expected"),
    [
        (None, {"reasoning": {"budget_tokens": 4000}}, {}, "openai: reasoning.budget_tokens is not supported by Chat Completions; give reasoning.effort"),
        ([{"role": "system", "content": [{"type": "image", "url": PNG}]}, {"role": "user", "content": "x"}], {}, {}, "openai: images are not accepted in system messages"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image", "url": PNG}]}, {"role": "user", "content": "y"}],
            {},
            {},
            "openai: images are not accepted in assistant messages",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "name": "f", "arguments": {}}]}, {"role": "tool", "tool_call_id": "c", "content": [{"type": "image", "url": PNG}]}],
            {},
            {},
            "openai: images are not accepted in tool results by Chat Completions",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": "what is it?"}, {"type": "image", "url": PNG}]}], {}, {"images": False}, "openai: images are turned off for this provider (--no-openai-images)"),
    ],
    ids=["budget-only", "image-in-system", "image-in-assistant", "image-in-tool-result", "text-only-setup"],
)
async def test_chat_refuses_what_it_cannot_take(
    upstream: FakeUpstream, openai_provider: Any, messages: Any, params: dict[str, Any], kwargs: dict[str, Any], expected: str
) -> None:
    async with openai_provider(**kwargs) as p:
        events, failure = await collect(p, ask(messages, **params))
    assert events == []
    assert failure is not None and failure.code == "provider_error" and failure.message == expected
    assert upstream.requests == []  # refused before anything was sent


@pytest.mark.parametrize(
    ("upstream_message", "shown"),
    [
        ("Unrecognized request argument supplied: reasoning_effort", "Unrecognized request argument supplied: reasoning_effort"),
        ("Invalid content type. image_url is only supported by certain models.", "Invalid content type. image_url is only supported by certain models."),
    ],
)
async def test_chat_upstream_400_is_passed_on_safely(upstream: FakeUpstream, openai_provider: Any, upstream_message: str, shown: str) -> None:
    upstream.script = [Reply(400, {"error": {"message": upstream_message, "type": "invalid_request_error", "param": None}})]
    async with openai_provider() as p:
        events, failure = await collect(p, ask(reasoning={"effort": "low"}))
    assert events == []
    assert failure is not None and failure.code == "provider_error"
    assert failure.message == f"openai: request rejected (400): {shown}"
    assert len(upstream.requests) == 1  # a 400 is not retried


async def test_chat_nothing_is_retried_after_a_tool_call_started(upstream: FakeUpstream, openai_provider: Any) -> None:
    deltas = chat_tool_calls([("call_a", "get_weather", json_fragments(PARIS, 4))])
    # role chunk, the call's first delta, one fragment; then the connection is reset
    upstream.script = [SSE(chat_deltas(deltas, finish="tool_calls"), abort_after=3), SSE(chat_deltas([{"content": "again"}]))]
    async with openai_provider() as p:
        events, failure = await collect(p, ask())
    assert events == [ToolCallStart("call_a", "get_weather"), ToolCallDelta("call_a", '{"ci')]
    assert failure is not None and failure.message == "openai: the upstream connection was lost mid-stream"
    assert len(upstream.requests) == 1


async def test_chat_nothing_is_retried_after_reasoning_started(upstream: FakeUpstream, openai_provider: Any) -> None:
    upstream.script = [SSE(chat_deltas([{"reasoning_content": "Hm"}, {"content": "x"}]), abort_after=2), SSE(chat_deltas([{"content": "again"}]))]
    async with openai_provider() as p:
        events, failure = await collect(p, ask())
    assert events == [ReasoningDelta("Hm")]
    assert failure is not None and len(upstream.requests) == 1


async def test_chat_retry_before_the_first_event_still_works(upstream: FakeUpstream, openai_provider: Any) -> None:
    deltas = chat_tool_calls([("call_a", "get_weather", json_fragments(PARIS))])
    upstream.script = [Reply(503), SSE(chat_deltas(deltas, finish="tool_calls"))]
    async with openai_provider() as p:
        events, failure = await collect(p, ask())
    assert failure is None and calls_of(events) == {"call_a": ("get_weather", '{"city": "Paris"}')}
    assert len(upstream.requests) == 2 and upstream.requests[0].body == upstream.requests[1].body


@pytest.mark.parametrize("state", ["reasoning", "mid-arguments"])
async def test_chat_cancel_closes_the_upstream(upstream: FakeUpstream, openai_provider: Any, state: str) -> None:
    if state == "reasoning":
        deltas = [{"reasoning_content": "Let me think"}]
        at = lambda e: isinstance(e, ReasoningDelta)  # noqa: E731
    else:
        deltas = chat_tool_calls([("call_a", "get_weather", ['{"ci'])])
        at = lambda e: isinstance(e, ToolCallDelta)  # noqa: E731
    events = chat_deltas(deltas, finish=None, usage=None)[:-1]  # no [DONE]: the upstream is still generating
    upstream.script = [SSE(events, hold=10.0)]
    async with openai_provider() as p:
        latency = await cancel_to_eof(upstream, p, ask(), at=at)
    assert latency < CANCEL_CLOSE_BOUND_S
    assert not upstream.requests[0].finished


# ================================================================ Responses API


def responses_step_one() -> list[Any]:
    return responses_stream(
        [
            r_reasoning("rs_1", [["Two ", "cities."], ["Call ", "twice."]], "gAAAAB-encrypted=="),
            r_message("msg_1", ["Checking."]),
            r_function_call("fc_1", "call_a", "get_weather", json_fragments(PARIS, 4)),
            r_function_call("fc_2", "call_b", "get_weather", json_fragments(ROME, 4)),
        ],
        usage=(40, 25),
    )


async def test_responses_reasoning_summary_and_parallel_function_calls(upstream: FakeUpstream, openai_provider: Any) -> None:
    upstream.script = [SSE(responses_step_one())]
    async with openai_provider(api="responses") as p:
        events, failure = await collect(p, ask(reasoning={"effort": "low"}, tool_choice="auto"))
    assert failure is None
    paris, rome = json_fragments(PARIS, 4), json_fragments(ROME, 4)
    assert events == [
        ReasoningDelta("Two "),
        ReasoningDelta("cities."),
        ReasoningDelta("\n\nCall "),  # a second summary part, after a blank line
        ReasoningDelta("twice."),
        ReasoningDone(signature="responses:rs_1:gAAAAB-encrypted=="),
        TextDelta("Checking."),
        ToolCallStart("call_a", "get_weather"),
        *[ToolCallDelta("call_a", f) for f in paris],
        ToolCallStart("call_b", "get_weather"),
        *[ToolCallDelta("call_b", f) for f in rome],
        UsageReport(40, 25),
        Finish("tool_calls"),
    ]
    [rec] = upstream.requests
    assert rec.path == "/v1/responses"
    body = rec.body
    assert body["reasoning"] == {"effort": "low", "summary": "auto"}
    assert body["include"] == ["reasoning.encrypted_content"] and body["store"] is False
    assert body["tools"] == [
        {"type": "function", "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER.parameters, "strict": False}
    ]
    assert body["tool_choice"] == "auto"


async def test_responses_follow_up_carries_reasoning_calls_and_outputs(upstream: FakeUpstream, openai_provider: Any) -> None:
    upstream.script = [SSE(responses_stream([r_message("msg_2", ["Paris 18°C, Rome 21°C."])]))]
    messages = follow_up("responses:rs_1:gAAAAB-encrypted==")
    messages[1]["content"].append({"type": "image", "url": PNG})
    messages[4]["content"].append({"type": "image", "url": PNG})  # a tool result with an image
    async with openai_provider(api="responses") as p:
        events, failure = await collect(p, ask(messages, tool_choice={"name": "get_weather"}))
    assert failure is None and events[-1] == Finish("complete")
    body = upstream.requests[0].body
    assert body["input"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Weather in Paris and Rome?"},
                {"type": "input_image", "image_url": "https://example.com/map.png", "detail": "auto"},
                {"type": "input_image", "image_url": PNG, "detail": "auto"},
            ],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Two cities."}], "encrypted_content": "gAAAAB-encrypted=="},
        {"role": "assistant", "content": "Checking."},
        *RESPONSES_CALLS,
        {"type": "function_call_output", "call_id": "call_a", "output": "18°C, sunny"},
        {
            "type": "function_call_output",
            "call_id": "call_b",
            "output": [{"type": "input_text", "text": "21°C"}, {"type": "input_image", "image_url": PNG, "detail": "auto"}],
        },
    ]
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"}


async def test_responses_reasoning_from_elsewhere_is_not_sent(upstream: FakeUpstream, openai_provider: Any) -> None:
    """An Anthropic signature (or none) cannot be used by the Responses API."""
    upstream.script = [SSE(responses_stream([r_message("m", ["ok"])]))] * 2
    async with openai_provider(api="responses") as p:
        await collect(p, ask(follow_up("EqQBCgIYAhIM-anthropic-signature")))
        await collect(p, ask(follow_up(None)))
    for rec in upstream.requests:
        assert not [i for i in rec.body["input"] if i.get("type") == "reasoning"]
        assert {"role": "assistant", "content": "Checking."} in rec.body["input"]


async def test_responses_request_params(upstream: FakeUpstream, openai_provider: Any) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    upstream.script = [SSE(responses_stream([r_message("m", ["{}"])]))] * 2
    async with openai_provider(api="responses") as p:
        await collect(
            p,
            ask(
                tools=False,
                response_format={"type": "json_schema", "name": "count", "schema": schema},
                reasoning={},
                provider_options={"reasoning": {"summary": "detailed"}, "text": {"verbosity": "low"}, "truncation": "auto"},
            ),
        )
        await collect(p, ask(tools=False, response_format={"type": "json_object"}))
    first, second = (r.body for r in upstream.requests)
    assert first["text"] == {"format": {"type": "json_schema", "name": "count", "schema": schema}, "verbosity": "low"}
    assert first["reasoning"] == {"summary": "detailed"}  # merged over the mapping's {"summary": "auto"}
    assert first["truncation"] == "auto"
    assert first["include"] == ["reasoning.encrypted_content"]
    assert second["text"] == {"format": {"type": "json_object"}}
    # without params.reasoning: no summaries, and no encrypted content (models without reasoning refuse it)
    assert "reasoning" not in second and "include" not in second


async def test_responses_refusal_and_arguments_only_in_done(upstream: FakeUpstream, openai_provider: Any) -> None:
    """A refusal is the answer; a server that sends no argument deltas (only
    ``function_call_arguments.done``) still gives the whole arguments."""
    no_deltas = r_function_call("fc_9", "call_9", "get_weather", [])

    def with_arguments(o: int) -> Any:
        events, final = no_deltas(o)
        for e in events:
            if e["type"] == "response.function_call_arguments.done":
                e["arguments"] = '{"city":"Bern"}'
        final["arguments"] = '{"city":"Bern"}'
        return events, final

    upstream.script = [
        SSE(responses_stream([r_message("m", ["I can't ", "do that."], refusal=True)])),
        SSE(responses_stream([with_arguments])),
    ]
    async with openai_provider(api="responses") as p:
        refused, _ = await collect(p, ask())
        called, _ = await collect(p, ask())
    assert refused == [TextDelta("I can't "), TextDelta("do that."), UsageReport(9, 4), Finish("complete")]
    assert called == [
        ToolCallStart("call_9", "get_weather"),
        ToolCallDelta("call_9", '{"city":"Bern"}'),
        UsageReport(9, 4),
        Finish("tool_calls"),
    ]


@pytest.mark.parametrize(
    ("messages", "params", "expected"),
    [
        (None, {"stop": ["END"]}, "openai: params.stop is not supported by the Responses API"),
        (None, {"reasoning": {"budget_tokens": 2048}}, "openai: reasoning.budget_tokens is not supported by the Responses API; give reasoning.effort"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image", "url": PNG}]}, {"role": "user", "content": "y"}],
            {},
            "openai: images are not accepted in assistant messages",
        ),
    ],
    ids=["stop", "budget-only", "image-in-assistant"],
)
async def test_responses_refuses_what_it_cannot_take(
    upstream: FakeUpstream, openai_provider: Any, messages: Any, params: dict[str, Any], expected: str
) -> None:
    async with openai_provider(api="responses") as p:
        events, failure = await collect(p, ask(messages, **params))
    assert events == [] and failure is not None
    assert failure.code == "provider_error" and failure.message == expected
    assert upstream.requests == []


async def test_responses_nothing_is_retried_after_reasoning_started(upstream: FakeUpstream, openai_provider: Any) -> None:
    stream = responses_step_one()
    cut = next(i for i, (_, d) in enumerate(stream) if d["type"] == "response.reasoning_summary_text.delta") + 1
    upstream.script = [SSE(stream, abort_after=cut), SSE(responses_step_one())]
    async with openai_provider(api="responses") as p:
        events, failure = await collect(p, ask())
    assert events == [ReasoningDelta("Two ")]
    assert failure is not None and len(upstream.requests) == 1


@pytest.mark.parametrize("state", ["reasoning", "mid-arguments"])
async def test_responses_cancel_closes_the_upstream(upstream: FakeUpstream, openai_provider: Any, state: str) -> None:
    stream = responses_step_one()
    kind = "response.reasoning_summary_text.delta" if state == "reasoning" else "response.function_call_arguments.delta"
    cut = next(i for i, (_, d) in enumerate(stream) if d["type"] == kind) + 1
    upstream.script = [SSE(stream[:cut], hold=10.0)]
    at = (lambda e: isinstance(e, ReasoningDelta)) if state == "reasoning" else (lambda e: isinstance(e, ToolCallDelta))
    async with openai_provider(api="responses") as p:
        latency = await cancel_to_eof(upstream, p, ask(), at=at)
    assert latency < CANCEL_CLOSE_BOUND_S
    assert not upstream.requests[0].finished
