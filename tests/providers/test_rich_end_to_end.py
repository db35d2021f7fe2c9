"""Rich generations end to end: a WebSocket client -> wsserver -> the real
provider (real SDK) -> a fake upstream replaying the vendor's stream, and
back as frames. For each provider path (Chat Completions, Responses,
Anthropic Messages) a two-step tool conversation: step 1 streams reasoning
and two parallel tool calls and ends ``tool_calls`` with ``stream.end.message``;
step 2 sends that message back with the tool results, and the request the
upstream received must carry them (and the reasoning signature) in the
vendor's own shape.

Run with ``-s`` to print the transcript of each conversation (the frames the
client saw and the request bodies the upstream received)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import connect

import wsserver

from tests.helpers import RawClient
from tests.providers.fake_upstream import SSE, FakeUpstream
from tests.providers.test_openai import CANCEL_CLOSE_BOUND_S
from tests.providers.test_openai_rich import ANTHROPIC_CALLS, CHAT_CALLS, RESPONSES_CALLS
from tests.providers.vendor_streams import (
    a_text,
    a_thinking,
    a_tool_use,
    anthropic_message,
    chat_deltas,
    chat_tool_calls,
    json_fragments,
    r_function_call,
    r_message,
    r_reasoning,
    responses_stream,
)
from wsserver.server import Server

WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
QUESTION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the weather in Paris and in Rome?"},
]
PARIS, ROME = {"city": "Paris"}, {"city": "Rome"}
RESULTS = {"Paris": "18°C, sunny", "Rome": "21°C, clear"}
ANSWER = ["Paris: 18°C and sunny; ", "Rome: 21°C and clear."]
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds=="
ENCRYPTED = "gAAAAABpMm18nXrFLUlQW-encrypted=="


def config(up: FakeUpstream, path: str) -> dict[str, Any]:
    base = {"provider_backoff": 0.01, "provider_retry_max": 0.5}
    if path == "anthropic":
        return {**base, "anthropic_base_url": up.url, "anthropic_api_key": "test"}
    return {**base, "openai_base_url": up.url + "/v1", "openai_api_key": "test", "openai_api": path}


def provider_of(path: str) -> str:
    return "anthropic" if path == "anthropic" else "openai"


def step_one(path: str) -> list[Any]:
    """The upstream's answer to step 1: reasoning, a sentence, two calls in fragments."""
    paris, rome = json_fragments(PARIS, 4), json_fragments(ROME, 4)
    if path == "chat":  # an OpenAI-compatible server that streams its reasoning
        deltas = [{"reasoning_content": "Two cities, "}, {"reasoning_content": "two calls."}, {"content": "Checking."}]
        calls = chat_tool_calls([("call_a", "get_weather", paris), ("call_b", "get_weather", rome)])
        return chat_deltas(deltas + calls, finish="tool_calls", usage=(60, 30))
    if path == "responses":
        return responses_stream(
            [
                r_reasoning("rs_1", [["Two cities, ", "two calls."]], ENCRYPTED),
                r_message("msg_1", ["Checking."]),
                r_function_call("fc_1", "call_a", "get_weather", paris),
                r_function_call("fc_2", "call_b", "get_weather", rome),
            ],
            usage=(60, 30),
        )
    return anthropic_message(
        [
            a_thinking(["Two cities, ", "two calls."], SIGNATURE),
            a_text("Checking."),
            a_tool_use("call_a", "get_weather", paris),
            a_tool_use("call_b", "get_weather", rome),
        ],
        stop_reason="tool_use",
        input_tokens=60,
        output_tokens=30,
    )


def step_two(path: str) -> list[Any]:
    if path == "chat":
        return chat_deltas([{"content": t} for t in ANSWER], usage=(90, 12))
    if path == "responses":
        return responses_stream([r_message("msg_2", ANSWER)], usage=(90, 12))
    return anthropic_message([a_text(*ANSWER)], input_tokens=90, output_tokens=12)


@asynccontextmanager
async def client_of(server: Server) -> AsyncIterator[RawClient]:
    async with connect(server.url, compression=None) as ws:
        client = RawClient(ws)
        await client.hello()
        yield client


async def generate(client: RawClient, request_id: str, **fields: Any) -> list[dict[str, Any]]:
    await client.send({"type": "generate", "id": request_id, **fields})
    return await client.recv_until(lambda f: f["type"] in ("stream.end", "error"))


def transcript(path: str, steps: list[tuple[dict[str, Any], list[dict[str, Any]], Any]]) -> str:
    lines = [f"===== {path}: a two-step tool conversation ====="]
    for n, (sent, frames, body) in enumerate(steps, 1):
        lines.append(f"--- step {n}: the client sent")
        lines.append(json.dumps(sent, ensure_ascii=False))
        lines.append(f"--- step {n}: the upstream received")
        lines.append(json.dumps(body, ensure_ascii=False))
        lines.append(f"--- step {n}: the frames the client saw")
        lines += [json.dumps(f, ensure_ascii=False) for f in frames]
    return "\n".join(lines)


@pytest.mark.parametrize("path", ["chat", "responses", "anthropic"])
async def test_two_step_tool_conversation(
    upstream: FakeUpstream, make_server: Callable[..., Server], path: str
) -> None:
    # a little time between events, so the frames show the fragments as they came
    upstream.script = [SSE(step_one(path), delay=0.005), SSE(step_two(path), delay=0.005)]
    first = {
        "messages": QUESTION,
        "provider": provider_of(path),
        "model": "m",
        "tools": [WEATHER],
        "tool_choice": "auto",
        "params": {"reasoning": {"effort": "low"}},
    }
    async with make_server(**config(upstream, path)) as server, client_of(server) as client:
        frames1 = await generate(client, "g1", **first)
        end1 = frames1[-1]
        assert end1["type"] == "stream.end" and end1["reason"] == "tool_calls", end1
        message = end1["message"]
        results = [
            {"role": "tool", "tool_call_id": call["id"], "content": RESULTS[call["arguments"]["city"]]}
            for call in message["tool_calls"]
        ]
        second = {**first, "messages": [*QUESTION, message, *results]}
        frames2 = await generate(client, "g2", **second)

    # step 1: the frames
    kinds = [(f["type"], f.get("part")) for f in frames1]
    assert kinds[0] == ("stream.start", None)
    assert ("stream.delta", "reasoning") in kinds
    calls = [f for f in frames1 if f["type"] == "stream.tool_call"]
    assert [(c["call"], c["name"]) for c in calls] == [("call_a", "get_weather"), ("call_b", "get_weather")]
    arguments = {
        c["call"]: "".join(f["text"] for f in frames1 if f.get("part") == "tool_call" and f["call"] == c["call"])
        for c in calls
    }
    assert {k: json.loads(v) for k, v in arguments.items()} == {"call_a": PARIS, "call_b": ROME}
    reasoning = "".join(f["text"] for f in frames1 if f.get("part") == "reasoning")
    assert reasoning == "Two cities, two calls."
    indexes = [f["index"] for f in frames1 if f["type"] in ("stream.delta", "stream.tool_call")]
    assert indexes == list(range(len(indexes)))
    assert end1["usage"] == {"input_tokens": 60, "output_tokens": 30}
    signature = {"chat": None, "responses": f"responses:rs_1:{ENCRYPTED}", "anthropic": SIGNATURE}[path]
    reasoning_part = {"type": "reasoning", "text": "Two cities, two calls."}
    if signature:
        reasoning_part["signature"] = signature
    assert message == {
        "role": "assistant",
        "content": [reasoning_part, {"type": "text", "text": "Checking."}],
        "tool_calls": [
            {"id": "call_a", "name": "get_weather", "arguments": PARIS},
            {"id": "call_b", "name": "get_weather", "arguments": ROME},
        ],
    }

    # step 2: what the upstream received, in the vendor's own shape
    body = upstream.requests[1].body
    if path == "chat":
        assert body["messages"][2:] == [
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": CHAT_CALLS,
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "18°C, sunny"},
            {"role": "tool", "tool_call_id": "call_b", "content": "21°C, clear"},
        ]
    elif path == "responses":
        assert body["input"][2:] == [
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Two cities, two calls."}], "encrypted_content": ENCRYPTED},
            {"role": "assistant", "content": "Checking."},
            *RESPONSES_CALLS,
            {"type": "function_call_output", "call_id": "call_a", "output": "18°C, sunny"},
            {"type": "function_call_output", "call_id": "call_b", "output": "21°C, clear"},
        ]
    else:
        assert body["messages"][1:] == [
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Two cities, two calls.", "signature": SIGNATURE},
                    {"type": "text", "text": "Checking."},
                    *ANTHROPIC_CALLS,
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_a", "content": "18°C, sunny"},
                    {"type": "tool_result", "tool_use_id": "call_b", "content": "21°C, clear"},
                ],
            },
        ]
    # step 2: the answer
    end2 = frames2[-1]
    assert end2["reason"] == "complete"
    assert end2["message"] == {"role": "assistant", "content": "".join(ANSWER)}
    assert "".join(f["text"] for f in frames2 if f["type"] == "stream.delta") == "".join(ANSWER)
    print("\n" + transcript(path, [(first, frames1, upstream.requests[0].body), (second, frames2, body)]))


async def test_arguments_that_are_not_json_end_with_provider_error(
    upstream: FakeUpstream, make_server: Callable[..., Server]
) -> None:
    deltas = [{"content": "Checking."}, *chat_tool_calls([("call_a", "get_weather", ['{"city": ', "Paris"])])]
    upstream.script = [SSE(chat_deltas(deltas, finish="tool_calls"))]
    async with make_server(**config(upstream, "chat")) as server, client_of(server) as client:
        frames = await generate(client, "g", messages=QUESTION, provider="openai", model="m", tools=[WEATHER])
    end = frames[-1]
    assert end["reason"] == "error" and end["error"]["code"] == "provider_error"
    assert "not valid JSON" in end["error"]["message"]
    assert end["message"] == {"role": "assistant", "content": "Checking."}  # the text is kept
    assert "".join(f["text"] for f in frames if f.get("part") == "tool_call") == '{"city": Paris'


@pytest.mark.parametrize("path", ["chat", "responses", "anthropic"])
async def test_an_input_the_api_cannot_take_ends_with_provider_error(
    upstream: FakeUpstream, make_server: Callable[..., Server], path: str
) -> None:
    params = {
        "chat": {"reasoning": {"budget_tokens": 4000}},
        "responses": {"stop": ["END"]},
        "anthropic": {"response_format": {"type": "json_object"}},
    }[path]
    async with make_server(**config(upstream, path)) as server, client_of(server) as client:
        frames = await generate(client, "g", messages=QUESTION, provider=provider_of(path), model="m", params=params)
    assert [f["type"] for f in frames] == ["stream.start", "stream.end"]
    assert frames[-1]["error"]["code"] == "provider_error"
    assert frames[-1]["error"]["message"].startswith(f"{provider_of(path)}: ")
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["chat", "responses", "anthropic"])
async def test_cancel_mid_arguments_closes_the_upstream(
    upstream: FakeUpstream, make_server: Callable[..., Server], path: str
) -> None:
    events = step_one(path)
    cut = next(i for i, (_, data) in enumerate(events) if is_argument_fragment(data)) + 1
    upstream.script = [SSE(events[:cut], hold=10.0)]  # the upstream is still generating the arguments
    async with make_server(**config(upstream, path)) as server, client_of(server) as client:
        await client.send(
            {"type": "generate", "id": "g", "stream": "s", "messages": QUESTION, "provider": provider_of(path), "model": "m", "tools": [WEATHER]}
        )
        await client.recv_until(lambda f: f.get("part") == "tool_call")
        t0 = time.monotonic()
        await client.send({"type": "cancel", "id": "c", "stream": "s"})
        frames = await client.recv_until(lambda f: f["type"] == "stream.end")
        eof_at = await upstream.wait_closed(timeout=5)
    assert eof_at - t0 < CANCEL_CLOSE_BOUND_S
    assert not upstream.requests[0].finished
    end = frames[-1]
    assert end["reason"] == "cancelled"
    assert "tool_calls" not in end["message"]  # a partial call is dropped


def is_argument_fragment(data: Any) -> bool:
    """Does this vendor event carry a non-empty piece of tool-call arguments?"""
    if not isinstance(data, dict):
        return False
    if data.get("type") == "response.function_call_arguments.delta":
        return True
    if data.get("type") == "content_block_delta":
        return data["delta"].get("type") == "input_json_delta" and bool(data["delta"]["partial_json"])
    for choice in data.get("choices", ()):
        for call in choice["delta"].get("tool_calls") or ():
            if call.get("function", {}).get("arguments"):
                return True
    return False


@pytest.mark.both_loops
async def test_python_client_tool_loop_with_anthropic(
    upstream: FakeUpstream, make_server: Callable[..., Server]
) -> None:
    """The loop an agent writes with the Python client: generate with tools,
    run the calls, send ``stream.message`` and the results back."""
    upstream.script = [SSE(step_one("anthropic")), SSE(step_two("anthropic"))]
    async with make_server(**config(upstream, "anthropic")) as server, wsserver.connect(server.url) as client:
        messages: list[dict[str, Any]] = list(QUESTION)
        params = {"reasoning": {"budget_tokens": 2048}}
        first = await client.generate(messages, provider="anthropic", model="m", tools=[WEATHER], params=params)
        kinds = [event.kind async for event in first.events()]
        assert (await first.wait()).reason == "tool_calls"
        assert kinds[0] == "reasoning" and "text" in kinds and kinds.count("tool_call") == 2  # deltas may be merged
        messages.append(first.message)  # type: ignore[arg-type]
        for call in first.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": RESULTS[call.arguments["city"]]})
        second = await client.generate(messages, provider="anthropic", model="m", tools=[WEATHER], params=params)
        answer = "".join([text async for text in second])
    assert answer == "".join(ANSWER)
    thinking = upstream.requests[1].body["messages"][1]["content"][0]
    assert thinking == {"type": "thinking", "thinking": "Two cities, two calls.", "signature": SIGNATURE}
