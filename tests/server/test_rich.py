"""Rich generations end to end on 127.0.0.1: reasoning, tool calls, a two-step tool
conversation, resume and snapshot mid-arguments, interrupt during a call, images."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.helpers import TEST_CONFIG, RawClient
from wsserver.cluster.backplane import AdoptedSession
from wsserver.config import ServerConfig
from wsserver.providers import (
    Finish,
    GenerationRequest,
    Provider,
    Providers,
    ReasoningDelta,
    ReasoningDone,
    SimulatedProvider,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
)
from wsserver.providers.base import ProviderEvent
from wsserver.cluster.redis_util import decode_request, encode_request
from wsserver.server import Server
from wsserver.wire.messages import ChatMessage

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}
ASK = [{"role": "user", "content": "get_weather Oslo and get_time CET"}]


@asynccontextmanager
async def raw(server: Server) -> AsyncIterator[RawClient]:
    async with connect(server.url, compression=None, max_size=None) as ws:
        yield RawClient(ws)


def generate(messages: list[dict[str, Any]], rate: float = 0, **fields: Any) -> dict[str, Any]:
    return {
        "type": "generate",
        "messages": messages,
        "tools": [WEATHER, TIME],
        "params": {"reasoning": {"effort": "low"}, "tokens_per_s": rate, "ttft_ms": 0, **fields.pop("params", {})},
        **fields,
    }


def rebuild(frames: list[dict[str, Any]], stream: str) -> dict[str, Any]:
    """What a client knows of a stream from its frames (a snapshot resets it)."""
    seen: dict[str, Any] = {"text": "", "reasoning": "", "calls": {}, "indexes": []}
    for f in frames:
        if f.get("stream") != stream:
            continue
        if f["type"] == "stream.snapshot":
            seen["text"], seen["reasoning"] = f["text"], f.get("reasoning", "")
            seen["calls"] = {c["call"]: [c["name"], c["arguments"]] for c in f.get("calls", ())}
            seen["indexes"] = list(range(f["index"]))
        elif f["type"] == "stream.tool_call":
            seen["calls"][f["call"]] = [f["name"], ""]
            seen["indexes"].append(f["index"])
        elif f["type"] == "stream.delta":
            seen["indexes"].append(f["index"])
            if f.get("part") == "reasoning":
                seen["reasoning"] += f["text"]
            elif f.get("part") == "tool_call":
                seen["calls"][f["call"]][1] += f["text"]
            else:
                seen["text"] += f["text"]
    return seen


def agrees_with_end(seen: dict[str, Any], end: dict[str, Any]) -> None:
    """The frames and stream.end.message tell the same answer, every index once."""
    message = end["message"]
    content = message["content"]
    parts = [content] if isinstance(content, str) else content
    text = "".join(p if isinstance(p, str) else p["text"] for p in parts if isinstance(p, str) or p["type"] == "text")
    reasoning = "".join(p["text"] for p in parts if not isinstance(p, str) and p["type"] == "reasoning")
    assert (seen["text"], seen["reasoning"]) == (text, reasoning)
    calls = {c["id"]: [c["name"], c["arguments"]] for c in message.get("tool_calls", ())}
    assert {k: [n, orjson.loads(a)] for k, (n, a) in seen["calls"].items()} == calls
    assert seen["indexes"] == list(range(len(seen["indexes"])))


async def test_a_two_step_tool_conversation(server: Server) -> None:
    async with raw(server) as c:
        await c.hello()
        await c.send(generate(ASK, id="g1"))
        step1 = await c.recv_until(lambda f: f["type"] == "stream.end")
        assert [f["type"] for f in step1[:2]] == ["stream.start", "stream.delta"]
        assert step1[1]["part"] == "reasoning"
        end1 = step1[-1]
        assert end1["reason"] == "tool_calls"
        kinds = [f.get("part", "text") if f["type"] == "stream.delta" else f["type"] for f in step1[1:-1]]
        assert kinds.index("stream.tool_call") > kinds.index("text") > kinds.index("reasoning")
        agrees_with_end(rebuild(step1, "s1"), end1)
        message = end1["message"]
        assert message["content"][0]["signature"].startswith("sim-")
        calls = message["tool_calls"]
        assert [(call["name"], call["arguments"]) for call in calls] == [
            ("get_weather", {"city": "Oslo"}),
            ("get_time", {"zone": "CET"}),
        ]
        # the client runs the tools and continues the conversation with their results
        results = [
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temp_c": 4}'},
            {"role": "tool", "tool_call_id": calls[1]["id"], "content": "13:05"},
        ]
        await c.send(generate([*ASK, message, *results], id="g2"))
        step2 = await c.recv_until(lambda f: f["type"] == "stream.end")
        end2 = step2[-1]
        assert end2["reason"] == "complete" and "tool_calls" not in end2["message"]
        assert rebuild(step2, "s2")["text"].startswith('get_weather returned "{"temp_c": 4}". get_time returned "13:05".')
        ChatMessage.model_validate(end2["message"])


@pytest.mark.parametrize("after", [-12, -1, 0, 1, 2, 4, 5, 7])
async def test_a_drop_mid_arguments_loses_and_doubles_nothing(server: Server, after: int) -> None:
    """The client has processed the frames up to ``after`` frames past the
    first stream.tool_call (before it, when negative) when the network goes."""
    async with raw(server) as a:
        welcome = await a.hello()
        await a.send(generate(ASK, rate=400, id="g"))
        before = await a.recv_until(lambda f: f["type"] == "stream.tool_call")
        before += [await a.recv() for _ in range(max(after, 0))]
        a.ws.transport.abort()
    before = before[: len(before) + min(after, 0)]
    assert any(f.get("part") == "tool_call" for f in before) == (after >= 1)
    async with raw(server) as b:
        await b.hello(session=welcome["session"], last_seq=before[-1]["seq"])
        after = await b.recv_until(lambda f: f["type"] == "stream.end")
    frames = before + after
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    agrees_with_end(rebuild(frames, "s1"), frames[-1])
    assert frames[-1]["reason"] == "tool_calls"


async def test_a_refreshed_page_gets_the_calls_so_far(server: Server) -> None:
    async with raw(server) as a:
        welcome = await a.hello()
        await a.send(generate(ASK, rate=100, id="g"))
        await a.recv_until(lambda f: f.get("part") == "tool_call")
        a.ws.transport.abort()
    async with raw(server) as b:
        await b.hello(session=welcome["session"], last_seq=0, snapshot=True)
        frames = await b.recv_until(lambda f: f["type"] == "stream.end")
    snap = frames[0]
    assert snap["type"] == "stream.snapshot" and snap["reasoning"] and snap["text"] == "Calling get_weather and get_time."
    assert snap["calls"][0]["name"] == "get_weather"
    agrees_with_end(rebuild(frames, "s1"), frames[-1])


async def test_interrupt_during_a_tool_call(server: Server) -> None:
    async with raw(server) as c:
        await c.hello()
        await c.send(generate(ASK, rate=100, id="g"))
        await c.recv_until(lambda f: f.get("part") == "tool_call")
        await c.send({"type": "interrupt", "id": "i", "stream": "s1", "input": "only get_time UTC"})
        frames = await c.recv_until(lambda f: f["type"] == "stream.end" and f["stream"] == "s2")
    end1 = next(f for f in frames if f["type"] == "stream.end" and f["stream"] == "s1")
    assert end1["reason"] == "interrupted"
    assert "tool_calls" not in end1["message"]  # the partial call is dropped
    assert end1["message"]["content"][-1] == {"type": "text", "text": "Calling get_weather and get_time."}
    start2 = next(f for f in frames if f["type"] == "stream.start")
    assert (start2["ref"], start2["steered_from"]) == ("i", "s1")
    end2 = frames[-1]  # the steered stream kept the tools
    assert end2["reason"] == "tool_calls"
    assert [(t["name"], t["arguments"]) for t in end2["message"]["tool_calls"]] == [("get_time", {"zone": "UTC"})]


async def test_images_and_bad_input_keep_the_connection(make_server: Any) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(200)).decode()
    async with make_server(max_size=4096) as srv, raw(srv) as c:
        await c.hello()
        image = {"type": "image", "url": f"data:image/png;base64,{png}"}
        await c.send({"type": "generate", "id": "ok", "messages": [{"role": "user", "content": [{"type": "text", "text": "what is it"}, image]}], "params": {"tokens_per_s": 0, "ttft_ms": 0}})
        frames = await c.recv_until(lambda f: f["type"] == "stream.end")
        assert frames[0]["ref"] == "ok" and frames[-1]["reason"] == "complete"
        await c.send({"type": "generate", "id": "bad", "messages": [{"role": "user", "content": [{"type": "image", "url": "ftp://x/y.png"}]}]})
        err = await c.recv()
        assert (err["type"], err["code"], err["ref"], err["field"]) == ("error", "bad_image", "bad", "messages.0.content.0.url")
        # an image over max_size: the frame is refused by websockets (1009)
        huge = {"type": "image", "url": "data:image/png;base64," + "A" * 8192}
        await c.send({"type": "generate", "messages": [{"role": "user", "content": [huge]}]})
        await c.ws.wait_closed()
        assert c.ws.close_code == 1009
        async with raw(srv) as d:  # the server keeps serving
            await d.hello()
            await d.send({"type": "ping", "id": "p"})
            assert await d.recv() == {"type": "pong", "ref": "p"}


async def test_a_lost_nodes_tool_stream_is_adopted_and_steered_with_its_tools(make_server: Any) -> None:
    """What the Redis backplane keeps of a running stream (its stored request,
    the log) is enough for another node to end it with its partial answer and
    to steer it with the same tools; here the two nodes share nothing but
    what encode_request/decode_request and the log carry."""
    async with make_server() as first, make_server() as second:
        async with raw(first) as a:
            welcome = await a.hello()
            await a.send(generate(ASK, rate=100, id="g", tool_choice="auto"))
            before = await a.recv_until(lambda f: f.get("part") == "tool_call")
            live = first.sessions[welcome["session"]]
            (stream,) = live.session.streams.values()
            stored = encode_request(stream)  # what the owner wrote to Redis
            log = [frame for _, frame in live.session.log]
            seq = live.session.seq
        lost = decode_request(stored)
        assert lost.tools == stream.tools and lost.tool_choice == "auto" and lost.params == stream.params
        assert lost.messages == stream.messages
        second.adopt(
            AdoptedSession(
                id=welcome["session"], identity="anonymous", agent=None, public_id=None, rules=None,
                seq=seq, acked=0, first=1, frames=log, subscriptions=[], running={stream.id: lost},
            )
        )
        async with raw(second) as b:
            assert (await b.hello(session=welcome["session"], last_seq=before[-1]["seq"]))["resumed"]
            frames = await b.recv_until(lambda f: f["type"] == "stream.end")
            end = frames[-1]
            assert (end["reason"], end["error"]["code"]) == ("error", "node_lost")
            assert end["message"]["content"] == [
                {"type": "reasoning", "text": rebuild(before, "s1")["reasoning"]},  # no signature: not on the wire yet
                {"type": "text", "text": "Calling get_weather and get_time."},
            ]
            assert "tool_calls" not in end["message"]
            await b.send({"type": "interrupt", "id": "i", "stream": "s1", "input": "just get_time Oslo"})
            steered = await b.recv_until(lambda f: f["type"] == "stream.end")
            assert steered[-1]["reason"] == "tool_calls"
            assert steered[-1]["message"]["tool_calls"][0]["name"] == "get_time"


def test_the_stored_request_of_a_running_stream_keeps_everything_rich() -> None:
    """encode_request/decode_request (Redis) round-trip a step-two request."""
    import json
    from pathlib import Path

    from wsserver.core.streams import Stream
    from wsserver.wire.messages import decode_client

    vectors = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "client-valid"
    for name in ("generate-tools.json", "generate-rich-params.json"):
        msg = decode_client(json.dumps(json.loads((vectors / name).read_text())["message"]))
        stream = Stream(
            id="s1", ref=None, provider="simulated", model="sim-1", messages=tuple(msg.messages), params=msg.params,
            started_at=0, tools=tuple(msg.tools), tool_choice=msg.tool_choice,
        )
        lost = decode_request(encode_request(stream))
        assert (lost.messages, lost.params, lost.tools, lost.tool_choice) == (
            stream.messages, stream.params, stream.tools, stream.tool_choice,
        )


class ScriptedProvider(Provider):
    """Plays back the events its model names (what an upstream mapping yields)."""

    name = "scripted"
    default_model = "ok"
    SCRIPTS: dict[str, list[Any]] = {
        "bad-arguments": [
            ReasoningDelta("plan"), ReasoningDone(signature="sig"), TextDelta("Looking."),
            ToolCallStart("call_1", "get_weather"), ToolCallDelta("call_1", '{"city": "Os'), Finish("tool_calls"),
        ],
        "redacted": [
            ReasoningDone(redacted="opaque=="), ReasoningDelta("visible"), ReasoningDone(signature="sig-2"),
            TextDelta("Done."), Finish("complete"),
        ],
        "bug": [ToolCallStart("c", "f"), ToolCallStart("c", "f"), Finish("tool_calls")],
    }

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        for event in self.SCRIPTS[request.model]:
            yield event


@pytest.mark.parametrize(
    ("model", "reason", "code", "message"),
    [
        (
            "bad-arguments", "error", "provider_error",
            {"role": "assistant", "content": [{"type": "reasoning", "text": "plan", "signature": "sig"}, {"type": "text", "text": "Looking."}]},
        ),
        (
            "redacted", "complete", None,
            {
                "role": "assistant",
                "content": [
                    {"type": "reasoning", "text": "", "redacted": "opaque=="},
                    {"type": "reasoning", "text": "visible", "signature": "sig-2"},
                    {"type": "text", "text": "Done."},
                ],
            },
        ),
        ("bug", "error", "internal", {"role": "assistant", "content": ""}),
    ],
)
async def test_what_an_upstream_yields_reaches_the_end_message(
    model: str, reason: str, code: str | None, message: dict[str, Any]
) -> None:
    providers = Providers([SimulatedProvider(), ScriptedProvider()], default="simulated")
    async with Server(ServerConfig(**TEST_CONFIG), providers=providers) as srv, raw(srv) as c:
        await c.hello()
        await c.send({"type": "generate", "provider": "scripted", "model": model, "messages": ASK, "tools": [WEATHER]})
        end = (await c.recv_until(lambda f: f["type"] == "stream.end"))[-1]
        assert (end["reason"], end.get("error", {}).get("code")) == (reason, code)
        assert end["message"] == message
        await c.send({"type": "ping", "id": "p"})  # the connection and the server carry on
        assert (await c.recv())["type"] == "pong"
