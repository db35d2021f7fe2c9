// The HTTP transport's client side with a scripted fetch: the SSE parser,
// SseSocket's WebSocket face, and the Client's fallback to it.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { Client, SseParser, SseSocket, httpEndpoint } from "../src/index.js";
import { mockWebSocketClass } from "./helpers/mock.js";

const tick = () => new Promise((resolve) => setImmediate(resolve));

/** A fetch whose GET /v1/events streams what the test pushes, and which records every POST. */
function mockFetch() {
  const encoder = new TextEncoder();
  const state = { posts: [], gets: [], controller: null, postStatus: 202, postBody: '{"accepted":1}', getStatus: 200 };
  state.push = (text) => state.controller.enqueue(encoder.encode(text));
  state.end = () => state.controller.close();
  state.fetch = async (url, init = {}) => {
    if ((init.method ?? "GET") === "GET") {
      state.gets.push({ url, init });
      if (state.getStatus !== 200) {
        return new Response(JSON.stringify({ type: "error", code: "unauthorized", message: "no" }), {
          status: state.getStatus,
        });
      }
      const body = new ReadableStream({ start: (controller) => void (state.controller = controller) });
      init.signal?.addEventListener("abort", () => {
        try {
          state.controller.error(new Error("aborted"));
        } catch {
          // closed already
        }
      });
      return new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
    }
    state.posts.push({ url, body: JSON.parse(init.body) });
    return new Response(state.postBody, { status: state.postStatus });
  };
  return state;
}

describe("SseParser", () => {
  test("events split across chunks, CRLF, comments, ids and multi-line data", () => {
    const events = [];
    const parser = new SseParser((e) => events.push(e));
    parser.feed("event: connection\r\ndata: {\"connection\":\"t\"}\r\n\r\n: heartbeat\n\nid: 4\nda");
    parser.feed('ta: {"seq":4}\n\ndata: a\ndata: b\n\n');
    assert.deepEqual(events, [
      { event: "connection", data: '{"connection":"t"}', id: null },
      { event: "message", data: '{"seq":4}', id: "4" },
      { event: "message", data: "a\nb", id: null },
    ]);
  });

  test("httpEndpoint maps ws to http and keeps the query", () => {
    assert.deepEqual(httpEndpoint("ws://127.0.0.1:9/ws?token=x"), { base: "http://127.0.0.1:9", query: "token=x" });
    assert.deepEqual(httpEndpoint("wss://h.example/"), { base: "https://h.example", query: "" });
  });
});

/** An SseSocket on a scripted fetch, its close codes collected; `open` pushes the connection event. */
async function socketOn(net, { open = true } = {}) {
  const socket = new SseSocket("http://127.0.0.1:9/", [], { fetch: net.fetch });
  const closes = [];
  socket.onclose = (e) => closes.push(e.code);
  await tick();
  if (open) {
    net.push('event: connection\ndata: {"connection":"t"}\n\n');
    await tick();
  }
  return { socket, closes };
}

describe("SseSocket", () => {
  test("opens on the connection event, delivers frames, posts batches one at a time", async () => {
    const net = mockFetch();
    const socket = new SseSocket("ws://127.0.0.1:9/?token=k", ["wsserver.v1"], { fetch: net.fetch });
    const got = [];
    let opened = 0;
    socket.onopen = () => (opened += 1);
    socket.onmessage = ({ data }) => got.push(JSON.parse(data));
    await tick();
    assert.equal(net.gets[0].url, "http://127.0.0.1:9/v1/events?token=k");
    net.push('event: connection\ndata: {"connection":"tok"}\n\n');
    await tick();
    assert.equal(opened, 1);
    assert.equal(socket.readyState, 1);
    socket.send('{"type":"hello","protocol":1}');
    socket.send('{"type":"ping","id":"a"}'); // queued behind the first POST
    socket.send('{"type":"ping","id":"b"}');
    await tick();
    await tick();
    assert.equal(net.posts[0].url, "http://127.0.0.1:9/v1/send?token=k&connection=tok");
    assert.deepEqual(net.posts.map((p) => p.body.map((f) => f.type)), [["hello"], ["ping", "ping"]]);
    net.push('id: 1\ndata: {"type":"pong","ref":"a"}\n\n');
    await tick();
    assert.deepEqual(got, [{ type: "pong", ref: "a" }]);
  });

  test("a close event gives its code when the stream ends", async () => {
    const net = mockFetch();
    const socket = new SseSocket("http://127.0.0.1:9/", [], { fetch: net.fetch });
    const closes = [];
    socket.onclose = (e) => closes.push([e.code, e.reason]);
    await tick();
    net.push('event: connection\ndata: {"connection":"t"}\n\nevent: close\ndata: {"code":4000,"reason":"session taken over"}\n\n');
    net.end();
    for (let i = 0; i < 5; i++) await tick();
    assert.deepEqual(closes, [[4000, "session taken over"]]);
    assert.equal(socket.readyState, 3);
  });

  test("a stream that just ends is 1006; a refused one maps its status", async () => {
    const net = mockFetch();
    const { closes } = await socketOn(net);
    net.end();
    for (let i = 0; i < 5; i++) await tick();
    const refused = mockFetch();
    refused.getStatus = 401;
    const other = new SseSocket("http://127.0.0.1:9/", [], { fetch: refused.fetch });
    other.onclose = (e) => closes.push(e.code);
    for (let i = 0; i < 5; i++) await tick();
    assert.deepEqual(closes, [1006, 4401]);
  });

  test("a POST to a connection that is gone closes the socket", async () => {
    const net = mockFetch();
    const { socket, closes } = await socketOn(net);
    net.postStatus = 404;
    net.postBody = '{"type":"error","code":"unknown_connection","message":"gone"}';
    socket.send('{"type":"ping"}');
    for (let i = 0; i < 5; i++) await tick();
    assert.deepEqual(closes, [1006]);
  });
});

describe("Client transport", () => {
  test('"auto": a WebSocket that cannot open is followed at once by the HTTP transport', async () => {
    const MockWebSocket = mockWebSocketClass();
    const net = mockFetch();
    const client = new Client("ws://127.0.0.1:9/", { WebSocket: MockWebSocket, fetch: net.fetch, heartbeatIntervalMs: 0 });
    const switched = [];
    client.on("transport", (t) => switched.push(t));
    const connected = client.connect();
    assert.equal(client.transport, "websocket");
    MockWebSocket.last.drop(1006); // the proxy refused the upgrade
    await tick();
    assert.deepEqual(switched, ["sse"]);
    assert.equal(client.transport, "sse");
    await tick();
    net.push('event: connection\ndata: {"connection":"t"}\n\n');
    for (let i = 0; i < 3; i++) await tick();
    assert.equal(net.posts[0].body[0].type, "hello");
    net.push('data: {"type":"welcome","protocol":1,"session":"S","resumed":false,"heartbeat_ms":0,"limits":{},"server":"x"}\n\n');
    await connected;
    assert.equal(client.session, "S");
    assert.equal(MockWebSocket.instances.length, 1);
    await client.close();
  });

  test('"sse" never tries a WebSocket; a bad transport name is refused', async () => {
    const net = mockFetch();
    const client = new Client("ws://127.0.0.1:9/", { transport: "sse", fetch: net.fetch, heartbeatIntervalMs: 0 });
    client.connect().catch(() => {});
    await tick();
    assert.equal(client.transport, "sse");
    assert.equal(net.gets.length, 1);
    await client.close();
    assert.throws(() => new Client("ws://x/", { transport: "pigeon" }), TypeError);
  });

  test('"auto" keeps the WebSocket once it has worked', async () => {
    const MockWebSocket = mockWebSocketClass();
    const client = new Client("ws://127.0.0.1:9/", {
      WebSocket: MockWebSocket,
      fetch: () => assert.fail("no HTTP transport"),
      heartbeatIntervalMs: 0,
      reconnectAfterMs: () => 1,
    });
    const connected = client.connect();
    MockWebSocket.last.open();
    MockWebSocket.last.receive({ type: "welcome", protocol: 1, session: "S", resumed: false, heartbeat_ms: 0, limits: {} });
    await connected;
    MockWebSocket.last.drop(1006);
    await new Promise((resolve) => setTimeout(resolve, 10));
    assert.equal(client.transport, "websocket");
    assert.equal(MockWebSocket.instances.length, 2);
    await client.close();
  });
});
