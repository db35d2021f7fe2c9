"""The ``anthropic`` provider through the real ``anthropic`` SDK against a fake
upstream on 127.0.0.1: Messages streaming, system parameter, stop reasons,
in-band errors, retries, cancel, and end to end through a running wsserver."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import wsserver
from wsserver.wire.errors import StreamFailed
from wsserver.wire.messages import ChatMessage, GenerateParams
from wsserver.providers import (
    AnthropicProvider,
    Finish,
    GenerationRequest,
    TextDelta,
    UsageReport,
)
from wsserver.server import Server

from tests.providers.fake_upstream import (
    cancel_to_eof,
    SSE,
    FakeUpstream,
    Reply,
    anthropic_error,
    anthropic_events,
    collect,
    text_of,
)
from tests.providers.test_openai import CANCEL_CLOSE_BOUND_S

CONVERSATION = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="hi"),
    ChatMessage(role="assistant", content="Hello."),
    ChatMessage(role="system", content="Answer in French."),
    ChatMessage(role="user", content="how are you?"),
]


def request(messages: list[ChatMessage] = CONVERSATION, **params: Any) -> GenerationRequest:
    return GenerationRequest(messages=messages, model="m", params=GenerateParams(**params))


@pytest.fixture
def provider(anthropic_provider: Callable[..., Any]) -> Callable[..., Any]:
    return anthropic_provider


async def test_stream_with_ping_usage_and_system(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(anthropic_events(["Bon", "jour"], input_tokens=12, output_tokens=3, ping=True))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert failure is None
    assert events == [
        UsageReport(input_tokens=12),  # from message_start, before any text
        TextDelta("Bon"),
        TextDelta("jour"),
        UsageReport(output_tokens=3),  # message_delta: cumulative
        Finish("complete"),
    ]
    [rec] = upstream.requests
    assert rec.path == "/v1/messages"
    assert rec.headers["authorization"] == "Bearer test"  # this SDK version sends the key as a bearer token
    assert rec.body["system"] == "Be brief.\n\nAnswer in French."
    assert rec.body["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "how are you?"},
    ]
    assert rec.body["stream"] is True
    assert rec.body["max_tokens"] == 4096  # the default: the API requires one


async def test_params(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(anthropic_events(["a"]))]
    async with provider(default_max_tokens=99) as p:
        await collect(p, request([ChatMessage(role="user", content="x")], max_tokens=5, temperature=0.3, top_p=0.8, stop=["END"]))
    body = upstream.requests[0].body
    assert body["max_tokens"] == 5
    assert "temperature" not in body and "top_p" not in body  # not in this SDK's Messages API
    assert body["stop_sequences"] == ["END"]
    assert "system" not in body


async def test_default_max_tokens_is_configurable(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(anthropic_events(["a"]))]
    async with provider(default_max_tokens=99) as p:
        await collect(p, request())
    assert upstream.requests[0].body["max_tokens"] == 99


@pytest.mark.parametrize(
    ("stop_reason", "reason"),
    [
        ("end_turn", "complete"),
        ("stop_sequence", "complete"),
        ("max_tokens", "length"),
        ("refusal", "complete"),
        ("tool_use", "complete"),
    ],
)
async def test_stop_reason_mapping(upstream: FakeUpstream, provider: Any, stop_reason: str, reason: str) -> None:
    upstream.script = [SSE(anthropic_events(["a"], stop_reason=stop_reason))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert failure is None and events[-1] == Finish(reason)  # type: ignore[arg-type]


async def test_only_system_messages_fail_without_a_request(upstream: FakeUpstream, provider: Any) -> None:
    async with provider() as p:
        _, failure = await collect(p, request([ChatMessage(role="system", content="x")]))
    assert failure is not None and failure.code == "provider_error"
    assert upstream.requests == []


async def test_error_event_mid_stream(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [
        SSE([*anthropic_events(["par", "tial"], stop=False), anthropic_error("overloaded_error")]),
        SSE(anthropic_events(["again"])),
    ]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert text_of(events) == "partial"
    assert events[0] == UsageReport(input_tokens=7)  # known before the failure
    assert failure is not None and failure.code == "provider_error"
    assert failure.message == "anthropic: upstream error (overloaded_error)"
    assert len(upstream.requests) == 1  # text was sent: not retried


async def test_error_event_before_first_token_is_retried(upstream: FakeUpstream, provider: Any) -> None:
    start = anthropic_events([])[0]
    upstream.script = [SSE([start, anthropic_error("overloaded_error")]), SSE(anthropic_events(["ok"]))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert failure is None and text_of(events) == "ok"
    assert len(upstream.requests) == 2


async def test_529_is_retried_then_fails(upstream: FakeUpstream, provider: Any) -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    upstream.script = [Reply(529, overloaded), Reply(529, overloaded), Reply(529, overloaded)]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert events == []
    assert failure is not None and failure.message == "anthropic: overloaded (529) after 3 attempts"
    assert len(upstream.requests) == 3


async def test_429_retry_after_then_success(upstream: FakeUpstream, provider: Any) -> None:
    limited = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    upstream.script = [Reply(429, limited, {"retry-after": "0.2"}), SSE(anthropic_events(["Hi"]))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert failure is None and text_of(events) == "Hi"
    first, second = upstream.requests
    assert second.at - first.at >= 0.18


async def test_401_is_not_retried(upstream: FakeUpstream, provider: Any) -> None:
    bad_key = {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
    upstream.script = [Reply(401, bad_key), SSE(anthropic_events(["never"]))]
    async with provider() as p:
        _, failure = await collect(p, request())
    assert failure is not None and failure.code == "provider_error"
    assert failure.message == "anthropic: authentication failed (401)"
    assert len(upstream.requests) == 1


async def test_reset_mid_stream(upstream: FakeUpstream, provider: Any) -> None:
    # message_start, content_block_start, ping, "p", "q": reset after 5 events
    upstream.script = [SSE(anthropic_events(["p", "q", "r"]), abort_after=5), SSE(anthropic_events(["again"]))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert text_of(events) == "pq"
    assert failure is not None and failure.message == "anthropic: the upstream connection was lost mid-stream"
    assert len(upstream.requests) == 1


async def test_stream_cut_without_stop_reason(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(anthropic_events(["cut"], stop=False))]  # body ends cleanly, no message_delta
    async with provider() as p:
        events, failure = await collect(p, request())
    assert text_of(events) == "cut"
    assert failure is not None and failure.code == "provider_error"


async def test_cancel_closes_upstream(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(anthropic_events(["first"], stop=False), hold=10.0)]
    async with provider() as p:
        latency = await cancel_to_eof(upstream, p, request())
    print(f"anthropic: cancel -> upstream EOF: {latency * 1000:.2f} ms")
    assert latency < CANCEL_CLOSE_BOUND_S


# ------------------------------------------------------------ end to end


async def test_end_to_end_error_event(upstream: FakeUpstream, make_server: Callable[..., Server]) -> None:
    upstream.script = [
        SSE([*anthropic_events(["par", "tial"], input_tokens=11, stop=False), anthropic_error("overloaded_error")], delay=0.01)
    ]
    config = {"anthropic_base_url": upstream.url, "anthropic_api_key": "test", "provider_backoff": 0.01}
    async with make_server(**config) as server, asyncio.timeout(10):
        async with wsserver.connect(server.url) as client:
            stream = await client.generate(
                [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                provider="anthropic",
                model="claude-test",
            )
            parts: list[str] = []
            with pytest.raises(StreamFailed) as info:
                async for text in stream:
                    parts.append(text)
    assert "".join(parts) == "partial"
    assert info.value.code == "provider_error"
    result = stream.result
    assert result is not None and result.reason == "error"
    assert result.error_message == "anthropic: upstream error (overloaded_error)"
    assert result.usage.input_tokens == 11  # from message_start, before the failure
    assert upstream.requests[0].body["system"] == "S"
    assert upstream.requests[0].body["model"] == "claude-test"


async def test_end_to_end_complete(upstream: FakeUpstream, make_server: Callable[..., Server]) -> None:
    upstream.script = [SSE(anthropic_events(["Hi", "!"], input_tokens=4, output_tokens=2, stop_reason="max_tokens"))]
    config = {"anthropic_base_url": upstream.url, "anthropic_api_key": "test", "provider": "anthropic"}
    async with make_server(**config) as server, asyncio.timeout(10):
        async with wsserver.connect(server.url) as client:
            stream = await client.generate([{"role": "user", "content": "hi"}], params={"max_tokens": 2})
            result = await stream.wait()
    assert stream.provider == "anthropic" and stream.model == "claude-haiku-4-5"
    assert result.text == "Hi!" and result.reason == "length"
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.estimated) == (4, 2, False)
    assert upstream.requests[0].body["max_tokens"] == 2
