"""Authentication, Origin, ACLs, limits, metrics, readiness and graceful drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import wsserver
from tests.helpers import RawClient, free_port, until
from wsserver.server.auth import Authenticator, make_jwt, origin_allowed, token_from_request
from wsserver.config import ServerConfig
from wsserver.server import Server

SECRET = "s3cret-for-tests"
KEY = "key-1234"


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def handshake_status(url: str, **kwargs: Any) -> int:
    """The HTTP status of a refused handshake (101 if it was accepted)."""
    try:
        async with asyncio.timeout(5):
            ws = await connect(url, compression=None, **kwargs)
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


class TestAuthUnits:
    def test_api_keys_and_jwt(self) -> None:
        auth = Authenticator(api_keys=[KEY], jwt_secret=SECRET, clock=lambda: 1000.0)
        assert auth.enabled
        assert auth.verify(KEY) is not None and auth.verify(KEY).id.startswith("key:")  # type: ignore[union-attr]
        assert auth.verify("nope") is None
        ok = make_jwt(SECRET, {"sub": "alice", "exp": 2000})
        assert auth.verify(ok).id == "sub:alice"  # type: ignore[union-attr]
        assert auth.verify(make_jwt(SECRET, {"sub": "alice", "exp": 999})) is None  # expired
        assert auth.verify(make_jwt("other", {"sub": "alice"})) is None  # wrong signature
        assert auth.verify(make_jwt(SECRET, {"sub": "alice", "nbf": 5000})) is None  # not yet
        assert auth.verify(make_jwt(SECRET, {"exp": 2000})) is None  # no sub
        none_alg = ok.split(".")
        forged = ".".join([make_jwt(SECRET, {})[:0] + "eyJhbGciOiJub25lIn0", none_alg[1], ""])
        assert auth.verify(forged) is None
        assert not Authenticator().enabled

    def test_channel_claims(self) -> None:
        auth = Authenticator(jwt_secret=SECRET)
        token = make_jwt(SECRET, {"sub": "w", "channels": {"subscribe": ["team:*"], "publish": []}})
        rules = auth.verify(token).rules  # type: ignore[union-attr]
        assert rules.may_subscribe("team:a") and not rules.may_subscribe("other")
        assert not rules.may_publish("team:a")

    def test_credential_sources(self) -> None:
        assert token_from_request("/", "Bearer abc") == "abc"
        assert token_from_request("/?token=xyz", None) == "xyz"
        assert token_from_request("/", "Basic abc") is None
        assert token_from_request("/", None) is None

    def test_origins(self) -> None:
        assert origin_allowed(None, "example.com", [])  # not a browser
        # the server's own page, reached by an address (or localhost)
        assert origin_allowed("http://127.0.0.1:8765", "127.0.0.1:8765", [])
        assert origin_allowed("http://localhost:8765", "localhost:8765", [])
        assert origin_allowed("http://[::1]:8765", "[::1]:8765", [])
        assert origin_allowed("http://192.168.1.5:8765", "192.168.1.5:8765", [])
        # a DNS name agreeing with Host proves nothing (DNS rebinding) ...
        assert not origin_allowed("http://evil.test:8765", "evil.test:8765", [])
        assert not origin_allowed("https://example.com", "example.com", [])
        # ... and other local pages are not the server's own
        assert not origin_allowed("http://localhost:3000", "127.0.0.1:8765", [])
        assert not origin_allowed("http://127.0.0.1:3000", "127.0.0.1:8765", [])
        assert not origin_allowed("null", "127.0.0.1:8765", [])
        assert not origin_allowed("https://evil.test", "example.com", [])
        assert origin_allowed("https://app.test", "example.com", ["https://app.test"])
        assert origin_allowed("https://example.com", "example.com", ["https://example.com"])


class TestHandshake:
    async def test_no_auth_by_default(self, server: Server) -> None:
        assert await handshake_status(server.url) == 101

    async def test_wrong_key_in_handshake_is_401(self, make_server: Any) -> None:
        async with make_server(api_keys=(KEY,)) as server:
            assert await handshake_status(server.url, additional_headers={"Authorization": "Bearer bad"}) == 401
            assert await handshake_status(server.url + "?token=bad") == 401
            assert await handshake_status(server.url, additional_headers={"Authorization": f"Bearer {KEY}"}) == 101
            assert await handshake_status(server.url + f"?token={KEY}") == 101

    async def test_missing_credential_needs_hello_token(self, make_server: Any) -> None:
        async with make_server(api_keys=(KEY,)) as server:
            async with connect(server.url, compression=None) as ws:
                c = RawClient(ws)
                await c.send({"type": "hello", "protocol": 1})
                err = await c.recv()
                assert err["type"] == "error" and err["code"] == "unauthorized"
                with pytest.raises(ConnectionClosed):
                    await c.recv()
                assert ws.close_code == 4401
            async with connect(server.url, compression=None) as ws:
                c = RawClient(ws)
                welcome = await c.hello(token=KEY)
                assert welcome["resumed"] is False

    async def test_expired_jwt_is_refused(self, make_server: Any) -> None:
        async with make_server(jwt_secret=SECRET) as server:
            expired = make_jwt(SECRET, {"sub": "a", "exp": time.time() - 10})
            assert await handshake_status(server.url + f"?token={expired}") == 401
            good = make_jwt(SECRET, {"sub": "a", "exp": time.time() + 60})
            assert await handshake_status(server.url + f"?token={good}") == 101

    async def test_forged_origin_is_403(self, make_server: Any) -> None:
        async with make_server(allowed_origins=("https://app.example",)) as server:
            assert await handshake_status(server.url, origin="https://evil.example") == 403
            assert await handshake_status(server.url, origin="https://app.example") == 101
            assert await handshake_status(server.url, origin=f"http://127.0.0.1:{server.port}") == 101

    async def test_connection_limits_answer_503(self, make_server: Any) -> None:
        async with make_server(max_connections_per_ip=2) as server:
            a = await connect(server.url, compression=None)
            b = await connect(server.url, compression=None)
            try:
                async with asyncio.timeout(2):
                    while len(server.connections) < 2:
                        await asyncio.sleep(0.01)
                status = await handshake_status(server.url)
                assert status == 503
            finally:
                await a.close()
                await b.close()
            async with asyncio.timeout(2):
                while server.connections:
                    await asyncio.sleep(0.01)
            assert await handshake_status(server.url) == 101


class TestIdentity:
    async def test_other_identitys_session_cannot_be_resumed(self, make_server: Any) -> None:
        alice = make_jwt(SECRET, {"sub": "alice"})
        mallory = make_jwt(SECRET, {"sub": "mallory"})
        async with make_server(jwt_secret=SECRET) as server:
            async with connect(server.url + f"?token={alice}", compression=None) as ws:
                c = RawClient(ws)
                welcome = await c.hello()
                await c.send({"type": "generate", "messages": [{"role": "user", "content": "secret"}], "params": {"reply_tokens": 500, "tokens_per_s": 100}})
                await c.recv()
            async with connect(server.url + f"?token={mallory}", compression=None) as ws:
                m = RawClient(ws)
                stolen = await m.hello(session=welcome["session"], last_seq=0)
                assert stolen["resumed"] is False and stolen["session"] != welcome["session"]
                await m.send({"type": "cancel", "stream": "s1", "id": "c"})
                assert (await m.recv())["code"] == "unknown_stream"  # not alice's stream
            assert server.sessions[welcome["session"]].session.streams  # still running
            async with connect(server.url + f"?token={alice}", compression=None) as ws:
                again = await RawClient(ws).hello(session=welcome["session"], last_seq=0)
                assert again["resumed"] is True

    async def test_agent_name_of_another_identity(self, make_server: Any) -> None:
        async with make_server(jwt_secret=SECRET) as server:
            async with connect(server.url + "?token=" + make_jwt(SECRET, {"sub": "a"}), compression=None) as ws:
                await RawClient(ws).hello(agent="planner")
                async with connect(server.url + "?token=" + make_jwt(SECRET, {"sub": "b"}), compression=None) as ws2:
                    b = RawClient(ws2)
                    await b.send({"type": "hello", "protocol": 1, "agent": "planner"})
                    assert (await b.recv())["code"] == "agent_name_taken"

    async def test_channel_acl_is_forbidden(self, make_server: Any) -> None:
        token = make_jwt(SECRET, {"sub": "w", "channels": {"subscribe": ["team:*"], "publish": ["team:out"]}})
        async with make_server(jwt_secret=SECRET, channel_publish=("public",)) as server:
            async with connect(server.url + f"?token={token}", compression=None) as ws:
                c = RawClient(ws)
                await c.hello()
                await c.send({"type": "subscribe", "channel": "admin", "id": "a"})
                assert (await c.recv())["code"] == "forbidden"
                await c.send({"type": "subscribe", "channel": "team:x", "id": "b"})
                assert (await c.recv())["type"] == "subscribed"
                await c.recv()  # own join
                await c.send({"type": "publish", "channel": "team:x", "data": 1, "id": "p"})
                assert (await c.recv())["code"] == "forbidden"
                await c.send({"type": "generate", "channel": "team:x", "messages": [{"role": "user", "content": "x"}], "id": "g"})
                assert (await c.recv())["code"] == "forbidden"
                await c.send({"type": "publish", "channel": "team:out", "data": 1, "id": "q"})
                assert (await c.recv())["type"] == "ok"
            # the server's own rules for API-key (and anonymous) identities
            async with make_server(channel_publish=("public",)) as plain, connect(plain.url, compression=None) as ws:
                c = RawClient(ws)
                await c.hello()
                await c.send({"type": "publish", "channel": "secret", "data": 1, "id": "p"})
                assert (await c.recv())["code"] == "forbidden"


class TestRateLimits:
    async def test_generate_rate_per_identity(self, make_server: Any) -> None:
        async with make_server(generate_rate=2) as server:  # 2 per minute, burst 2
            async with connect(server.url, compression=None) as ws:
                c = RawClient(ws)
                await c.hello()
                for i in range(3):
                    await c.send({"type": "generate", "id": f"g{i}", "messages": [{"role": "user", "content": "x"}], "params": {"reply_tokens": 2}})
                frames = await c.recv_until(lambda f: f.get("ref") == "g2")
            limited = frames[-1]
            assert limited["code"] == "rate_limited" and limited["retry_after_ms"] > 1000
            # the same identity on another connection shares the budget
            async with connect(server.url, compression=None) as ws:
                c = RawClient(ws)
                await c.hello()
                await c.send({"type": "generate", "id": "x", "messages": [{"role": "user", "content": "x"}]})
                assert (await c.recv())["code"] == "rate_limited"

    async def test_token_budget(self, make_server: Any) -> None:
        async with make_server(token_rate=10) as server, connect(server.url, compression=None) as ws:
            c = RawClient(ws)
            await c.hello()
            await c.send({"type": "generate", "id": "a", "messages": [{"role": "user", "content": "x"}], "params": {"reply_tokens": 30}})
            await c.recv_until(lambda f: f["type"] == "stream.end")
            await c.send({"type": "generate", "id": "b", "messages": [{"role": "user", "content": "x"}]})
            err = await c.recv()
            assert err["code"] == "rate_limited" and err["retry_after_ms"] > 0

    async def test_message_rate_and_abuse_close_while_honest_traffic_flows(self, make_server: Any) -> None:
        async with make_server(message_rate=50, abuse_threshold=60) as server:
            async with connect(server.url, compression=None, max_queue=None) as honest_ws, \
                    connect(server.url, compression=None, max_queue=None) as abuser_ws:
                honest, abuser = RawClient(honest_ws), RawClient(abuser_ws)
                await honest.hello()
                await abuser.hello()
                await honest.send({"type": "generate", "messages": [{"role": "user", "content": "x"}], "params": {"reply_tokens": 200, "tokens_per_s": 400}})
                with pytest.raises(ConnectionClosed):
                    for _ in range(1000):
                        await abuser.send({"type": "ping"})
                        await asyncio.sleep(0)
                    async with asyncio.timeout(5):
                        while True:
                            await abuser_ws.recv()
                frames = await honest.recv_until(lambda f: f["type"] == "stream.end")
                assert frames[-1]["reason"] == "complete"
            assert abuser_ws.close_code == 1008


class TestObservability:
    async def test_metrics_parse_and_move(self, server: Server) -> None:
        def scrape() -> dict[str, float]:
            status, headers, body = http_get(f"http://127.0.0.1:{server.port}/metrics")
            assert status == 200 and headers["Content-Type"].startswith("text/plain")
            values: dict[str, float] = {}
            for family in text_string_to_metric_families(body.decode()):
                for sample in family.samples:
                    key = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items()))
                    values[key] = sample.value
            return values

        before = await asyncio.to_thread(scrape)
        async with wsserver.connect(server.url) as c:
            stream = await c.generate([{"role": "user", "content": "hi"}], params={"reply_tokens": 5})
            await stream.wait()
            await c.send_raw("{")
            await c.ping()
            during = await asyncio.to_thread(scrape)
        assert during["wsserver_connections_open"] == before["wsserver_connections_open"] + 1
        assert during["wsserver_streams_ended_total{reason=complete}"] == 1
        assert during["wsserver_errors_total{code=bad_json}"] == 1
        assert during["wsserver_ttft_seconds_count"] == 1
        assert during["wsserver_sessions{state=attached}"] == 1
        assert during["wsserver_messages_in_total{type=generate}"] == 1
        assert during["wsserver_messages_in_total{type=invalid}"] == 1
        assert during["wsserver_frames_out_total"] >= 5  # start, deltas (maybe merged), end, error, pong
        assert during["wsserver_bytes_out_total"] > before.get("wsserver_bytes_out_total", 0)
        assert "wsserver_delivery_seconds_count" in during  # sampled only when a socket lags

    async def test_gc_pauses_are_timed_by_generation(self, make_server: Any) -> None:
        import gc

        async with make_server() as server:
            gc.collect(0)
            gc.collect(2)
            _, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/metrics")
            samples = [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]
            counts = {s.labels["generation"]: s.value for s in samples if s.name == "wsserver_gc_pause_seconds_count"}
            longest = {s.labels["generation"]: s.value for s in samples if s.name == "wsserver_gc_pause_max_seconds"}
            assert counts["0"] >= 1 and counts["2"] >= 1, counts
            assert longest["2"] > 0, longest
            assert server.telemetry.gc in gc.callbacks
        assert server.telemetry.gc not in gc.callbacks  # removed when the server closes

    async def test_metrics_token_and_off(self, make_server: Any) -> None:
        async with make_server(metrics_token="m") as server:
            url = f"http://127.0.0.1:{server.port}/metrics"
            assert (await asyncio.to_thread(http_get, url))[0] == 401
            assert (await asyncio.to_thread(http_get, url, {"Authorization": "Bearer m"}))[0] == 200
        async with make_server(metrics=False) as server:
            assert (await asyncio.to_thread(http_get, f"http://127.0.0.1:{server.port}/metrics"))[0] == 404

    async def test_readyz_and_drain(self, make_server: Any) -> None:
        server = make_server(drain_timeout=3.0, reconnect_ms=250)
        await server.start()
        ready = f"http://127.0.0.1:{server.port}/readyz"
        assert (await asyncio.to_thread(http_get, ready))[0] == 200
        ws_short = await connect(server.url, compression=None, max_queue=None)
        ws_long = await connect(server.url, compression=None, max_queue=None)
        short, long = RawClient(ws_short), RawClient(ws_long)
        await short.hello()
        await long.hello()
        await short.send({"type": "generate", "messages": [{"role": "user", "content": "a"}], "params": {"reply_tokens": 20, "tokens_per_s": 40}})
        await long.send({"type": "generate", "messages": [{"role": "user", "content": "b"}], "params": {"reply_tokens": 100_000, "tokens_per_s": 40}})
        await short.recv()
        await long.recv()
        t0 = time.monotonic()
        drain = asyncio.ensure_future(server.drain())
        await until(lambda: server.draining)
        assert (await asyncio.to_thread(http_get, ready))[0] == 503
        assert server.draining
        short_frames = await short.recv_until(lambda f: f["type"] == "stream.end")
        long_frames = await long.recv_until(lambda f: f["type"] == "stream.end")
        await drain
        assert time.monotonic() - t0 < 3.0 + 1.5
        shutdown = [f for f in short_frames if f["type"] == "shutdown"]
        assert shutdown and shutdown[0]["reconnect_ms"] == 250
        assert short_frames[-1]["reason"] == "complete"  # finished within the drain
        end = long_frames[-1]
        assert end["reason"] == "error" and end["error"]["code"] == "shutdown"
        for ws in (ws_short, ws_long):
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            assert ws.close_code == 1001


def test_sigterm_drains_and_exits_zero(tmp_path: Any) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsserver", "serve", "--port", str(port), "--drain-timeout", "2", "--ping-interval", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening" in line, line

        async def client() -> tuple[list[dict[str, Any]], int | None]:
            async with connect(f"ws://127.0.0.1:{port}/", compression=None, max_queue=None) as ws:
                c = RawClient(ws)
                await c.hello()
                await c.send({"type": "generate", "messages": [{"role": "user", "content": "x"}], "params": {"reply_tokens": 100_000, "tokens_per_s": 20}})
                await c.recv()
                signalled.append(time.monotonic())
                proc.send_signal(signal.SIGTERM)
                frames: list[dict[str, Any]] = []
                with pytest.raises(ConnectionClosed):
                    async with asyncio.timeout(10):
                        while True:
                            frames.append(orjson.loads(await ws.recv()))
                return frames, ws.close_code

        signalled: list[float] = []
        frames, code = asyncio.run(client())
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - signalled[0] < 2 + 1  # drain_timeout + 1 s
        assert any(f["type"] == "shutdown" for f in frames)
        assert frames[-1]["type"] == "stream.end" and frames[-1]["error"]["code"] == "shutdown"
        assert code == 1001
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_config_file_and_precedence(tmp_path: Any) -> None:
    from wsserver.config import load_file

    path = tmp_path / "wsserver.toml"
    path.write_text('max_streams = 3\nallowed_origins = ["https://a"]\nport = 9000\n')
    values = load_file(path)
    config = ServerConfig.from_env({"WSSERVER_PORT": "9100"}, file_values=values, host="0.0.0.0")
    assert (config.max_streams, config.port, config.host, config.allowed_origins) == (3, 9100, "0.0.0.0", ("https://a",))
    bad = tmp_path / "bad.toml"
    bad.write_text("max_streams = 'many'\n")
    with pytest.raises(SystemExit, match="max_streams"):
        ServerConfig.from_env({}, file_values=load_file(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("nope = 1\n")
    with pytest.raises(SystemExit, match="nope"):
        load_file(unknown)


async def test_a_refused_hello_may_be_retried_with_the_handshake_credential(make_server: Any) -> None:
    async with make_server(api_keys=(KEY,)) as server:
        url = server.url + f"?token={KEY}"
        async with connect(url, compression=None) as ws1, connect(url, compression=None) as ws2:
            await RawClient(ws1).hello(agent="solo")
            b = RawClient(ws2)
            await b.send({"type": "hello", "protocol": 1, "agent": "solo"})
            assert (await b.recv())["code"] == "agent_name_taken"
            welcome = await b.hello(agent="other")  # same connection, same credential
            assert welcome["type"] == "welcome"
