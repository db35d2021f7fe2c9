"""Issue 17, attacked as an attacker would, end to end on 127.0.0.1: what a
client may make the server keep (a stream's answer, ended streams, an
interrupt chain, direct messages to an agent that is away, channel
history), the limits a steer must pass, names, credentials and headers that
used to crash a handshake, channel rights on resume, the writer task of a
connection closed for a violation, and the defaults. One regression test (or
more) per item; ``tests/core/test_bounds.py`` has the rules without a socket,
``tests/cluster/test_cluster_abuse.py`` the Redis side."""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers import USER_HI, RawClient, until
from tests.server.test_hardening import handshake_status
from wsserver.config import ServerConfig
from wsserver.server import Server
from wsserver.server.auth import make_jwt

SECRET = "s3cret-for-tests"


async def raw_request(port: int, lines: list[str]) -> int:
    """Send a raw HTTP/1.1 request (headers as given, duplicates too); the status answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        async with asyncio.timeout(5):
            status = await reader.readline()
        return int(status.split()[1])
    finally:
        writer.close()


def upgrade(port: int, *extra: str) -> list[str]:
    return [
        "GET / HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def big_generate(stream: str, **params: Any) -> dict[str, Any]:
    return {"type": "generate", "stream": stream, "messages": USER_HI, "params": {"reply_tokens": 1_000_000, **params}}


# ---------------------------------------------------------- 1. retained text


class TestRetainedText:
    async def test_a_streams_answer_ends_length_at_its_bound_and_its_task_stops(self, server: Server) -> None:
        async with connect(server.url, compression=None, max_size=None) as ws:
            c = RawClient(ws)
            welcome = await c.hello()
            await c.send(big_generate("big", tokens_per_s=0))
            frames = await c.recv_until(lambda f: f["type"] == "stream.end", timeout=60)
        end = frames[-1]
        text = "".join(f["text"] for f in frames if f["type"] == "stream.delta")
        assert end["reason"] == "length"
        limit = 1 << 20  # max_stream_bytes, by default
        assert limit - 64 < len(text.encode()) <= limit  # cut at the bound, not before
        live = server.sessions[welcome["session"]]
        await until(lambda: not live.tasks)  # the generation stopped (its upstream closed)
        assert not live.tasks

    async def test_ended_streams_a_session_keeps_are_bounded_in_bytes(self, server: Server) -> None:
        async with connect(server.url, compression=None, max_size=None, max_queue=None) as ws:
            c = RawClient(ws)
            welcome = await c.hello()
            for i in range(8):
                await c.send(big_generate(f"s{i}", tokens_per_s=0))
            ended = 0
            async with asyncio.timeout(120):
                while ended < 8:
                    ended += (await c.recv())["type"] == "stream.end"
            book = server.sessions[welcome["session"]].session.book
            kept = [s for i in range(8) if (s := book.find(f"s{i}")) is not None]
            held = sum(len(s.text.encode()) for s in kept)
            assert held <= (4 << 20) + (1 << 20)  # recent_streams_bytes (and the newest), by default
            assert book.find("s7") is not None  # the newest is kept (an interrupt racing its end finds it)
            await c.send({"type": "interrupt", "stream": "s7", "id": "i"})
            assert (await c.recv())["type"] == "ok"
            await c.send({"type": "interrupt", "stream": "s0", "id": "j"})  # forgotten: the oldest went first
            assert (await c.recv())["code"] == "unknown_stream"


# ------------------------------------------------ 2. a steer is a generation


async def test_interrupt_with_input_passes_the_generation_rate(make_server: Any) -> None:
    async with make_server(generate_rate=3) as server, connect(server.url, compression=None) as ws:
        c = RawClient(ws)
        await c.hello()
        await c.send(big_generate("s0", tokens_per_s=20))
        current, started, limited = "s0", 1, 0
        for i in range(1, 8):
            await c.send({"type": "interrupt", "id": f"i{i}", "stream": current, "input": "no", "new_stream": f"s{i}"})
            reply = (await c.recv_until(lambda f, i=i: f.get("ref") == f"i{i}"))[-1]
            if reply["type"] == "stream.start":
                started, current = started + 1, f"s{i}"
            else:
                assert reply["code"] == "rate_limited" and reply["retry_after_ms"] > 0
                limited += 1
        assert started == 3 and limited == 5  # burst 3: the steers count like generates
        assert current in server.sessions[next(iter(server.sessions))].session.streams  # refused: nothing interrupted


async def test_interrupt_with_input_passes_the_token_budget(make_server: Any) -> None:
    async with make_server(token_rate=10) as server, connect(server.url, compression=None) as ws:
        c = RawClient(ws)
        await c.hello()
        await c.send({"type": "generate", "stream": "a", "messages": USER_HI, "params": {"reply_tokens": 30}})
        await c.recv_until(lambda f: f["type"] == "stream.end")
        await c.send({"type": "interrupt", "id": "i", "stream": "a", "input": "more"})
        reply = await c.recv()
        assert reply["code"] == "rate_limited" and reply["ref"] == "i"


# --------------------------------------------------- 3. the interrupt chain


async def test_an_interrupt_chain_is_bounded_and_each_steer_stays_quick(server: Server) -> None:
    size = 300_000
    async with connect(server.url, compression=None, max_size=None) as ws, connect(server.url, compression=None) as bws:
        c, bystander = RawClient(ws), RawClient(bws)
        await c.hello()
        await bystander.hello()
        await bystander.send({"type": "generate", "messages": USER_HI, "params": {"reply_tokens": 100_000, "tokens_per_s": 100}})
        times: list[float] = []

        async def watch() -> None:  # the bystander's deltas as they arrive, while the chain runs
            while True:
                if (await bystander.recv())["type"] == "stream.delta":
                    times.append(time.perf_counter())

        watching = asyncio.ensure_future(watch())
        await until(lambda: len(times) >= 3)
        await c.send(big_generate("c0", tokens_per_s=10))
        current, latencies, refused = "c0", [], None
        for i in range(1, 8):
            t0 = time.perf_counter()
            await c.send({"type": "interrupt", "id": f"i{i}", "stream": current, "input": "y" * size, "new_stream": f"c{i}"})
            reply = (await c.recv_until(lambda f, i=i: f.get("ref") == f"i{i}"))[-1]
            if reply["type"] != "stream.start":
                refused = reply
                break
            latencies.append(time.perf_counter() - t0)
            current = f"c{i}"
        assert refused is not None and refused["code"] == "conversation_too_large", refused
        assert refused["stream"] == current and len(latencies) == 3  # 4 x 300 kB > max_size (1 MiB)
        assert max(latencies) < 1.0  # generous (bench-level: milliseconds)
        await c.send({"type": "cancel", "stream": current, "id": "c"})  # refused as a whole: it still ran
        assert (await c.recv_until(lambda f: f.get("ref") == "c"))[-1]["type"] == "ok"
        watching.cancel()
        assert len(times) >= 3 and max(b - a for a, b in zip(times, times[1:])) < 1.0  # nobody else stalled


# ------------------------------------------- 4. direct messages while away


async def test_a_dm_flood_while_an_agent_is_away_never_costs_it_its_session(server: Server) -> None:
    async with connect(server.url, compression=None) as ws:
        agent = RawClient(ws)
        welcome = await agent.hello(agent="victim")
        await agent.send(big_generate("mine", tokens_per_s=20, ttft_ms=0))
        frames = await agent.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] == 2)
        last_seq = frames[-1]["seq"]
    await until(lambda: server.sessions[welcome["session"]].conn is None)
    answers: dict[str, int] = {}
    async with connect(server.url, compression=None) as ws:
        sender = RawClient(ws)
        await sender.hello()
        for i in range(80):  # 80 x 60 KiB: more than the whole replay log (4 MiB)
            await sender.send({"type": "send", "id": f"d{i}", "to": "victim", "data": "z" * 60 * 1024})
            reply = (await sender.recv_until(lambda f, i=i: f.get("ref") == f"d{i}"))[-1]
            key = reply["type"] if reply["type"] == "ok" else reply["code"]
            answers[key] = answers.get(key, 0) + 1
    accepted = answers.get("ok", 0)
    assert 0 < accepted <= 100 and answers.get("inbox_full", 0) == 80 - accepted  # inbox_messages, inbox_bytes
    async with connect(server.url, compression=None, max_size=None) as ws:
        agent = RawClient(ws)
        welcome2 = await agent.hello(session=welcome["session"], last_seq=last_seq, agent="victim")
        assert welcome2["resumed"] is True  # its own frames were all still in its log
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while sum(f["type"] == "message" for f in seen) < accepted or not any(
                f["type"] == "stream.delta" and f["seq"] > seen[0]["seq"] for f in seen[1:]
            ):
                seen.append(await agent.recv())
    assert seen[0]["seq"] == last_seq + 1  # the replay, exactly where the client was
    seqs = [f["seq"] for f in seen]
    assert seqs == list(range(last_seq + 1, last_seq + 1 + len(seqs)))
    own = [f["index"] for f in seen if f["type"] == "stream.delta"]
    assert own == list(range(3, 3 + len(own)))  # its stream went on, nothing lost
    first_dm = next(i for i, f in enumerate(seen) if f["type"] == "message")
    assert all(f["type"] == "stream.delta" for f in seen[:first_dm])  # the replay first, then what waited


# ------------------------------------------------------ 5. channel history


async def test_channel_history_is_bounded_per_identity(make_server: Any) -> None:
    data = "h" * 60 * 1024
    async with make_server(publish_rate=0) as server, connect(server.url, compression=None) as ws:
        c = RawClient(ws)
        await c.hello()
        for i in range(320):  # ~19 MiB of publications, over 320 channels
            await c.send({"type": "publish", "channel": f"flood:{i}", "data": data, "id": f"p{i}"})
            assert (await c.recv())["type"] == "ok"
    channels = server.backplane.channels.channels  # type: ignore[attr-defined]
    held = sum(len(entry[2]) for channel in channels.values() for entry in channel.history)
    assert held <= 16 << 20  # channel_history_bytes_per_identity (per IP when anonymous), by default
    newest = channels["flood:319"].history
    assert newest and newest[-1][0] == 1  # oldest forgotten first: the newest is there


# ---------------------------------------------------------------- 7. JWT


def nested_jwt(depth: int = 1500) -> str:
    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head, body = enc(b'{"alg":"HS256"}'), enc(("[" * depth + "]" * depth).encode())
    return f"{head}.{body}.{enc(b'x' * 32)}"


async def test_a_deeply_nested_jwt_is_refused_without_a_traceback(
    make_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    token = nested_jwt()
    async with make_server(jwt_secret=SECRET) as server:
        assert await handshake_status(server.url + f"?token={token}") == 401
        async with connect(server.url, compression=None) as ws:
            c = RawClient(ws)
            await c.send({"type": "hello", "protocol": 1, "token": token})
            assert (await c.recv())["code"] == "unauthorized"
            with pytest.raises(ConnectionClosed):
                await c.recv()
            assert ws.close_code == 4401
    assert not errors_logged(caplog)


# -------------------------------------------------------- 8. duplicated headers


@pytest.mark.parametrize(
    "duplicated",
    [
        ["Origin: http://127.0.0.1", "Origin: http://evil.test"],
        ["Authorization: Bearer a", "Authorization: Bearer b"],
        ["Upgrade: websocket"],
    ],
    ids=["origin", "authorization", "upgrade"],
)
async def test_a_duplicated_header_is_a_clean_400(
    make_server: Any, caplog: pytest.LogCaptureFixture, duplicated: list[str]
) -> None:
    async with make_server(api_keys=("k",)) as server:
        assert await raw_request(server.port, upgrade(server.port, *duplicated)) == 400
        assert await raw_request(server.port, upgrade(server.port)) == 101  # and the server goes on
    assert not errors_logged(caplog)


async def test_a_duplicated_authorization_on_metrics_is_a_clean_400(
    make_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_server(metrics_token="m") as server:
        lines = ["GET /metrics HTTP/1.1", "Host: x", "Authorization: Bearer m", "Authorization: Bearer m"]
        assert await raw_request(server.port, lines) == 400
    assert not errors_logged(caplog)


async def test_a_duplicated_header_on_the_http_transport_is_a_clean_400(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    for duplicated in (["Origin: http://127.0.0.1", "Origin: http://evil.test"], ["Authorization: Bearer a"] * 2):
        lines = ["GET /v1/events HTTP/1.1", f"Host: 127.0.0.1:{server.port}", *duplicated]
        assert await raw_request(server.port, lines) == 400
    assert not errors_logged(caplog)

# ----------------------------------------------------------------- 9. names


async def test_a_name_with_a_trailing_newline_is_no_name(server: Server) -> None:
    async with connect(server.url, compression=None) as ws1, connect(server.url, compression=None) as ws2:
        planner, other = RawClient(ws1), RawClient(ws2)
        await planner.hello(agent="planner")
        await other.send({"type": "hello", "protocol": 1, "agent": "planner\n"})
        refused = await other.recv()
        assert (refused["code"], refused["field"]) == ("bad_name", "agent")
        await other.hello()
        for i, request in enumerate(
            (
                {"type": "subscribe", "channel": "room\n"},
                {"type": "publish", "channel": "room\n", "data": 1},
                {"type": "send", "to": "planner\n", "data": 1},
                {"type": "generate", "channel": "room\n", "messages": USER_HI},
            )
        ):
            await other.send({**request, "id": f"r{i}"})
            reply = await other.recv()
            assert (reply["type"], reply.get("code"), reply["ref"]) == ("error", "bad_name", f"r{i}")


# ------------------------------------------------------- 10. rights on resume


async def test_resuming_with_narrower_rights_narrows_the_session(make_server: Any) -> None:
    wide = make_jwt(SECRET, {"sub": "w"})
    narrow = make_jwt(SECRET, {"sub": "w", "channels": {"subscribe": ["public"], "publish": ["public"]}})
    async with make_server(jwt_secret=SECRET) as server:
        async with connect(server.url + f"?token={wide}", compression=None) as ws:
            c = RawClient(ws)
            welcome = await c.hello()
            seen: list[dict[str, Any]] = []
            for name in ("secret", "public"):
                await c.send({"type": "subscribe", "channel": name, "id": name})
                seen += await c.recv_until(lambda f, n=name: f["type"] == "presence" and f["channel"] == n)
            last_seq = max(f.get("seq", 0) for f in seen)
        async with connect(server.url + f"?token={narrow}", compression=None) as ws:
            c = RawClient(ws)
            resumed = await c.hello(session=welcome["session"], last_seq=last_seq)
            assert resumed["resumed"] is True
            dropped = await c.recv_until(lambda f: f["type"] == "error")
            assert (dropped[-1]["code"], dropped[-1]["channel"]) == ("forbidden", "secret")
            await c.send({"type": "publish", "channel": "secret", "data": 1, "id": "p"})
            assert (await c.recv())["code"] == "forbidden"
            await c.send({"type": "subscribe", "channel": "secret", "id": "s"})
            assert (await c.recv())["code"] == "forbidden"
            await c.send({"type": "publish", "channel": "public", "data": 1, "id": "q"})
            assert (await c.recv())["type"] == "ok"
            session = server.sessions[welcome["session"]].session
            assert session.subscriptions == {"public"}
            assert session not in server.backplane.channels.channels["secret"].subscribers  # type: ignore[attr-defined]


# ------------------------------------------ 11. the writer of a violation


async def test_a_connection_closed_for_a_violation_leaks_no_task(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    gc.collect()
    baseline = len(asyncio.all_tasks())
    for i in range(20):
        async with connect(server.url, compression=None) as ws:
            c = RawClient(ws)
            if i % 2:
                await c.send({"type": "generate", "messages": USER_HI})  # before hello: 4400
            else:
                await c.send({"type": "hello", "protocol": 2})  # 4001
            with pytest.raises(ConnectionClosed):
                while True:
                    await c.recv()
            assert ws.close_code == (4400 if i % 2 else 4001)
    await until(lambda: not server.connections)
    await until(lambda: len(asyncio.all_tasks()) <= baseline)
    gc.collect()
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) <= baseline
    assert not [r for r in caplog.records if "Task was destroyed but it is pending" in r.getMessage()]


# ---------------------------------------------------------------- 12. defaults


class TestDefaults:
    def test_per_ip_connections_are_limited_by_default(self) -> None:
        assert 0 < ServerConfig().max_connections_per_ip < ServerConfig().max_connections

    async def test_dns_rebinding_is_refused_and_the_demo_page_is_not(self, server: Server) -> None:
        port = server.port
        rebound = upgrade(port, "Origin: http://rebind.test:%d" % port)
        rebound[1] = f"Host: rebind.test:{port}"
        assert await raw_request(port, rebound) == 403
        other_local_page = upgrade(port, "Origin: http://localhost:3000")
        assert await raw_request(port, other_local_page) == 403
        for own in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
            page = upgrade(port, f"Origin: {own}")
            page[1] = f"Host: {own.removeprefix('http://')}"
            assert await raw_request(port, page) == 101
        assert await raw_request(port, upgrade(port)) == 101  # no Origin: not a browser

    async def test_metrics_are_not_public_by_default(self, server: Server) -> None:
        lines = ["GET /metrics HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
        assert await raw_request(server.port, lines) == 200  # loopback
        assert await raw_request(server.port, [*lines, "X-Forwarded-For: 203.0.113.9"]) == 403  # via a proxy
        refused = server.http.metrics_refusal  # a peer that is not local
        from websockets.datastructures import Headers

        assert refused(Headers(), "203.0.113.9") is not None and refused(Headers(), "::ffff:127.0.0.1") is None


# -------------------------------------------------------------------- 13. JWT


async def test_a_jwt_with_junk_appended_is_refused(make_server: Any) -> None:
    good = make_jwt(SECRET, {"sub": "a", "exp": time.time() + 60})
    async with make_server(jwt_secret=SECRET) as server:
        assert await handshake_status(server.url + f"?token={good}") == 101
        for forged in (good + "!!", good + "~", good + "A", good[:-1] + chr(ord(good[-1]) ^ 1)):
            assert await handshake_status(server.url + f"?token={forged}") == 401, forged


async def test_the_metrics_token_is_compared_in_constant_time(make_server: Any, monkeypatch: Any) -> None:
    import hmac

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with make_server(metrics_token="m") as server:
        base = ["GET /metrics HTTP/1.1", "Host: x"]
        assert await raw_request(server.port, [*base, "Authorization: Bearer m"]) == 200
        assert await raw_request(server.port, [*base, "Authorization: Bearer n"]) == 401
        assert await raw_request(server.port, [*base, "Authorization: Bearer \xe9"]) == 401  # not ASCII: no 500
    assert (b"Bearer n", b"Bearer m") in compared
