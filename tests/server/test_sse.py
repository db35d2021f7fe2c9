"""The HTTP transport (PROTOCOL.md "HTTP transport"): GET /v1/events + POST /v1/send, end to end on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

import socket

import httpx2
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.helpers import USER_HI, RawClient, SseClosed, SseRaw, until
from wsserver.server import Server


def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


async def raw_http(server: Server, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh TCP connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()


class TestStream:
    async def test_hello_generate_and_event_ids_are_seqs(self, server: Server) -> None:
        client = await SseRaw.open(base(server))
        try:
            welcome = await client.hello()
            assert welcome["resumed"] is False and client.ids == [None]  # welcome has no seq
            await client.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"max_tokens": 5}})
            frames = await client.recv_until(lambda f: f["type"] == "stream.end")
            assert frames[0]["type"] == "stream.start" and frames[0]["ref"] == "g"
            assert client.ids[1:] == [f["seq"] for f in frames]
            assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        finally:
            await client.aclose()

    async def test_an_array_body_is_several_frames_in_order(self, server: Server) -> None:
        client = await SseRaw.open(base(server))
        try:
            response = await client.post([{"type": "hello", "protocol": 1}, {"type": "ping", "id": "p1"},
                                          {"type": "ping", "id": "p2"}])
            assert response.status_code == 202 and response.json() == {"accepted": 3}
            frames = [await client.recv() for _ in range(3)]
            assert [f["type"] for f in frames] == ["welcome", "pong", "pong"]
            assert [f["ref"] for f in frames[1:]] == ["p1", "p2"]
        finally:
            await client.aclose()

    async def test_cancel_and_steer(self, make_server: Any) -> None:
        async with make_server(sim_tokens_per_s=200.0) as server:
            client = await SseRaw.open(base(server))
            try:
                await client.hello()
                await client.send({"type": "generate", "id": "g", "stream": "a", "messages": USER_HI,
                                   "params": {"max_tokens": 1000}})
                await client.recv_until(lambda f: f["type"] == "stream.delta")
                await client.send({"type": "interrupt", "id": "i", "stream": "a", "input": "more", "new_stream": "b"})
                frames = await client.recv_until(lambda f: f["type"] == "stream.start" and f["stream"] == "b")
                assert any(f["type"] == "stream.end" and f["reason"] == "interrupted" for f in frames)
                assert frames[-1]["steered_from"] == "a"
                await client.send({"type": "cancel", "id": "c", "stream": "b"})
                frames = await client.recv_until(lambda f: f["type"] == "ok" and f["ref"] == "c")
                assert any(f["type"] == "stream.end" and f["reason"] == "cancelled" for f in frames)
            finally:
                await client.aclose()

    async def test_channels_and_direct_messages_between_transports(self, server: Server) -> None:
        sse = await SseRaw.open(base(server))
        try:
            await sse.hello(agent="over-http")
            async with connect(server.url) as ws_conn:
                ws = RawClient(ws_conn)
                await ws.hello(agent="over-ws")
                await sse.send({"type": "subscribe", "id": "s", "channel": "room"})
                await sse.recv_until(lambda f: f["type"] == "subscribed")
                await ws.send({"type": "publish", "id": "p", "channel": "room", "data": {"n": 1}})
                got = await sse.recv_until(lambda f: f["type"] == "message" and f.get("channel") == "room")
                assert got[-1]["data"] == {"n": 1} and got[-1]["from"] == "over-ws"
                assert sse.ids[-1] is None  # channel traffic has an offset, no seq
                await sse.send({"type": "send", "id": "d", "to": "over-ws", "data": "hi ws"})
                dm = await ws.recv_until(lambda f: f["type"] == "message")
                assert dm[-1]["from"] == "over-http" and dm[-1]["data"] == "hi ws"
                await ws.send({"type": "send", "id": "d2", "to": "over-http", "data": "hi http"})
                got = await sse.recv_until(lambda f: f["type"] == "message" and "seq" in f)
                assert got[-1]["data"] == "hi http" and sse.ids[-1] == got[-1]["seq"]
        finally:
            await sse.aclose()

    async def test_heartbeats_are_comments(self, make_server: Any) -> None:
        async with make_server(ping_interval=0.05) as server:
            client = await SseRaw.open(base(server))
            try:
                await client.hello()
                with pytest.raises(TimeoutError):
                    await client.recv(timeout=0.5)  # comments only
                assert client.comments >= 2
            finally:
                await client.aclose()

    async def test_no_hello_in_time_closes_4008(self, make_server: Any) -> None:
        async with make_server(hello_timeout=0.2) as server:
            client = await SseRaw.open(base(server))
            try:
                with pytest.raises(SseClosed) as closed:
                    await client.recv()
                assert closed.value.code == 4008
                response = await client.post({"type": "hello", "protocol": 1})
                assert response.status_code == 404 and response.json()["code"] == "unknown_connection"
            finally:
                await client.aclose()

    async def test_a_request_before_hello_gets_its_error_then_4400(self, server: Server) -> None:
        client = await SseRaw.open(base(server))
        try:
            await client.send({"type": "ping"})
            err = await client.recv()
            assert err["type"] == "error" and err["code"] == "not_hello"
            with pytest.raises(SseClosed):
                await client.recv()
            assert client.close_code == 4400
        finally:
            await client.aclose()

    async def test_drain_sends_shutdown_then_closes_1001(self, server: Server) -> None:
        client = await SseRaw.open(base(server))
        try:
            await client.hello()
            drain = asyncio.get_running_loop().create_task(server.drain(timeout=0.1))
            frame = await client.recv()
            assert frame["type"] == "shutdown"
            with pytest.raises(SseClosed):
                await client.recv()
            assert client.close_code == 1001
            await drain
        finally:
            await client.aclose()


class TestResume:
    async def test_last_event_id_resumes_exactly_once(self, make_server: Any) -> None:
        async with make_server(sim_tokens_per_s=300.0) as server:
            first = await SseRaw.open(base(server))
            welcome = await first.hello()
            await first.send({"type": "generate", "id": "g", "messages": USER_HI, "params": {"max_tokens": 60}})
            got = await first.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= 3)
            await first.aclose()  # the stream drops mid-generation
            last = got[-1]["seq"]
            second = await SseRaw.open(base(server), params={"session": welcome["session"]},
                                       headers={"Last-Event-ID": str(last)})
            try:
                again = await second.recv()
                assert again["type"] == "welcome" and again["resumed"] is True
                rest = await second.recv_until(lambda f: f["type"] == "stream.end")
                seqs = [f["seq"] for f in got] + [f["seq"] for f in rest]
                assert seqs == list(range(1, len(seqs) + 1))  # nothing lost, nothing twice
                indexes = [f["index"] for f in got + rest if f["type"] == "stream.delta"]
                assert indexes == list(range(len(indexes)))
            finally:
                await second.aclose()

    async def test_snapshot_resume(self, make_server: Any) -> None:
        async with make_server(sim_tokens_per_s=200.0) as server:
            first = await SseRaw.open(base(server))
            welcome = await first.hello()
            await first.send({"type": "generate", "messages": USER_HI, "params": {"max_tokens": 400}})
            await first.recv_until(lambda f: f["type"] == "stream.delta" and f["index"] >= 2)
            await first.aclose()
            second = await SseRaw.open(base(server), params={"session": welcome["session"], "snapshot": "1"},
                                       headers={"Last-Event-ID": "0"})
            try:
                assert (await second.recv())["resumed"] is True
                snap = await second.recv()
                assert snap["type"] == "stream.snapshot" and snap["index"] >= 3 and second.ids[-1] == snap["seq"]
            finally:
                await second.aclose()

    async def test_a_websocket_resume_takes_the_session_over_4000(self, server: Server) -> None:
        sse = await SseRaw.open(base(server))
        try:
            welcome = await sse.hello()
            async with connect(server.url) as ws_conn:
                ws = RawClient(ws_conn)
                again = await ws.hello(session=welcome["session"], last_seq=0)
                assert again["resumed"] is True
                with pytest.raises(SseClosed):
                    await sse.recv()
                assert sse.close_code == 4000
        finally:
            await sse.aclose()

    async def test_last_event_id_not_a_number_is_400(self, server: Server) -> None:
        response = await SseRaw.open(base(server), params={"session": "x"}, headers={"Last-Event-ID": "7a"},
                                     expect=400)
        body = response.json()
        assert body["type"] == "error" and body["code"] == "bad_message" and body["field"] == "Last-Event-ID"

    async def test_last_event_id_without_a_session_is_400(self, server: Server) -> None:
        response = await SseRaw.open(base(server), headers={"Last-Event-ID": "3"}, expect=400)
        assert response.json()["field"] == "session"

    async def test_last_event_id_beyond_the_log_is_resume_failed(self, server: Server) -> None:
        first = await SseRaw.open(base(server))
        welcome = await first.hello()
        await first.send({"type": "ping", "id": "p"})
        await first.recv()
        await first.aclose()
        second = await SseRaw.open(base(server), params={"session": welcome["session"]},
                                   headers={"Last-Event-ID": "999"})
        try:
            err = await second.recv()
            assert err["type"] == "error" and err["code"] == "resume_failed"
            fresh = await second.recv()
            assert fresh["type"] == "welcome" and fresh["resumed"] is False
            assert fresh["session"] != welcome["session"]
        finally:
            await second.aclose()


class TestBadInput:
    async def test_unknown_connection_is_404(self, server: Server) -> None:
        client = await SseRaw.open(base(server))
        try:
            response = await client.post({"type": "hello", "protocol": 1}, token="no-such-token")
            assert response.status_code == 404
            assert response.json() == {"type": "error", "code": "unknown_connection",
                                       "message": response.json()["message"]}
        finally:
            await client.aclose()

    async def test_foreign_connection_is_403(self, make_server: Any) -> None:
        async with make_server(api_keys=("alice-key", "bob-key")) as server:
            client = await SseRaw.open(base(server), headers={"Authorization": "Bearer alice-key"})
            try:
                await client.hello()
                response = await client.post({"type": "ping"}, headers={"Authorization": "Bearer bob-key"})
                assert response.status_code == 403 and response.json()["code"] == "forbidden"
                response = await client.post({"type": "ping"}, headers={"Authorization": "Bearer wrong"})
                assert response.status_code == 401 and response.json()["code"] == "unauthorized"
                response = await client.post({"type": "ping", "id": "ok"}, headers={"Authorization": "Bearer alice-key"})
                assert response.status_code == 202
                assert (await client.recv())["ref"] == "ok"
            finally:
                await client.aclose()

    async def test_a_foreign_origin_is_403(self, server: Server) -> None:
        client = await SseRaw.open(base(server), headers={"Origin": f"http://127.0.0.1:{server.port}"})
        try:
            response = await client.post({"type": "ping"}, headers={"Origin": "https://evil.example"})
            assert response.status_code == 403 and response.json()["code"] == "forbidden"
        finally:
            await client.aclose()
        refused = await SseRaw.open(base(server), headers={"Origin": "https://evil.example"}, expect=403)
        assert refused.json()["code"] == "forbidden"

    async def test_wrong_credential_on_the_stream_is_401(self, make_server: Any) -> None:
        async with make_server(api_keys=("k",)) as server:
            refused = await SseRaw.open(base(server), headers={"Authorization": "Bearer nope"}, expect=401)
            assert refused.json()["code"] == "unauthorized"

    async def test_body_over_max_size_is_413_unread(self, make_server: Any) -> None:
        async with make_server(max_size=1000) as server:
            client = await SseRaw.open(base(server))
            try:
                await client.hello()
                big = {"type": "publish", "channel": "c", "data": "x" * 2000}
                response = await client.post(big)
                assert response.status_code == 413 and response.json()["code"] == "message_too_large"
                await client.send({"type": "ping", "id": "still"})  # the stream is unaffected
                assert (await client.recv())["ref"] == "still"
            finally:
                await client.aclose()

    async def test_non_json_body_is_400(self, server: Server) -> None:
        client = await SseRaw.open(base(server))
        try:
            await client.hello()
            response = await client.post(b"hello?")
            assert response.status_code == 400 and response.json()["code"] == "bad_json"
            await client.send({"type": "ping", "id": "after"})
            assert (await client.recv())["ref"] == "after"
        finally:
            await client.aclose()

    async def test_wrong_methods_and_paths(self, server: Server) -> None:
        async with httpx2.AsyncClient() as http:
            response = await http.get(base(server) + "/v1/send")
            assert response.status_code == 405 and "POST" in response.headers["allow"]
            response = await http.get(base(server) + "/v1/nothing")
            assert response.status_code == 404 and response.json()["code"] == "bad_request"
            response = await http.post(base(server) + "/v1/send", content=b"{}")
            assert response.status_code == 400 and response.json()["field"] == "connection"


class TestHttp:
    """The Front (server/front.py): routing, keep-alive, and what could smuggle or starve."""

    async def test_keep_alive_then_a_websockets_route_on_the_same_connection(self, server: Server) -> None:
        request = (b"POST /v1/send?connection=x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"
                   b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        data = await raw_http(server, request)
        assert data.startswith(b"HTTP/1.1 404 ") and b"unknown_connection" in data
        assert b"HTTP/1.1 200 OK" in data and data.endswith(b"OK\n")  # websockets answered /healthz

    async def test_transfer_encoding_is_refused_and_closes(self, server: Server) -> None:
        request = (b"POST /v1/send?connection=x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/events HTTP/1.1\r\nHost: a\r\n\r\n")
        data = await raw_http(server, request)
        assert data.startswith(b"HTTP/1.1 411 ") and data.count(b"HTTP/1.1") == 1  # nothing smuggled

    async def test_conflicting_content_lengths_are_400(self, server: Server) -> None:
        request = b"POST /v1/send?connection=x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
        data = await raw_http(server, request)
        assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1") == 1

    async def test_oversized_head_is_431(self, server: Server) -> None:
        request = b"GET /v1/events HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 100) for i in range(200))
        data = await raw_http(server, request + b"\r\n")
        assert data.startswith(b"HTTP/1.1 431 ")

    async def test_bad_header_line_is_400(self, server: Server) -> None:
        data = await raw_http(server, b"GET /v1/events HTTP/1.1\r\n bad folded\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400 ")

    async def test_slow_head_is_cut_after_open_timeout(self, make_server: Any) -> None:
        async with make_server(open_timeout=0.3) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /v1/events HTTP/1.1\r\nHost: a\r\n")  # and never the end of the head
            async with asyncio.timeout(5):
                assert await reader.read(-1) == b""  # closed by the server
            writer.close()

    async def test_expect_100_continue(self, server: Server) -> None:
        request = b"POST /v1/send?connection=x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        data = await raw_http(server, request)
        assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 ")

    async def test_websocket_upgrade_still_works(self, server: Server) -> None:
        async with connect(server.url) as ws_conn:
            assert (await RawClient(ws_conn).hello())["type"] == "welcome"


class TestSlowConsumer:
    async def test_a_stream_nobody_reads_is_closed_and_the_session_resumes(self, make_server: Any) -> None:
        async with make_server(publish_rate=0, message_rate=0, slow_consumer_bytes=128 * 1024) as server:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /v1/events HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            token = orjson.loads((await reader.readuntil(b"\n\n")).split(b"data: ", 1)[1])["connection"]
            (conn,) = server.sse.connections.values()
            conn.front.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            async with httpx2.AsyncClient() as http:
                url = base(server) + "/v1/send"
                body = b'[{"type":"hello","protocol":1},{"type":"subscribe","id":"s","channel":"fan"}]'
                assert (await http.post(url, params={"connection": token}, content=body)).status_code == 202
                welcome = orjson.loads((await reader.readuntil(b"\n\n")).split(b"data: ", 1)[1])
                async with connect(server.url) as ws_conn:
                    pub = RawClient(ws_conn)
                    await pub.hello()
                    for i in range(300):  # ~600 KB the stalled reader never takes
                        await pub.send({"type": "publish", "channel": "fan", "data": "x" * 2000})
                        if server.stats["slow_consumer_disconnects"]:
                            break
                    await until(lambda: server.stats["slow_consumer_disconnects"] >= 1, timeout=20)
                    assert server.stats["slow_consumer_disconnects"] == 1
                    await until(lambda: not server.sse.connections, timeout=20)  # aborted after close_timeout at worst
                    assert not server.sse.connections
            writer.close()
            again = await SseRaw.open(base(server), params={"session": welcome["session"]},
                                      headers={"Last-Event-ID": "1"})
            try:
                assert (await again.recv())["resumed"] is True
            finally:
                await again.aclose()


class TestVectorsOverBothTransports:
    """protocol/vectors/client-invalid, sent over a WebSocket and over the HTTP transport: the same error frame."""

    from tests.wire.test_messages import vectors

    # (a binary frame has no HTTP counterpart: a POST body is JSON, so that vector runs on the socket only)
    @pytest.mark.parametrize(("vector", "transport"), [
        pytest.param(v.values[0], t, id=f"{t}-{v.id}")
        for v in vectors("client-invalid") for t in ("websocket", "sse")
        if not (t == "sse" and v.values[0].get("binary"))
    ])
    async def test_client_invalid(self, server: Server, vector: dict[str, Any], transport: str) -> None:
        after = vector["state"] == "after_hello"
        if transport == "websocket":
            async with connect(server.url) as ws_conn:
                client = RawClient(ws_conn)
                if after:
                    await client.hello()
                await client.send(vector["raw"].encode() if vector.get("binary") else vector["raw"])
                err = await client.recv()
                close = None
                if "close" in vector:
                    with pytest.raises(Exception):
                        await client.recv()
                    close = ws_conn.close_code
        else:
            sse = await SseRaw.open(base(server))
            try:
                if after:
                    await sse.hello()
                raw = vector["raw"]
                try:
                    orjson.loads(raw)
                except orjson.JSONDecodeError:  # not JSON: refused by the POST itself
                    response = await sse.post(b"[" + raw.encode() + b"]")
                    assert response.status_code == 400
                    err, close = response.json(), None
                    assert err["code"] == vector["error"]["code"] == "bad_json"
                    return
                await sse.send(b"[" + raw.encode() + b"]")  # exactly one frame, whatever it is
                err = await sse.recv()
                close = None
                if "close" in vector:
                    with pytest.raises(SseClosed):
                        await sse.recv()
                    close = sse.close_code
                if "seq" in err:
                    assert sse.ids[-1] == err["seq"]
            finally:
                await sse.aclose()
        assert err["type"] == "error" and err["code"] == vector["error"]["code"], err
        if "field" in vector["error"]:
            assert err["field"] == vector["error"]["field"]
        assert ("seq" in err) == after
        assert close == vector.get("close")
