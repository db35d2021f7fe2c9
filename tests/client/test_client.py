"""The Python client (``wsserver.connect``) against an in-process server."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

import wsserver
from wsserver.client import Client, ClientStream, StreamResult
from wsserver.wire.errors import ConnectionLost, ServerError
from wsserver.wire.messages import ChatMessage
from wsserver.providers import simulated_reply
from wsserver.server import Server

from tests.helpers import USER_HI


def reply_text(messages: list[dict[str, str]], reply_tokens: int | None = None) -> str:
    return "".join(simulated_reply([ChatMessage(**m) for m in messages], reply_tokens))


async def test_issue_example(server: Server) -> None:
    async with asyncio.timeout(10):
        async with wsserver.connect(server.url) as c:
            assert isinstance(c, Client)
            assert c.session and c.welcome["protocol"] == 1
            stream = await c.generate([{"role": "user", "content": "hi"}])
            assert isinstance(stream, ClientStream)
            assert stream.id is not None
            assert stream.provider == "simulated" and stream.model == "sim-1"
            pieces = [text async for text in stream]
    result = stream.result
    assert isinstance(result, StreamResult)
    assert result.reason == "complete"
    assert isinstance(result.usage.input_tokens, int) and result.usage.input_tokens > 0
    assert isinstance(result.usage.output_tokens, int)
    assert result.usage.output_tokens == len(simulated_reply([ChatMessage(**USER_HI[0])]))
    assert "".join(pieces) == reply_text(USER_HI) == result.text == stream.text
    assert result.ttft_ms is not None and result.duration_ms >= 0
    assert result.error_code is None


async def test_await_connect_and_wait(server: Server) -> None:
    async with asyncio.timeout(10):
        c = await wsserver.connect(server.url)
        try:
            stream = await c.generate(USER_HI, params={"reply_tokens": 20, "max_tokens": 8})
            result = await stream.wait()
            assert result.reason == "length"
            assert result.usage.output_tokens == 8
            assert result.text == reply_text(USER_HI, 8)
            # iterating a finished stream ends at once
            assert [t async for t in stream] == []
        finally:
            await c.close()


async def test_cancel_mid_stream(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        stream = await c.generate(USER_HI, params={"tokens_per_s": 200, "reply_tokens": 1000})
        got = []
        async for text in stream:
            got.append(text)
            if len(got) >= 3:
                break
        await stream.cancel()
        assert stream.result is not None
        assert stream.result.reason == "cancelled"
        # the rest of the iteration ends normally, without the remaining tokens
        async for text in stream:
            got.append(text)
        delivered = stream.result.usage.output_tokens
        assert 3 <= delivered < 1000
        assert "".join(got) == stream.result.text
        assert stream.result.text == "".join(simulated_reply([ChatMessage(**USER_HI[0])], 1000)[:delivered])
        # cancelling again is a no-op
        await stream.cancel()
        assert stream.result.reason == "cancelled"
        assert await c.ping() >= 0  # the connection is fine


async def test_cancel_finished_stream_is_noop(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        stream = await c.generate(USER_HI, params={"reply_tokens": 5})
        result = await stream.wait()
        assert result.reason == "complete"
        seq = c.last_seq
        await stream.cancel()
        assert stream.result is result
        assert c.last_seq == seq  # nothing was sent, nothing came back
        assert c.unsolicited_errors == []


async def test_cancel_stream_that_ended_meanwhile(server: Server) -> None:
    """The server ends the stream while the client's cancel is in flight: no error."""
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        stream = await c.generate(USER_HI, params={"reply_tokens": 3})
        # The stream finishes almost at once; cancel before the client reads the end.
        await stream.cancel()
        await stream.wait()
        assert stream.result is not None
        assert stream.result.reason in ("complete", "cancelled")


async def test_cancel_answered_unknown_stream_is_not_an_error(server: Server) -> None:
    """Deterministic version of the race above: the server has ended the
    stream, the client has not seen its end yet; the cancel's unknown_stream
    is swallowed, any other error is raised."""
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        stream = await c.generate(USER_HI, params={"reply_tokens": 3})
        result = await stream.wait()
        stream.result = None  # as if stream.end were still on its way
        await stream.cancel()
        stream.result = result
        assert c.unsolicited_errors == []


async def test_unknown_provider_raises_server_error(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        with pytest.raises(ServerError) as info:
            await c.generate(USER_HI, provider="nope")
        assert info.value.code == "provider_unavailable"
        assert info.value.ref is not None
        assert "nope" in info.value.message
        # still usable
        stream = await c.generate(USER_HI, params={"reply_tokens": 4})
        assert (await stream.wait()).text == reply_text(USER_HI, 4)


async def test_too_many_streams_raises_server_error(make_server: Any) -> None:
    async with make_server(max_streams=1) as srv:
        async with asyncio.timeout(10), wsserver.connect(srv.url) as c:
            assert c.welcome["limits"]["max_streams"] == 1
            first = await c.generate(USER_HI, params={"tokens_per_s": 50, "reply_tokens": 1000})
            with pytest.raises(ServerError) as info:
                await c.generate(USER_HI, params={"reply_tokens": 3})
            assert info.value.code == "too_many_streams"
            await first.cancel()
            assert first.result is not None and first.result.reason == "cancelled"
            second = await c.generate(USER_HI, params={"reply_tokens": 3})
            assert (await second.wait()).reason == "complete"


async def test_stream_exists_raises_server_error(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        s = await c.generate(USER_HI, stream="named", params={"reply_tokens": 3})
        assert s.id == "named"
        await s.wait()
        with pytest.raises(ServerError) as info:
            await c.generate(USER_HI, stream="named")
        assert info.value.code == "stream_exists"
        assert info.value.stream == "named"


async def test_ping_returns_float(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        rtt = await c.ping()
        assert isinstance(rtt, float)
        assert 0 <= rtt < 5
        assert c.last_seq == 0  # pong carries no seq


async def test_last_seq(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        assert c.last_seq == 0
        stream = await c.generate(USER_HI, params={"reply_tokens": 30})
        assert c.last_seq >= 1
        await stream.wait()
        after_stream = c.last_seq
        assert after_stream >= 3  # start, at least one delta, end
        # the next session-bound frame has the next seq, and last_seq follows it
        ok = await c.request({"type": "ack", "seq": after_stream})
        assert ok["type"] == "ok"
        assert ok["seq"] == after_stream + 1
        assert c.last_seq == ok["seq"]
        with pytest.raises(ServerError) as info:
            await c.request({"type": "cancel", "stream": "ghost"})
        assert info.value.code == "unknown_stream"
        assert c.last_seq == after_stream + 2


async def test_two_concurrent_streams(server: Server) -> None:
    msgs_a = [{"role": "user", "content": "first"}]
    msgs_b = [{"role": "user", "content": "second"}]
    async with asyncio.timeout(15), wsserver.connect(server.url) as c:

        async def run(msgs: list[dict[str, str]]) -> tuple[str, StreamResult]:
            stream = await c.generate(msgs, params={"reply_tokens": 300})
            text = "".join([t async for t in stream])
            assert stream.result is not None
            return text, stream.result

        (text_a, res_a), (text_b, res_b) = await asyncio.gather(run(msgs_a), run(msgs_b))
    assert text_a == reply_text(msgs_a, 300)
    assert text_b == reply_text(msgs_b, 300)
    assert res_a.reason == res_b.reason == "complete"
    assert res_a.usage.output_tokens == res_b.usage.output_tokens == 300


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


async def test_connect_to_closed_port_raises_oserror() -> None:
    port = _closed_port()
    with pytest.raises(OSError):
        async with asyncio.timeout(5):
            async with wsserver.connect(f"ws://127.0.0.1:{port}/"):
                pass


async def test_unsupported_protocol_on_connect(server: Server) -> None:
    with pytest.raises(ServerError) as info:
        async with asyncio.timeout(5):
            await wsserver.connect(server.url, hello={"protocol": 2})
    assert info.value.code == "unsupported_protocol"
    assert info.value.details.get("supported") == [1]


async def test_server_shutdown_while_streaming(make_server: Any) -> None:
    srv = make_server()
    await srv.start()
    try:
        async with asyncio.timeout(10), wsserver.connect(srv.url, reconnect=False) as c:
            stream = await c.generate(USER_HI, params={"tokens_per_s": 100, "reply_tokens": 1000})
            got = 0
            closing: asyncio.Future[None] | None = None
            with pytest.raises(ConnectionLost) as info:
                async for _ in stream:
                    got += 1
                    if got == 3:
                        closing = asyncio.ensure_future(srv.close())
            assert closing is not None and got >= 3
            await closing
            assert info.value.code == 1001
            assert stream.result is None
            # requests on the dead connection fail the same way
            with pytest.raises(ConnectionLost):
                await c.ping()
    finally:
        await srv.close()


async def test_close_while_iterating_raises_connection_lost(server: Server) -> None:
    async with asyncio.timeout(10):
        c = await wsserver.connect(server.url)
        stream = await c.generate(USER_HI, params={"tokens_per_s": 100, "reply_tokens": 1000})
        await stream.__anext__()
        await c.close()
        with pytest.raises(ConnectionLost):
            async for _ in stream:
                pass
    async with asyncio.timeout(1):
        while server.connections:
            await asyncio.sleep(0.01)


async def test_unsolicited_errors(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        await c.send_raw("{not json")
        await c.ping()  # the error was sent before the pong
        await c.ping()
        assert [e.code for e in c.unsolicited_errors] == ["bad_json"]


async def test_reasoning_and_a_tool_round_trip(server: Server) -> None:
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    ask = [{"role": "user", "content": "get_weather in Oslo"}]
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        stream = await c.generate(ask, tools=[weather], tool_choice="auto", params={"reasoning": {"effort": "minimal"}})
        events = [event async for event in stream.events()]
        texts = [text async for text in stream]  # the text iterator sees the text only
        kinds = [e.kind for e in events]
        assert [k for i, k in enumerate(kinds) if k != kinds[i - 1] or i == 0] == ["reasoning", "text", "tool_call", "tool_call_delta"]
        opened = next(e for e in events if e.kind == "tool_call")
        fragments = [e.text for e in events if e.kind == "tool_call_delta"]
        assert opened.name == "get_weather" and fragments
        assert "".join(texts) == stream.text == "Calling get_weather."
        assert stream.result is not None and stream.result.reason == "tool_calls"
        (call,) = stream.tool_calls
        assert (call.id, call.name, call.arguments) == (opened.call, "get_weather", {"city": "Oslo"})
        assert stream.calls[call.id].arguments == "".join(fragments)
        assert stream.reasoning == stream.result.reasoning and stream.message["content"][0]["signature"]
        # the second step: the message as it goes back, and the tool's result
        result = {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}
        second = await c.generate([*ask, stream.message, result], tools=[weather])
        answer = await second.wait()
        assert answer.reason == "complete" and answer.text.startswith('get_weather returned "sunny, 21 C".')
        assert second.tool_calls == [] and answer.message == {"role": "assistant", "content": answer.text}
        events_again = [e async for e in stream.events()]  # each events() starts afresh
        assert events_again == events


async def test_bad_tools_are_refused_with_their_code(server: Server) -> None:
    async with asyncio.timeout(10), wsserver.connect(server.url) as c:
        with pytest.raises(ServerError) as exc:
            await c.generate(USER_HI, tools=[{"name": "f"}, {"name": "f"}])
        assert exc.value.code == "duplicate_tool"
