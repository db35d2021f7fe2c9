"""The HTTP transport on several nodes: a session of node A resumed over
SSE on node B (its Last-Event-ID resume relayed through a tunnel), and an
SSE session taken over from another node."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.test_cluster import client, nodes, of_type
from tests.helpers import USER_HI, SseClosed, SseRaw


def base(server: Any) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_last_event_id_resume_on_another_node_then_cancel(redis_server: Any) -> None:
    async with nodes(redis_server.url, sim_tokens_per_s=200.0) as (a, b):
        first = await SseRaw.open(base(a))
        welcome = await first.hello()
        await first.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"reply_tokens": 2000}})
        frames = await first.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= 3)
        stream, last_seq = frames[0]["stream"], frames[-1]["seq"]
        await first.aclose()
        second = await SseRaw.open(base(b), params={"session": welcome["session"]},
                                   headers={"Last-Event-ID": str(last_seq)})
        try:
            resumed = await second.recv()
            assert resumed["type"] == "welcome" and resumed["resumed"] is True
            frames = await second.recv_until(of_type("stream.delta"))
            assert frames[0]["seq"] == last_seq + 1 and second.ids[-1] == frames[-1]["seq"]  # nothing lost or doubled
            await second.send({"type": "cancel", "id": "c", "stream": stream})
            frames = await second.recv_until(of_type("ok", ref="c"))
            assert any(f["type"] == "stream.end" and f["reason"] == "cancelled" for f in frames)
            assert len(a.tunnels) == 1 and welcome["session"] not in b.sessions  # served by A, relayed by B
        finally:
            await second.aclose()
        live = a.sessions[welcome["session"]]
        assert not live.session.streams and not live.tasks


async def test_a_websocket_on_another_node_takes_an_sse_session_over(redis_server: Any) -> None:
    async with nodes(redis_server.url) as (a, b):
        sse = await SseRaw.open(base(a))
        try:
            welcome = await sse.hello()
            async with client(b, session=welcome["session"], last_seq=0) as (_ws, resumed):
                assert resumed["resumed"] is True
                with pytest.raises(SseClosed):
                    await sse.recv()
                assert sse.close_code == 4000
        finally:
            await sse.aclose()


async def test_posted_hello_resumes_on_another_node(redis_server: Any) -> None:
    async with nodes(redis_server.url) as (a, b):
        async with client(a) as (ws, welcome):
            await ws.send({"type": "ping", "id": "p"})
            await ws.recv_until(of_type("pong"))
        sse = await SseRaw.open(base(b))
        try:
            resumed = await sse.hello(session=welcome["session"], last_seq=0)
            assert resumed["resumed"] is True
            await sse.send({"type": "subscribe", "id": "s", "channel": "x"})
            sub = (await sse.recv_until(of_type("subscribed")))[-1]
            assert sse.ids[-1] == sub["seq"]
        finally:
            await sse.aclose()
