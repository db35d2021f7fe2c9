"""The ``openai`` provider through the real ``openai`` SDK against a fake upstream
on 127.0.0.1: Chat Completions and Responses streaming, retries, errors,
cancel closing the upstream, and end to end through a running wsserver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

import wsserver
from wsserver.wire.errors import StreamFailed
from wsserver.wire.messages import ChatMessage, GenerateParams
from wsserver.providers import (
    Finish,
    GenerationRequest,
    OpenAIProvider,
    RetryPolicy,
    TextDelta,
    UsageReport,
)
from wsserver.server import Server

from tests.providers.fake_upstream import cancel_to_eof, SSE, Drop, FakeUpstream, Reply, chat_events, collect, responses_events, text_of

#: Cancel → upstream EOF bound. Typical on this box: 0.3-0.7 ms.
CANCEL_CLOSE_BOUND_S = 0.1

CONVERSATION = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="hi"),
]


def request(**params: Any) -> GenerationRequest:
    return GenerationRequest(messages=CONVERSATION, model="m", params=GenerateParams(**params))


@pytest.fixture
def provider(openai_provider: Callable[..., Any]) -> Callable[..., Any]:
    return openai_provider


# ------------------------------------------------------------ chat streaming


async def test_chat_stream_text_usage_and_finish(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(chat_events(["Hel", "lo", " there"], usage=(5, 6)))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert failure is None
    # role-only first chunk yields nothing; the usage-only last chunk (choices: []) is usage
    assert events == [
        TextDelta("Hel"),
        TextDelta("lo"),
        TextDelta(" there"),
        UsageReport(input_tokens=5, output_tokens=6),
        Finish("complete"),
    ]
    [rec] = upstream.requests
    assert rec.method == "POST" and rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == "Bearer test"
    assert rec.body["model"] == "m"
    assert rec.body["stream"] is True
    assert rec.body["stream_options"] == {"include_usage": True}
    assert rec.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert rec.finished  # [DONE] and the end of the body were sent


@pytest.mark.parametrize(
    ("finish", "reason"),
    [("stop", "complete"), ("length", "length"), ("content_filter", "complete"), ("tool_calls", "complete")],
)
async def test_finish_reason_mapping(upstream: FakeUpstream, provider: Any, finish: str, reason: str) -> None:
    upstream.script = [SSE(chat_events(["a"], finish=finish))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert failure is None
    assert events[-1] == Finish(reason)  # type: ignore[arg-type]


async def test_params_are_passed(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(chat_events(["a"]))]
    async with provider() as p:
        await collect(p, request(max_tokens=7, temperature=0.5, top_p=0.9, stop=["\n\n"]))
    body = upstream.requests[0].body
    # a custom base URL gets the widely supported max_tokens
    assert body["max_tokens"] == 7 and "max_completion_tokens" not in body
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["stop"] == ["\n\n"]


async def test_official_endpoint_uses_max_completion_tokens() -> None:
    p = OpenAIProvider(api_key="test")  # no request is made
    try:
        assert p.base_url == "https://api.openai.com/v1"
        assert p.max_tokens_param == "max_completion_tokens"
    finally:
        await p.aclose()


async def test_stream_without_finish_reason_is_an_error(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(chat_events(["cut"], finish=None, usage=None, done=False))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert text_of(events) == "cut"
    assert failure is not None and failure.code == "provider_error"
    assert len(upstream.requests) == 1  # text was sent: never retried


async def test_error_payload_mid_stream(upstream: FakeUpstream, provider: Any) -> None:
    events_ = chat_events(["a"], finish=None, usage=None, done=False)
    events_.append((None, {"error": {"message": "boom", "type": "server_error"}}))
    upstream.script = [SSE(events_)]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert text_of(events) == "a"
    assert failure is not None and failure.code == "provider_error"
    assert failure.message == "openai: upstream error (server_error)"


# ---------------------------------------------------------------- retries


async def test_429_retry_after_then_success(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [
        Reply(429, {"error": {"message": "Rate limit reached for org-abcdef123"}}, {"retry-after": "0.3"}),
        SSE(chat_events(["Hel", "lo"])),
    ]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert failure is None
    assert text_of(events) == "Hello"  # once: the retry happened before any text
    assert [type(e) for e in events].count(TextDelta) == 2
    first, second = upstream.requests
    assert 0.28 <= second.at - first.at < 2.0  # retry-after honoured
    assert second.body == first.body


async def test_retry_after_is_capped(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [Reply(429, {"error": {"message": "slow down"}}, {"retry-after": "30"}), SSE(chat_events(["ok"]))]
    async with provider(retry=RetryPolicy(retries=2, backoff_s=0.01, max_delay_s=0.2)) as p:
        events, failure = await collect(p, request())
    assert failure is None and text_of(events) == "ok"
    first, second = upstream.requests
    assert 0.18 <= second.at - first.at < 1.5


async def test_500_is_retried_then_fails(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [Reply(500), Reply(502), Reply(500), SSE(chat_events(["never"]))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert events == []
    assert failure is not None and failure.code == "provider_error"
    assert failure.message == "openai: upstream server error (500) after 3 attempts"
    assert len(upstream.requests) == 3  # 1 + 2 retries; the 4th answer was never asked for


async def test_backoff_grows(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [Reply(503), Reply(503), SSE(chat_events(["ok"]))]
    async with provider(retry=RetryPolicy(retries=2, backoff_s=0.1, max_delay_s=5)) as p:
        events, failure = await collect(p, request())
    assert failure is None and text_of(events) == "ok"
    a, b, c = (r.at for r in upstream.requests)
    assert b - a >= 0.07 and c - b >= 0.14  # 0.1 then 0.2, jitter ≥ 75 %


async def test_401_is_not_retried(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [
        Reply(401, {"error": {"message": "Incorrect API key provided: sk-proj-abc***xyz", "type": "invalid_request_error"}}),
        SSE(chat_events(["never"])),
    ]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert events == []
    assert failure is not None and failure.code == "provider_error"
    assert failure.message == "openai: authentication failed (401)"  # no upstream text, no key
    assert len(upstream.requests) == 1


async def test_404_bad_model_shows_safe_detail(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [
        Reply(404, {"error": {"message": "The model `m` does not exist (key sk-abcdef123456)", "code": "model_not_found"}})
    ]
    async with provider() as p:
        _, failure = await collect(p, request())
    assert failure is not None
    assert failure.message == "openai: not found (404): The model `m` does not exist (key ***)"
    assert len(upstream.requests) == 1


async def test_connection_error_before_first_token_is_retried(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [Drop(), SSE(chat_events(["ok"]))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert failure is None and text_of(events) == "ok"
    assert len(upstream.requests) == 2


async def test_connection_refused_fails_safely() -> None:
    with refusing_port() as port:
        p = OpenAIProvider(api_key="test", base_url=f"http://127.0.0.1:{port}/v1", retry=RetryPolicy(1, 0.01, 0.1))
        try:
            events, failure = await collect(p, request())
        finally:
            await p.aclose()
    assert events == []
    assert failure is not None and failure.code == "provider_error"
    assert failure.message == "openai: could not reach the upstream after 2 attempts"


async def test_reset_mid_stream_is_not_retried(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(chat_events(["p", "q", "r"]), abort_after=3), SSE(chat_events(["again"]))]
    async with provider() as p:
        events, failure = await collect(p, request())
    assert text_of(events) == "pq"  # role chunk + 2 text chunks were sent, each delivered once
    assert failure is not None and failure.code == "provider_error"
    assert failure.message == "openai: the upstream connection was lost mid-stream"
    assert len(upstream.requests) == 1


async def test_silent_upstream_times_out(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE([], hold=5.0), SSE(chat_events(["never"]))]
    async with provider(timeout=0.3) as p:
        t0 = time.monotonic()
        events, failure = await collect(p, request())
    assert events == []
    assert failure is not None and failure.code == "provider_timeout"
    assert failure.message == "openai: the upstream did not answer in time"
    assert 0.25 <= time.monotonic() - t0 < 3
    assert len(upstream.requests) == 1  # a read timeout is not retried
    await upstream.wait_closed(0)  # and the response was closed


# ------------------------------------------------------------ cancel


async def test_cancel_closes_upstream(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(chat_events(["first"], finish=None, usage=None, done=False), hold=10.0)]
    async with provider() as p:
        latency = await cancel_to_eof(upstream, p, request())
    print(f"cancel -> upstream EOF: {latency * 1000:.2f} ms")
    assert latency < CANCEL_CLOSE_BOUND_S
    assert not upstream.requests[0].finished


# ------------------------------------------------------------ responses API


async def test_responses_api(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(responses_events(["Hi", " you"], usage=(9, 4)))]
    async with provider(api="responses") as p:
        events, failure = await collect(p, request(max_tokens=50, temperature=0.2))
    assert failure is None
    assert events == [TextDelta("Hi"), TextDelta(" you"), UsageReport(9, 4), Finish("complete")]
    [rec] = upstream.requests
    assert rec.path == "/v1/responses"
    assert rec.body["input"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert rec.body["stream"] is True and rec.body["store"] is False
    assert rec.body["max_output_tokens"] == 50 and rec.body["temperature"] == 0.2


async def test_responses_incomplete_is_length(upstream: FakeUpstream, provider: Any) -> None:
    upstream.script = [SSE(responses_events(["a"], incomplete="max_output_tokens"))]
    async with provider(api="responses") as p:
        events, failure = await collect(p, request(max_tokens=1))
    assert failure is None and events[-1] == Finish("length")


async def test_responses_failed_event(upstream: FakeUpstream, provider: Any) -> None:
    failed = {
        "type": "response.failed",
        "sequence_number": 2,
        "response": {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "model": "m",
            "status": "failed",
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": {"code": "invalid_prompt", "message": "nope"},
        },
    }
    upstream.script = [SSE([*responses_events(["x"])[:2], (None, failed)])]
    async with provider(api="responses") as p:
        events, failure = await collect(p, request())
    assert text_of(events) == "x"
    assert failure is not None and failure.message == "openai: upstream error (invalid_prompt)"


# ------------------------------------------------------------ end to end


def e2e_config(up: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "openai_base_url": up.url + "/v1",
        "openai_api_key": "test",
        "provider_backoff": 0.01,
        "provider_retry_max": 0.5,
        **extra,
    }


@pytest.mark.both_loops
async def test_end_to_end(upstream: FakeUpstream, make_server: Callable[..., Server]) -> None:
    upstream.script = [Reply(429, {"error": {"message": "busy"}}, {"retry-after": "0.05"}), SSE(chat_events(["Hel", "lo"], usage=(5, 6)))]
    async with make_server(**e2e_config(upstream)) as server, asyncio.timeout(10):
        async with wsserver.connect(server.url) as client:
            stream = await client.generate([{"role": "user", "content": "hi"}], provider="openai", model="m")
            assert stream.provider == "openai" and stream.model == "m"
            parts = [text async for text in stream]
    assert parts and "".join(parts) == "Hello"
    result = stream.result
    assert result is not None
    assert result.reason == "complete"
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.estimated) == (5, 6, False)
    assert result.ttft_ms is not None and result.ttft_ms > 0
    assert len(upstream.requests) == 2


async def test_end_to_end_default_provider_and_model(upstream: FakeUpstream, make_server: Callable[..., Server]) -> None:
    upstream.script = [SSE(chat_events(["ok"]))]
    async with make_server(**e2e_config(upstream, provider="openai", model="local-llama")) as server, asyncio.timeout(10):
        async with wsserver.connect(server.url) as client:
            stream = await client.generate([{"role": "user", "content": "hi"}])
            await stream.wait()
    assert stream.provider == "openai" and stream.model == "local-llama"
    assert upstream.requests[0].body["model"] == "local-llama"


@pytest.mark.both_loops
async def test_end_to_end_cancel_closes_upstream(upstream: FakeUpstream, make_server: Callable[..., Server]) -> None:
    upstream.script = [SSE(chat_events(["first"], finish=None, usage=None, done=False), hold=10.0)]
    async with make_server(**e2e_config(upstream)) as server, asyncio.timeout(10):
        async with wsserver.connect(server.url) as client:
            stream = await client.generate([{"role": "user", "content": "hi"}], provider="openai", model="m")
            async for text in stream:
                assert text == "first"
                break
            t0 = time.monotonic()
            await stream.cancel()
            eof_at = await upstream.wait_closed(timeout=5)
            result = await stream.wait()
    latency = eof_at - t0
    print(f"end to end: cancel -> upstream EOF: {latency * 1000:.2f} ms")
    assert latency < CANCEL_CLOSE_BOUND_S
    assert result.reason == "cancelled"
    assert result.text == "first"


async def test_end_to_end_reset_mid_stream(upstream: FakeUpstream, make_server: Callable[..., Server]) -> None:
    upstream.script = [SSE(chat_events(["p", "q", "r"]), abort_after=3), SSE(chat_events(["again"]))]
    async with make_server(**e2e_config(upstream)) as server, asyncio.timeout(10):
        async with wsserver.connect(server.url) as client:
            stream = await client.generate([{"role": "user", "content": "hi"}], provider="openai", model="m")
            parts: list[str] = []
            with pytest.raises(StreamFailed) as info:
                async for text in stream:
                    parts.append(text)
    assert "".join(parts) == "pq"
    assert info.value.code == "provider_error"
    result = stream.result
    assert result is not None and result.reason == "error"
    assert result.error_message == "openai: the upstream connection was lost mid-stream"
    assert result.text == "pq"
    assert result.usage.estimated  # OpenAI reports usage only at the end
    assert len(upstream.requests) == 1


# ------------------------------------------------------------ helpers


class refusing_port:
    """A port on 127.0.0.1 that refuses connections (bound, not listening)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def test_end_to_end_steering_carries_the_partial_answer(upstream: FakeUpstream, make_server: Callable[..., Server]) -> None:
    """interrupt closes the first upstream request and the successor request
    carries the conversation, the partial assistant text and the new words."""
    upstream.script = [
        SSE(chat_events(["Once", " upon"], finish=None, usage=None, done=False), hold=10.0),
        SSE(chat_events(["Cats", "!"], usage=(9, 2))),
    ]
    async with make_server(**e2e_config(upstream)) as server, asyncio.timeout(10):
        async with wsserver.connect(server.url) as client:
            story = await client.generate([{"role": "user", "content": "a story"}], provider="openai", model="m")
            seen = ""
            async for text in story:
                seen += text
                if seen == "Once upon":
                    break
            cats = await story.interrupt("about cats")
            assert cats is not None and cats.steered_from == story.id and cats.provider == "openai"
            result = await cats.wait()
            first = await story.wait()
            await upstream.wait_closed(index=0, timeout=5)
    assert first.reason == "interrupted" and first.text == "Once upon"
    assert result.reason == "complete" and result.text == "Cats!"
    successor = upstream.requests[1].body
    assert successor["model"] == "m"
    assert successor["messages"] == [
        {"role": "user", "content": "a story"},
        {"role": "assistant", "content": "Once upon"},
        {"role": "user", "content": "about cats"},
    ]
