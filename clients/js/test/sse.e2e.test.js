// End to end over the HTTP transport (GET /v1/events + POST /v1/send): the
// client in Node (fetch) against the real Python server on 127.0.0.1,
// forced with transport: "sse", and by itself behind a proxy that refuses
// the WebSocket upgrade.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";

import { Client, ConnectionLostError } from "../src/index.js";
import { startProxy } from "./helpers/proxy.js";
import { startServer } from "./helpers/server.js";

let server;
let blocking;
const clients = [];

before(async () => {
  server = await startServer();
  blocking = await startProxy(server.port, "127.0.0.1", { refuseUpgrade: true });
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await blocking?.close();
  await server?.stop();
});

function newClient(options = {}, url = server.url) {
  const client = new Client(url, { WebSocket, heartbeatIntervalMs: 0, requestTimeoutMs: 10_000, ...options });
  clients.push(client);
  return client;
}

describe("transport: sse", () => {
  test("streams, cancels and steers", async () => {
    const client = newClient({ transport: "sse" });
    await client.connect();
    assert.equal(client.transport, "sse");
    const stream = await client.generate("hello there", { params: { reply_tokens: 30 } });
    const indexes = [];
    stream.onDelta((d) => indexes.push(d.index));
    const result = await stream.wait();
    assert.equal(result.reason, "complete");
    assert.ok(result.text.startsWith('You said "hello there".'), result.text);
    assert.deepEqual(indexes, indexes.map((_, i) => i));

    const slow = await client.generate("count", { params: { reply_tokens: 100_000, tokens_per_s: 200 } });
    await new Promise((resolve) => slow.on("delta", resolve));
    await slow.cancel();
    assert.equal((await slow.wait()).reason, "cancelled");

    const long = await client.generate("a story", { params: { reply_tokens: 120, tokens_per_s: 300 } });
    let n = 0;
    let steered;
    for await (const _ of long) if (++n === 3) steered = await long.interrupt("make it about cats");
    assert.equal(long.result.reason, "interrupted");
    const steeredResult = await steered.wait();
    assert.ok(steeredResult.text.includes("make it about cats"), steeredResult.text);
  });

  test("a dropped stream resumes: every delta once, in order", async () => {
    const proxy = await startProxy(server.port);
    try {
      const client = newClient({ transport: "sse", reconnectAfterMs: () => 50 }, `ws://127.0.0.1:${proxy.port}/`);
      await client.connect();
      const stream = await client.generate("resume me", { params: { reply_tokens: 600, tokens_per_s: 1000 } });
      const indexes = [];
      stream.onDelta((d) => indexes.push(d.index));
      let cuts = 0;
      stream.on("delta", () => {
        if (indexes.length % 150 === 0 && cuts < 3) cuts += proxy.dropAll() > 0 ? 1 : 0;
      });
      const result = await stream.wait();
      assert.equal(result.reason, "complete");
      assert.ok(cuts >= 1 && client.stats.reconnects >= 1, `cuts ${cuts}, reconnects ${client.stats.reconnects}`);
      assert.deepEqual(indexes, indexes.map((_, i) => i));
      const again = await client.generate("resume me", { params: { reply_tokens: 600, tokens_per_s: 0 } });
      assert.equal((await again.wait()).text, result.text, "the resumed text is the whole text");
    } finally {
      await proxy.close();
    }
  });

  test("channels and direct messages with a WebSocket client", async () => {
    const http = newClient({ transport: "sse", agent: "sse-agent" });
    const socket = newClient({ agent: "ws-agent" });
    await Promise.all([http.connect(), socket.connect()]);
    const channel = await http.subscribe("room-sse");
    const got = new Promise((resolve) => channel.onMessage(resolve));
    const other = await socket.subscribe("room-sse");
    await other.publish({ hello: "from ws" });
    const message = await got;
    assert.deepEqual(message.data, { hello: "from ws" });
    assert.equal(message.from, "ws-agent");
    const dm = new Promise((resolve) => socket.onMessage(resolve));
    await http.send("ws-agent", "from sse");
    assert.equal((await dm).data, "from sse");
  });

  test("a WebSocket resume takes the session over: 4000, no reconnect", async () => {
    const http = newClient({ transport: "sse" });
    await http.connect();
    const closed = new Promise((resolve) => http.once("closed", resolve));
    const socket = newClient({ session: http.session, lastSeq: 0 });
    await socket.connect();
    const detail = await closed;
    assert.equal(detail.code, 4000);
    assert.ok(http.closeError instanceof ConnectionLostError);
  });
});

describe("transport: auto, behind a proxy that refuses the WebSocket upgrade", () => {
  test("falls back to the HTTP transport by itself", async () => {
    const client = newClient({}, `ws://127.0.0.1:${blocking.port}/`);
    const transports = [];
    client.on("transport", (t) => transports.push(t));
    await client.connect();
    assert.deepEqual(transports, ["sse"]);
    assert.ok(blocking.refused >= 1, "the upgrade was refused");
    const stream = await client.generate("through the proxy", { params: { reply_tokens: 20 } });
    assert.equal((await stream.wait()).reason, "complete");
  });
});
