"""The Python client's agent runs: tool handlers that answer by themselves
(the run's own calls and calls routed to the client's agent), wait_for_tools,
approve, and a run across dropped connections."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

import wsserver
from tests.client.test_client_resume import FAST, kill_connections
from tests.server.test_runs import LOOKUP, PROMPT, WEATHER
from wsserver.client import ToolCallRequest, WaitingCall
from wsserver.server import Server


@pytest.mark.both_loops
async def test_a_three_step_run_with_handlers_an_approval_and_drops(server: Server) -> None:
    async with asyncio.timeout(30), wsserver.connect(server.url, backoff=FAST, hello={"agent": "librarian"}) as librarian, \
            wsserver.connect(server.url, backoff=FAST) as me:
        looked_up: list[dict[str, Any]] = []

        async def lookup(arguments: dict[str, Any]) -> dict[str, Any]:
            looked_up.append(arguments)
            kill_connections(server)  # every connection drops while the run waits for this answer
            return {"topic": arguments["topic"], "summary": "capital of Norway"}

        librarian.tools.register("lookup", lookup)
        me.tools.register("get_weather", lambda arguments: f"4 C in {arguments['city']}")  # sync: run in a thread
        stream = await me.generate(PROMPT, tools=[WEATHER, LOOKUP], max_steps=3)
        calls = await stream.wait_for_tools()  # get_weather was answered by its handler; lookup needs approval
        assert [(c.name, c.wait) for c in calls] == [("lookup", "approval")]
        assert stream.step == 2 and calls[0].agent == "librarian"
        kill_connections(server)
        await stream.approve(calls[0].id)  # sent once the client is back
        assert await stream.wait_for_tools() == []
        result = await stream.wait()
        assert result.reason == "complete" and result.steps == 3
        assert looked_up == [{"topic": "Oslo"}]
        messages = stream.messages
        assert messages is not None and [m["role"] for m in messages] == ["assistant", "tool"] * 2 + ["assistant"]
        assert messages[1]["content"] == "4 C in Oslo"
        assert orjson.loads(messages[3]["content"]) == {"topic": "Oslo", "summary": "capital of Norway"}
        kinds = [e.kind async for e in stream.events()]
        assert kinds.count("waiting") == 3 and kinds.count("tool_result") == 2 and kinds.count("step") == 2
        assert me.reconnects >= 1 and librarian.reconnects >= 1


async def test_without_handlers_the_caller_answers(server: Server) -> None:
    async with wsserver.connect(server.url, hello={"agent": "librarian"}) as librarian, wsserver.connect(server.url) as me:
        tools = [WEATHER, {**LOOKUP, "approval": False}]
        stream = await me.generate(PROMPT, tools=tools, max_steps=3)
        (call,) = await stream.wait_for_tools()
        assert isinstance(call, WaitingCall) and (call.name, call.wait, call.arguments) == ("get_weather", "client", {"city": "Oslo"})
        await stream.tool_result(call.id, {"temp_c": 4})  # anything JSON is sent as JSON text
        routed = await asyncio.wait_for(librarian.tools.calls.get(), 10)
        assert isinstance(routed, ToolCallRequest) and routed.name == "lookup" and routed.arguments == {"topic": "Oslo"}
        await librarian.tool_result(routed.call, [{"type": "text", "text": "found"}])
        result = await stream.wait()
        assert result.messages is not None and result.messages[1]["content"] == '{"temp_c":4}'
        assert result.messages[3]["content"] == [{"type": "text", "text": "found"}]


async def test_a_failing_handler_tells_the_model(server: Server) -> None:
    async with wsserver.connect(server.url) as me:

        async def broken(arguments: dict[str, Any]) -> str:
            raise RuntimeError("no network")

        me.tools.register("get_weather", broken)
        stream = await me.generate([{"role": "user", "content": "get_weather in Oslo"}], tools=[WEATHER], max_steps=2)
        result = await stream.wait()
        assert result.messages is not None
        assert orjson.loads(result.messages[1]["content"]) == {"error": "tool_failed", "message": "no network"}
        assert result.reason == "complete"


async def test_a_run_over_the_http_transport_with_the_agent_on_a_websocket(server: Server) -> None:
    async with asyncio.timeout(20), wsserver.connect(server.url, hello={"agent": "librarian"}) as librarian, \
            wsserver.connect(server.url, transport="sse") as me:
        librarian.tools.register("lookup", lambda arguments: f"about {arguments['topic']}")
        me.tools.register("get_weather", lambda arguments: "4 C")
        stream = await me.generate(PROMPT, tools=[WEATHER, LOOKUP], max_steps=3)
        (call,) = await stream.wait_for_tools()
        await stream.approve(call.id, False, reason="not now")
        result = await stream.wait()
        assert result.reason == "complete" and result.steps == 3
        assert result.messages is not None
        assert orjson.loads(result.messages[3]["content"]) == {
            "error": "denied", "message": "the user denied this call", "reason": "not now"
        }
