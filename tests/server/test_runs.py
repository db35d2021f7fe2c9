"""Agent runs end to end on 127.0.0.1 (PROTOCOL.md 4.4): a three-step run with
the simulated provider (a tool the client answers, a tool another agent
answers after an approval), exactly once across a forced drop in every wait
state, cancel in every wait state, bad input, threads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.helpers import RawClient, until
from wsserver.server import Server

WEATHER = {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
LOOKUP = {
    "name": "lookup",
    "agent": "librarian",
    "approval": True,
    "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]},
}
#: Three steps: get_weather (the client answers), lookup (approved, then the librarian answers), the answer.
PROMPT = [{"role": "user", "content": "get_weather in Oslo, then lookup Oslo"}]
RUN = {"type": "generate", "id": "g", "stream": "run", "messages": PROMPT, "tools": [WEATHER, LOOKUP], "max_steps": 3}
WAITS = ("client", "approval", "agent")


def of_type(kind: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["type"] == kind and all(f.get(k) == v for k, v in fields.items())


def waiting_for(wait: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f["type"] == "stream.waiting" and any(c["wait"] == wait for c in f["calls"])


class Session:
    """A client of one session that may lose its connection and come back
    (anywhere), keeping every frame it got, as a client keeps them."""

    def __init__(self, **hello: Any) -> None:
        self.hello = hello
        self.frames: list[dict[str, Any]] = []
        self._taken: set[int] = set()  # frames until() returned
        self.client: RawClient | None = None
        self.session: str | None = None

    @property
    def last_seq(self) -> int:
        return max((f["seq"] for f in self.frames if "seq" in f), default=0)

    async def open(self, server: Server, **extra: Any) -> dict[str, Any]:
        ws = await connect(server.url, compression=None, close_timeout=0.5)
        self.client = RawClient(ws)
        resume = {"session": self.session, "last_seq": self.last_seq} if self.session else {}
        welcome = await self.client.hello(**self.hello, **resume, **extra)
        assert welcome["resumed"] == bool(self.session)
        self.session = welcome["session"]
        return welcome

    async def drop(self) -> None:
        """A forced drop: the TCP connection goes away without a close frame."""
        assert self.client is not None
        self.client.ws.transport.abort()
        await self.client.ws.wait_closed()
        self.client = None

    async def send(self, message: dict[str, Any]) -> None:
        assert self.client is not None
        await self.client.send(message)

    async def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first frame that matches and was not returned before (received
        already, or from now on; every frame is kept)."""
        for i, frame in enumerate(self.frames):
            if i not in self._taken and predicate(frame):
                self._taken.add(i)
                return frame
        assert self.client is not None
        got = await self.client.recv_until(predicate, timeout=timeout)
        self.frames += got
        self._taken.add(len(self.frames) - 1)
        return got[-1]

    async def close(self) -> None:
        if self.client is not None:
            await self.client.ws.close()
            self.client = None


def check_exactly_once(frames: list[dict[str, Any]]) -> None:
    """Every seq once, in order, with no gap: nothing lost or doubled across the drops."""
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


async def three_step_run(
    requester_nodes: list[Server], agent_node: Server, *, drop_in: tuple[str, ...] = (), blink_agent: bool = False
) -> tuple[Session, Session]:
    """The run of the module's doc. The requester drops its connection in each
    wait state of ``drop_in`` and comes back on the next of ``requester_nodes``
    (round robin); with ``blink_agent``, the agent is away when its call is routed."""
    nodes = iter(requester_nodes * 4)
    me, librarian = Session(), Session(agent="librarian")
    await librarian.open(agent_node)
    await me.open(next(nodes))

    async def maybe_drop(wait: str) -> None:
        if wait in drop_in:
            await me.drop()
            await me.open(next(nodes))

    await me.send(RUN)
    first = await me.until(waiting_for("client"))
    assert first["step"] == 1 and first["calls"][0]["name"] == "get_weather"
    assert first["calls"][0]["arguments"] == {"city": "Oslo"}
    await maybe_drop("client")
    await me.send({"type": "tool_result", "id": "t1", "stream": "run", "call": first["calls"][0]["id"], "content": "4 C, rain"})
    second = await me.until(waiting_for("approval"))
    assert second["step"] == 2 and second["calls"][0]["agent"] == "librarian"
    call = second["calls"][0]
    await maybe_drop("approval")
    if blink_agent:
        await librarian.drop()
    await me.send({"type": "approve", "id": "a1", "stream": "run", "call": call["id"], "approved": True})
    await me.until(waiting_for("agent"))
    await maybe_drop("agent")
    if blink_agent:
        await asyncio.sleep(0.05)  # routed while the agent is away: its log keeps the call
        await librarian.open(agent_node)
    routed = await librarian.until(of_type("tool_call"))
    assert routed["name"] == "lookup" and routed["arguments"] == {"topic": "Oslo"} and "seq" in routed
    assert routed["from"].startswith("anon-")  # the requester's public name, never its session id
    await librarian.send({"type": "tool_result", "id": "r1", "call": routed["call"], "content": "Oslo: capital of Norway"})
    await librarian.until(of_type("ok", ref="r1"))
    end = await me.until(of_type("stream.end"))
    assert end["reason"] == "complete" and end["steps"] == 3
    roles = [(m["role"], m.get("tool_call_id")) for m in end["messages"]]
    assert [r for r, _ in roles] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert end["messages"][3]["content"] == "Oslo: capital of Norway"
    assert end["message"]["content"].startswith('lookup returned "Oslo: capital of Norway".')
    check_exactly_once(me.frames)
    check_exactly_once(librarian.frames)
    # each step's frames, once: two waits for results, one for the approval, two results, two steps
    kinds = [f["type"] for f in me.frames if f.get("stream") == "run"]
    assert kinds.count("stream.waiting") == 3 and kinds.count("stream.tool_result") == 2
    assert kinds.count("stream.step") == 2 and kinds.count("stream.end") == 1
    assert [f["step"] for f in me.frames if f["type"] == "stream.step"] == [2, 3]
    return me, librarian


@pytest.mark.parametrize("drop_in", [(), *((w,) for w in WAITS), WAITS], ids=["no-drop", *WAITS, "every-wait"])
async def test_a_three_step_run_completes_once_across_a_drop_in_every_wait_state(
    server: Server, drop_in: tuple[str, ...]
) -> None:
    me, librarian = await three_step_run([server], server, drop_in=drop_in)
    await me.close()
    await librarian.close()


async def test_the_agent_gets_its_call_after_a_blink(server: Server) -> None:
    me, librarian = await three_step_run([server], server, drop_in=("agent",), blink_agent=True)
    await me.close()
    await librarian.close()


async def waiting_run(server: Server, wait: str) -> tuple[Session, Session]:
    """A run waiting for ``wait`` (the requester's client, an approval, or the agent)."""
    me, librarian = Session(), Session(agent="librarian")
    await librarian.open(server)
    await me.open(server)
    await me.send(RUN)
    first = await me.until(waiting_for("client"))
    if wait == "client":
        return me, librarian
    await me.send({"type": "tool_result", "stream": "run", "call": first["calls"][0]["id"], "content": "x"})
    second = await me.until(waiting_for("approval"))
    if wait == "approval":
        return me, librarian
    await me.send({"type": "approve", "stream": "run", "call": second["calls"][0]["id"], "approved": True})
    await me.until(waiting_for("agent"))
    await librarian.until(of_type("tool_call"))
    return me, librarian


@pytest.mark.parametrize("wait", WAITS)
async def test_cancel_in_every_wait_state_ends_the_run_at_once(server: Server, wait: str) -> None:
    me, librarian = await waiting_run(server, wait)
    live = server.sessions[me.session]  # type: ignore[index]
    assert not live.tasks  # waiting holds no generation task (no upstream open)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await me.send({"type": "cancel", "id": "c", "stream": "run"})
    end = await me.until(of_type("stream.end"))
    assert loop.time() - started < 2.0  # at once (generous: precise figures are bench's)
    assert end["reason"] == "cancelled" and end["message"]["tool_calls"]
    last = end["messages"][-1]
    assert last["role"] == "tool" and orjson.loads(last["content"])["error"] == "cancelled"
    await me.until(of_type("ok", ref="c"))
    assert not live.timers and not live.tasks and not live.session.streams
    if wait == "agent":  # the agent answers late: accepted, and nothing more happens to the run
        call = next(f for f in librarian.frames if f["type"] == "tool_call")["call"]
        await librarian.send({"type": "tool_result", "id": "late", "call": call, "content": "too late"})
        await librarian.until(of_type("ok", ref="late"))
        await me.send({"type": "ping", "id": "p"})
        await me.until(of_type("pong"))
        assert [f["type"] for f in me.frames].count("stream.end") == 1
        assert not any(f["type"] == "stream.tool_result" and f["content"] == "too late" for f in me.frames)
    await me.close()
    await librarian.close()


@pytest.mark.parametrize("wait", WAITS)
async def test_interrupt_in_every_wait_state_steers_at_once(server: Server, wait: str) -> None:
    me, librarian = await waiting_run(server, wait)
    await me.send({"type": "interrupt", "id": "i", "stream": "run", "input": "forget it", "new_stream": "after"})
    end = await me.until(of_type("stream.end", stream="run"))
    assert end["reason"] == "interrupted"
    start = await me.until(of_type("stream.start", stream="after"))
    assert start["steered_from"] == "run"
    done = await me.until(of_type("stream.end", stream="after"))
    assert done["reason"] == "complete"  # the conversation it continued was a valid one
    await me.close()
    await librarian.close()


async def test_refresh_shows_the_pending_approval_and_approve_works_after_it(server: Server) -> None:
    me, librarian = await waiting_run(server, "approval")
    await me.drop()
    page = Session()
    page.session = me.session
    await page.open(server, snapshot=True)  # a refreshed page: last_seq 0, snapshot
    snap = await page.until(of_type("stream.snapshot", stream="run"))
    (pending,) = snap["waiting"]
    assert pending["wait"] == "approval" and pending["name"] == "lookup" and pending["agent"] == "librarian"
    assert snap["step"] == 2 and [c["name"] for c in snap["calls"]] == ["get_weather", "lookup"]
    await page.send({"type": "approve", "id": "a", "stream": "run", "call": pending["id"], "approved": False, "reason": "no"})
    result = await page.until(of_type("stream.tool_result"))
    assert result["error"] == "denied" and orjson.loads(result["content"])["reason"] == "no"
    end = await page.until(of_type("stream.end"))
    assert end["reason"] == "complete" and end["steps"] == 3  # the model answered the denial
    await page.close()
    await librarian.close()


async def test_a_missing_agent_and_a_timeout_are_results_the_model_reacts_to(server: Server) -> None:
    me = Session()
    await me.open(server)
    ghost = {**LOOKUP, "approval": False, "agent": "nobody"}
    await me.send({**RUN, "messages": [{"role": "user", "content": "lookup Oslo"}], "tools": [ghost]})
    result = await me.until(of_type("stream.tool_result"))
    assert result["error"] == "unknown_agent"
    assert orjson.loads(result["content"]) == {
        "error": "unknown_agent", "message": "no agent named 'nobody' is connected", "agent": "nobody"
    }
    assert (await me.until(of_type("stream.end")))["reason"] == "complete"
    # an agent that never answers
    librarian = Session(agent="librarian")
    await librarian.open(server)
    slow = {**LOOKUP, "approval": False, "timeout_ms": 200}
    await me.send({**RUN, "id": "g2", "stream": "run2", "messages": [{"role": "user", "content": "lookup Oslo"}], "tools": [slow]})
    result = await me.until(of_type("stream.tool_result", stream="run2"))
    assert result["error"] == "timeout"
    assert (await me.until(of_type("stream.end", stream="run2")))["reason"] == "complete"
    await me.close()
    await librarian.close()


async def test_the_session_expires_with_a_clear_reason(make_server: Callable[..., Server]) -> None:
    async with make_server(session_ttl=0.3) as server:
        me, librarian = await waiting_run(server, "approval")
        session = server.sessions[me.session].session  # type: ignore[index]
        await me.drop()

        def ends() -> list[dict[str, Any]]:
            return [orjson.loads(f) for _, f in session.log if f.startswith(b'{"type":"stream.end"')]

        # (gone from the registry first; the end's frames reach the log a loop turn later)
        await until(lambda: me.session not in server.sessions and bool(ends()))
        (end,) = ends()
        assert end["reason"] == "error" and end["error"]["code"] == "expired"
        assert end["error"]["message"] == (
            "the session expired with no connection attached, while the run waited for an approval of 'lookup'"
        )
        assert orjson.loads(end["messages"][-1]["content"])["error"] == "expired"
        await librarian.close()


class TestBadInput:
    async def test_each_bad_tool_result_and_approve_has_its_code(self, make_server: Callable[..., Server]) -> None:
        async with make_server(api_keys=("key-a", "key-b")) as server:
            me, librarian = Session(token="key-a"), Session(token="key-a", agent="librarian")
            await librarian.open(server)
            await me.open(server)
            await me.send(RUN)
            first = await me.until(waiting_for("client"))
            call = first["calls"][0]["id"]
            codes = {}
            for rid, message in [
                ("unknown", {"type": "tool_result", "stream": "run", "call": "nope", "content": "x"}),
                ("approve-nothing", {"type": "approve", "stream": "run", "call": call, "approved": True}),
                ("first", {"type": "tool_result", "stream": "run", "call": call, "content": "x"}),
            ]:
                await me.send({**message, "id": rid})
                reply = await me.until(lambda f, rid=rid: f.get("ref") == rid)
                codes[rid] = reply.get("code", reply["type"])
            for rid, content in [("same", "x"), ("different", "y")]:
                await me.send({"type": "tool_result", "id": rid, "stream": "run", "call": call, "content": content})
                reply = await me.until(lambda f, rid=rid: f.get("ref") == rid)
                codes[rid] = reply.get("code", reply["type"])
            assert codes == {
                "unknown": "unknown_call",
                "approve-nothing": "not_waiting",
                "first": "ok",
                "same": "ok",
                "different": "call_answered",
            }
            second = await me.until(waiting_for("approval"))
            await me.send({"type": "approve", "stream": "run", "call": second["calls"][0]["id"], "approved": True})
            await me.until(waiting_for("agent"))
            routed = await librarian.until(of_type("tool_call"))
            # the requester's own client may not answer a call routed to an agent
            await me.send({"type": "tool_result", "id": "mine", "stream": "run", "call": second["calls"][0]["id"], "content": "x"})
            assert (await me.until(of_type("error", ref="mine")))["code"] == "call_forbidden"
            # nor may another identity's session (nor another session at all) answer it
            for token in ("key-b", "key-a"):
                other = Session(token=token)
                await other.open(server)
                await other.send({"type": "tool_result", "id": "steal", "call": routed["call"], "content": "x"})
                assert (await other.until(of_type("error", ref="steal")))["code"] == "call_forbidden"
                await other.close()
            await librarian.send({"type": "tool_result", "id": "guess", "call": "rc_guess", "content": "x"})
            assert (await librarian.until(of_type("error", ref="guess")))["code"] == "unknown_call"
            await librarian.send({"type": "tool_result", "id": "real", "call": routed["call"], "content": "fine"})
            await librarian.until(of_type("ok", ref="real"))
            await librarian.send({"type": "tool_result", "id": "again", "call": routed["call"], "content": "other"})
            assert (await librarian.until(of_type("error", ref="again")))["code"] == "call_answered"
            await librarian.send({"type": "tool_result", "id": "same", "call": routed["call"], "content": "fine"})
            await librarian.until(of_type("ok", ref="same"))
            assert (await me.until(of_type("stream.end")))["reason"] == "complete"
            await me.close()
            await librarian.close()


class TestThreads:
    async def test_queue_reject_and_interrupt(self, server: Server) -> None:
        me = Session()
        await me.open(server)
        slow = {"tokens_per_s": 200, "reply_tokens": 400}
        said = [{"role": "user", "content": "one"}]
        await me.send({"type": "generate", "id": "a", "stream": "a", "messages": said, "thread": "t", "params": slow})
        await me.until(of_type("stream.delta", stream="a"))
        await me.send({"type": "generate", "id": "r", "messages": said, "thread": "t", "on_busy": "reject"})
        busy = await me.until(of_type("error", ref="r"))
        assert (busy["code"], busy["stream"]) == ("busy", "a")
        said2 = [*said, {"role": "user", "content": "two"}]
        await me.send({"type": "generate", "id": "q", "stream": "q", "messages": said2, "thread": "t", "on_busy": "queue"})
        start = await me.until(of_type("stream.start", stream="q"))
        assert start["queued_after"] == "a"
        end_a = await me.until(of_type("stream.end", stream="a"))
        end_q = await me.until(of_type("stream.end", stream="q"))
        deltas_q = [f for f in me.frames if f["type"] == "stream.delta" and f["stream"] == "q"]
        first_q = me.frames.index(deltas_q[0])
        assert me.frames.index(end_a) < first_q  # q ran after a ended
        assert end_q["reason"] == "complete"
        said3 = [*said2, {"role": "user", "content": "three"}]
        await me.send({"type": "generate", "id": "b", "stream": "b", "messages": said3, "thread": "t", "params": slow})
        await me.until(of_type("stream.delta", stream="b"))
        await me.send({"type": "generate", "id": "i", "stream": "i", "messages": [*said3, {"role": "user", "content": "four"}],
                       "thread": "t", "on_busy": "interrupt"})
        assert (await me.until(of_type("stream.end", stream="b")))["reason"] == "interrupted"
        start = await me.until(of_type("stream.start", stream="i"))
        assert start["steered_from"] == "b"
        await me.until(of_type("stream.end", stream="i"))
        await me.close()
