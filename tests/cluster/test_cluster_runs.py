"""Agent runs on several nodes sharing Redis (in process): a call routed to an
agent on another node, a drop in every wait state with the client coming back
on another node, and a node lost while a run waits (the adopting node goes on
with it). Each test starts its own redis-server."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.cluster.test_cluster import nodes
from tests.cluster.test_cluster_faults import kill_node
from tests.helpers import until
from wsserver.server import Server
from tests.server.test_runs import (
    RUN,
    WAITS,
    Session,
    check_exactly_once,
    of_type,
    three_step_run,
    waiting_for,
)


async def adopted(session: str | None, *survivors: Server) -> Server:
    """The node that adopted ``session`` (whichever noticed the loss first)."""
    await until(lambda: any(session in node.sessions for node in survivors), timeout=15)
    (adopter,) = [node for node in survivors if session in node.sessions]
    return adopter


@pytest.mark.parametrize("drop_in", [(), WAITS], ids=["no-drop", "every-wait"])
async def test_a_three_step_run_with_the_agent_on_another_node(redis_server: Any, drop_in: tuple[str, ...]) -> None:
    """The run is on node 0, the librarian on node 1; after each drop the
    client comes back through the other node (tunnelled to node 0)."""
    async with nodes(redis_server.url) as (a, b):
        me, librarian = await three_step_run([a, b], b, drop_in=drop_in, blink_agent=bool(drop_in))
        assert me.session in a.sessions and librarian.session in b.sessions
        await me.close()
        await librarian.close()


@pytest.mark.parametrize("wait", WAITS)
async def test_cancel_in_every_wait_state_across_nodes(redis_server: Any, wait: str) -> None:
    async with nodes(redis_server.url) as (a, b):
        me, librarian = Session(), Session(agent="librarian")
        await librarian.open(b)
        await me.open(a)
        await me.send(RUN)
        first = await me.until(waiting_for("client"))
        if wait != "client":
            await me.send({"type": "tool_result", "stream": "run", "call": first["calls"][0]["id"], "content": "x"})
            second = await me.until(waiting_for("approval"))
            if wait == "agent":
                await me.send({"type": "approve", "stream": "run", "call": second["calls"][0]["id"], "approved": True})
                await me.until(waiting_for("agent"))
                await librarian.until(of_type("tool_call"))
        await me.drop()
        await me.open(b)  # cancelled from the other node
        await me.send({"type": "cancel", "id": "c", "stream": "run"})
        end = await me.until(of_type("stream.end"))
        assert end["reason"] == "cancelled"
        await me.until(of_type("ok", ref="c"))
        live = a.sessions[me.session]  # type: ignore[index]
        assert not live.timers and not live.tasks and not live.session.streams
        check_exactly_once(me.frames)
        await me.close()
        await librarian.close()


@pytest.mark.parametrize("wait", WAITS)
async def test_a_waiting_run_survives_the_loss_of_its_node(redis_server: Any, wait: str) -> None:
    """Node 0 runs the session and stops without a word while the run waits;
    another node adopts it from what Redis keeps (the log and the stream's request),
    the client resumes there, and the run goes on to its one end."""
    async with nodes(redis_server.url, 3, node_timeout=0.5) as (a, b, c):
        me, librarian = Session(), Session(agent="librarian")
        await librarian.open(c)
        await me.open(a)
        await me.send(RUN)
        first = await me.until(waiting_for("client"))
        call = first["calls"][0]["id"]
        if wait != "client":
            await me.send({"type": "tool_result", "id": "t1", "stream": "run", "call": call, "content": "4 C"})
            second = await me.until(waiting_for("approval"))
            call = second["calls"][0]["id"]
            if wait == "agent":
                await me.send({"type": "approve", "id": "a1", "stream": "run", "call": call, "approved": True})
                await me.until(waiting_for("agent"))
        kill_node(a)
        await me.drop()
        adopter = await adopted(me.session, b, c)
        await me.open(adopter)
        live = adopter.sessions[me.session]  # type: ignore[index]
        (stream,) = live.session.streams.values()
        assert stream.state.name == "WAITING"
        if wait == "client":
            await me.send({"type": "tool_result", "id": "t1", "stream": "run", "call": call, "content": "4 C"})
            second = await me.until(waiting_for("approval"))
            call = second["calls"][0]["id"]
        if wait in ("client", "approval"):
            await me.send({"type": "approve", "id": "a1", "stream": "run", "call": call, "approved": True})
        routed = await librarian.until(of_type("tool_call"))  # routed once, from whichever node did it
        await librarian.send({"type": "tool_result", "id": "r", "call": routed["call"], "content": "found"})
        await librarian.until(of_type("ok", ref="r"))
        end = await me.until(of_type("stream.end"))
        assert end["reason"] == "complete" and end["steps"] == 3
        assert [m["role"] for m in end["messages"]] == ["assistant", "tool", "assistant", "tool", "assistant"]
        assert end["messages"][3]["content"] == "found"
        check_exactly_once(me.frames)
        assert [f["type"] for f in librarian.frames].count("tool_call") == 1
        kinds = [f["type"] for f in me.frames]
        assert kinds.count("stream.end") == 1 and kinds.count("stream.step") == 2
        await me.close()
        await librarian.close()


async def test_an_agent_result_waiting_in_redis_reaches_the_adopting_node(redis_server: Any) -> None:
    """The agent answers while the run's node is gone (not yet adopted): the
    result waits in Redis and the adopting node hands it to the run."""
    async with nodes(redis_server.url, 3, node_timeout=0.5) as (a, b, c):
        me, librarian = Session(), Session(agent="librarian")
        await librarian.open(c)
        await me.open(a)
        await me.send({**RUN, "tools": [RUN["tools"][0], {**RUN["tools"][1], "approval": False}],
                       "messages": [{"role": "user", "content": "lookup Oslo"}]})
        await me.until(waiting_for("agent"))
        routed = await librarian.until(of_type("tool_call"))
        kill_node(a)
        await me.drop()
        await librarian.send({"type": "tool_result", "id": "r", "call": routed["call"], "content": "found"})
        await librarian.until(of_type("ok", ref="r"))
        await me.open(await adopted(me.session, b, c))
        result = await me.until(of_type("stream.tool_result"))
        assert result["content"] == "found" and result["from"] == "librarian"
        end = await me.until(of_type("stream.end"))
        assert end["reason"] == "complete" and orjson.loads(orjson.dumps(end["messages"]))[1]["content"] == "found"
        check_exactly_once(me.frames)
        await me.close()
        await librarian.close()


async def test_a_node_shut_down_hands_a_waiting_run_over(redis_server: Any) -> None:
    """A graceful stop (SIGTERM) ends running streams with shutdown but hands a
    waiting run over as it is: the adopting node goes on with it."""
    async with nodes(redis_server.url, 2, node_timeout=0.5) as (a, b):
        me = Session()
        await me.open(a)
        await me.send(RUN)
        first = await me.until(waiting_for("client"))
        await me.send({"type": "generate", "id": "other", "stream": "other", "messages": RUN["messages"],
                       "params": {"tokens_per_s": 50, "reply_tokens": 1000}})
        await me.until(of_type("stream.delta", stream="other"))
        await a.close()
        await me.drop()
        await me.open(await adopted(me.session, b))
        end = await me.until(of_type("stream.end", stream="other"))
        assert end["error"]["code"] == "shutdown"
        await me.send({"type": "tool_result", "id": "t1", "stream": "run", "call": first["calls"][0]["id"], "content": "4 C"})
        second = await me.until(waiting_for("approval"))
        await me.send({"type": "approve", "id": "a1", "stream": "run", "call": second["calls"][0]["id"], "approved": False})
        end = await me.until(of_type("stream.end", stream="run"))
        assert end["reason"] == "complete" and end["steps"] == 3
        check_exactly_once(me.frames)
        await me.close()
