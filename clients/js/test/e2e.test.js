// End to end: the client in Node (with the `ws` package) against the real
// Python server on 127.0.0.1. Network loss is made by destroying the
// client's TCP socket, which both sides see as the network going away.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";

import { Client, ConnectionLostError, WsServerError } from "../src/index.js";
import { startServer } from "./helpers/server.js";

let server;

before(async () => {
  server = await startServer();
});

const clients = [];

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await server?.stop();
});

function newClient(options = {}, url = server.url) {
  const client = new Client(url, { WebSocket, heartbeatIntervalMs: 0, requestTimeoutMs: 10_000, ...options });
  clients.push(client);
  return client;
}

/** The network goes away under the client (both ends see a dead TCP connection). */
function cutNetwork(client) {
  client._ws._socket.destroy();
}

/** The text the simulated provider answers to `messages` (it is deterministic). */
async function expectedText(client, messages, params) {
  const stream = await client.generate(messages, { params: { ...params, tokens_per_s: 0 } });
  return (await stream.wait()).text;
}

function assertContiguous(indexes) {
  assert.deepEqual(indexes, indexes.map((_, i) => i), "delta indexes 0, 1, 2… with no gap and no repeat");
}

describe("streaming", () => {
  test("a generation streams text and ends with usage, TTFT and duration", async () => {
    const client = newClient();
    await client.connect();
    assert.equal(client._ws.protocol, "wsserver.v1", "the subprotocol was selected");
    const stream = await client.generate("hello there", { params: { reply_tokens: 30 } });
    assert.match(stream.id, /^s\d+$/);
    assert.equal(stream.provider, "simulated");
    const pieces = [];
    const deltas = [];
    stream.onDelta((d) => deltas.push(d.index));
    for await (const piece of stream) pieces.push(piece);
    assert.equal(pieces.join(""), stream.text);
    assert.ok(stream.text.startsWith('You said "hello there".'), stream.text);
    assertContiguous(deltas);
    const result = stream.result;
    assert.equal(result.reason, "complete");
    assert.equal(result.usage.outputTokens, 30);
    assert.ok(result.usage.inputTokens > 0);
    assert.equal(typeof result.ttftMs, "number");
    assert.ok(result.durationMs >= result.ttftMs);
    assert.ok((await client.ping()) >= 0);
  });

  test("two streams on one connection, each in order", async () => {
    const client = newClient();
    await client.connect();
    const [left, right] = await Promise.all([
      client.generate("left one", { stream: "left", params: { reply_tokens: 80 } }),
      client.generate("right one", { stream: "right", params: { reply_tokens: 60 } }),
    ]);
    assert.equal(left.id, "left");
    assert.equal(right.id, "right");
    const [a, b] = await Promise.all([left.wait(), right.wait()]);
    assert.equal(a.usage.outputTokens, 80);
    assert.equal(b.usage.outputTokens, 60);
    assert.ok(a.text.startsWith('You said "left one".'));
    assert.ok(b.text.startsWith('You said "right one".'));
  });

  test("cancel mid-stream: reason cancelled, nothing after the end", async () => {
    const client = newClient();
    await client.connect();
    const stream = await client.generate("count slowly", { params: { reply_tokens: 500, tokens_per_s: 200 } });
    let afterEnd = 0;
    let ended = false;
    stream.on("end", () => (ended = true));
    stream.on("delta", () => ended && afterEnd++);
    let n = 0;
    for await (const _ of stream) {
      if (++n === 5) await stream.cancel();
    }
    assert.equal(stream.result.reason, "cancelled");
    assert.ok(stream.result.usage.outputTokens < 500);
    assert.equal(stream.result.usage.outputTokens, stream.nextIndex, "usage counts what was sent");
    assert.equal(afterEnd, 0);
    assert.equal(await stream.cancel(), stream.result, "cancelling again is a no-op");
  });

  test("interrupt steers: the old stream ends interrupted, the new one answers the new input", async () => {
    const client = newClient();
    await client.connect();
    const stream = await client.generate("tell me about dragons", { params: { reply_tokens: 120, tokens_per_s: 300 } });
    let steered = null;
    let n = 0;
    for await (const _ of stream) {
      if (++n === 5) steered = await stream.interrupt("make it about cats");
    }
    assert.equal(stream.result.reason, "interrupted");
    assert.ok(steered);
    assert.equal(steered.steeredFrom, stream.id);
    assert.notEqual(steered.id, stream.id);
    const result = await steered.wait();
    assert.ok(result.text.startsWith('You said "make it about cats".'), result.text);
    // the steered conversation: the request, the partial answer, the new words
    const expected = await expectedText(
      client,
      [
        { role: "user", content: "tell me about dragons" },
        { role: "assistant", content: stream.result.text },
        { role: "user", content: "make it about cats" },
      ],
      { reply_tokens: 120 },
    );
    assert.equal(result.text, expected);
  });

  test("server errors arrive as typed errors with the protocol's code", async () => {
    const client = newClient();
    await client.connect();
    await assert.rejects(
      client.generate("x", { provider: "nonesuch" }),
      (e) => e instanceof WsServerError && e.code === "provider_unavailable",
    );
    const first = await client.generate("x", { stream: "mine", params: { reply_tokens: 3 } });
    await first.wait();
    await assert.rejects(
      client.generate("x", { stream: "mine" }),
      (e) => e instanceof WsServerError && e.code === "stream_exists" && e.stream === "mine",
    );
    await assert.rejects(
      client.generate([{ role: "robot", content: "x" }]),
      (e) => e.code === "bad_message" && e.field === "messages.0.role",
    );
  });
});

describe("resume", () => {
  test("network loss mid-stream, twice: no token lost or doubled", async () => {
    const client = newClient();
    await client.connect();
    const params = { reply_tokens: 300 };
    const expected = await expectedText(client, [{ role: "user", content: "resume me" }], params);
    const states = [];
    client.on("state", (s) => states.push(s));
    const stream = await client.generate("resume me", { params: { ...params, tokens_per_s: 500 } });
    const indexes = [];
    stream.onDelta(({ index }) => {
      indexes.push(index);
      if (index === 20 || index === 150) cutNetwork(client);
    });
    const result = await stream.wait();
    assert.equal(result.reason, "complete");
    assert.equal(result.text, expected);
    assertContiguous(indexes);
    assert.deepEqual(states, ["reconnecting", "resumed", "reconnecting", "resumed"]);
    assert.equal(client.stats.reconnects, 2);
  });

  test("a generate whose reply was lost is re-sent with the same id; the duplicate_request is swallowed", async () => {
    const client = newClient();
    await client.connect();
    const params = { reply_tokens: 40 };
    const expected = await expectedText(client, [{ role: "user", content: "once only" }], params);
    const errors = [];
    client.on("error", (e) => errors.push(e));
    // the request reaches the server; everything after it is lost with the connection
    const ws = client._ws;
    const deliver = ws.onmessage;
    let dead = false;
    ws.onmessage = (event) => {
      if (dead) return;
      if (JSON.parse(event.data).type === "stream.start") {
        dead = true;
        ws._socket.destroy();
        return;
      }
      deliver(event);
    };
    const stream = await client.generate("once only", { params });
    const result = await stream.wait();
    await client.ping(); // every earlier reply (the duplicate_request too) has arrived
    assert.equal(result.text, expected);
    assert.equal(client.stats.resent, 1);
    assert.equal(client.stats.duplicateRequests, 1);
    assert.deepEqual(errors, []);
  });

  test("heartbeat: a connection that stops answering is declared dead and resumed", async () => {
    const client = newClient({ heartbeatIntervalMs: 100, heartbeatTimeoutMs: 300 });
    await client.connect();
    const params = { reply_tokens: 150 };
    const expected = await expectedText(client, [{ role: "user", content: "heartbeat" }], params);
    const timeouts = [];
    client.on("heartbeatTimeout", (e) => timeouts.push(e));
    const stream = await client.generate("heartbeat", { params: { ...params, tokens_per_s: 300 } });
    const indexes = [];
    stream.onDelta(({ index }) => {
      indexes.push(index);
      if (index === 10) client._ws._socket.pause(); // a half-dead connection: nothing more is read
    });
    const result = await stream.wait();
    assert.equal(timeouts.length, 1);
    assert.equal(result.text, expected);
    assertContiguous(indexes);
    assert.equal(client.state, "resumed");
  });

  test("requests made while reconnecting are sent once the session is back", async () => {
    const client = newClient();
    await client.connect();
    cutNetwork(client);
    await new Promise((resolve) => client.once("reconnecting", resolve));
    const stream = await client.generate("made while offline", { params: { reply_tokens: 10 } });
    assert.equal(client.state, "resumed");
    assert.equal((await stream.wait()).usage.outputTokens, 10);
  });

  test("snapshot resume: a new client (a refreshed page) picks up a running stream", async () => {
    const first = newClient();
    await first.connect();
    const params = { reply_tokens: 300 };
    const expected = await expectedText(first, [{ role: "user", content: "refresh" }], params);
    const stream = await first.generate("refresh", { params: { ...params, tokens_per_s: 400 } });
    for await (const _ of stream) if (stream.nextIndex >= 10) break;
    const { session, lastSeq } = first;
    await first.close(); // the page goes away; the session and its stream go on

    const second = newClient({ session, lastSeq, snapshot: true });
    const adopted = new Promise((resolve) => second.once("stream", resolve));
    await second.connect();
    assert.equal(second.state, "resumed");
    const again = await adopted;
    assert.equal(again.id, stream.id);
    assert.ok(again.text.startsWith(stream.text), "the snapshot holds the text so far");
    const result = await again.wait();
    assert.equal(result.text, expected);
  });

  test("takeover: a second connection resuming the session closes the first with 4000, which stays closed", async () => {
    const first = newClient();
    await first.connect();
    const pending = first.generate("slow", { params: { reply_tokens: 1000, tokens_per_s: 50 } });
    const stream = await pending;
    const second = newClient({ session: first.session, lastSeq: first.lastSeq });
    const closed = new Promise((resolve) => first.once("closed", resolve));
    await second.connect();
    const detail = await closed;
    assert.equal(detail.code, 4000);
    await assert.rejects(stream.wait(), (e) => e instanceof ConnectionLostError && e.closeCode === 4000);
    await new Promise((resolve) => setTimeout(resolve, 400));
    assert.equal(first.state, "closed", "no automatic reconnect after 4000");
    assert.equal(second.state, "resumed");
  });

  test("an unknown session gives a fresh one (sessionLost), and the client carries on", async () => {
    const client = newClient({ session: "no-such-session", lastSeq: 3 });
    const lost = [];
    client.on("sessionLost", (e) => lost.push(e));
    await client.connect();
    assert.equal(client.state, "open");
    assert.notEqual(client.session, "no-such-session");
    assert.equal(lost.length, 1);
    const stream = await client.generate("fresh", { params: { reply_tokens: 5 } });
    assert.equal((await stream.wait()).usage.outputTokens, 5);
  });

  test("a replay log that fell short: resume_failed, the stream fails, a new session follows", async () => {
    const small = await startServer(["--replay-max-messages", "5"]);
    try {
      // a fixed delay: full jitter may retry within a few ms, before the 5-frame
      // log has overflowed, and the resume would then (rightly) succeed
      const client = newClient({ reconnectAfterMs: () => 100 }, small.url);
      await client.connect();
      const oldSession = client.session;
      const events = [];
      client.on("resumeFailed", (e) => events.push(e.code));
      client.on("sessionLost", (e) => events.push(e.code));
      const stream = await client.generate("long", { params: { reply_tokens: 2000, tokens_per_s: 1000 } });
      stream.on("delta", ({ index }) => index === 3 && cutNetwork(client));
      await assert.rejects(stream.wait(), ConnectionLostError);
      assert.deepEqual(events, ["resume_failed", "connection_lost"]);
      assert.notEqual(client.session, oldSession);
      assert.equal(client.state, "open");
      const next = await client.generate("after", { params: { reply_tokens: 3 } });
      assert.equal((await next.wait()).reason, "complete");
      await client.close();
    } finally {
      await small.stop();
    }
  });
});

describe("rich generations", () => {
  const WEATHER = {
    name: "get_weather",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  };
  const TIME = { name: "get_time", parameters: { type: "object", properties: { zone: { type: "string" } }, required: ["zone"] } };

  test("a two-step tool conversation with reasoning", async () => {
    const client = newClient();
    await client.connect();
    const ask = [{ role: "user", content: "get_weather Lisbon" }];
    const stream = await client.generate(ask, { tools: [WEATHER], params: { reasoning: { effort: "low" } } });
    const kinds = [];
    for await (const event of stream.events()) if (kinds.at(-1) !== event.type) kinds.push(event.type);
    assert.deepEqual(kinds, ["reasoning", "text", "tool_call", "tool_call_delta"]);
    assert.equal(stream.result.reason, "tool_calls");
    const [call] = stream.toolCalls;
    assert.deepEqual([call.name, call.arguments], ["get_weather", { city: "Lisbon" }]);
    assert.equal(stream.message.content[0].type, "reasoning");
    assert.match(stream.message.content[0].signature, /^sim-/);
    assert.equal(stream.calls.get(call.id).arguments, JSON.stringify(call.arguments));
    const next = await client.generate(
      [...ask, stream.message, { role: "tool", tool_call_id: call.id, content: "19 C, clear" }],
      { tools: [WEATHER] },
    );
    const result = await next.wait();
    assert.equal(result.reason, "complete");
    assert.ok(result.text.startsWith('get_weather returned "19 C, clear".'), result.text);
    await assert.rejects(
      client.generate(ask, { tools: [WEATHER], toolChoice: { name: "get_time" } }),
      (e) => e instanceof WsServerError && e.code === "unknown_tool" && e.field === "tool_choice.name",
    );
  });

  test("network loss mid-arguments: every event once, as the end's message tells", async () => {
    const client = newClient();
    await client.connect();
    const stream = await client.generate([{ role: "user", content: "get_time WET then get_weather Lisbon" }], {
      tools: [WEATHER, TIME],
      params: { reasoning: {}, tokens_per_s: 300 },
    });
    const indexes = [];
    let cuts = 0;
    for await (const event of stream.events()) {
      indexes.push(event.index);
      if (event.type === "tool_call_delta" && cuts < 2 && client.state !== "reconnecting") {
        cuts += 1;
        cutNetwork(client);
      }
    }
    const result = stream.result;
    assert.equal(cuts, 2);
    assert.equal(result.reason, "tool_calls");
    assertContiguous(indexes);
    assert.equal(stream.reasoning, stream.message.content[0].text);
    assert.deepEqual(
      result.toolCalls.map((c) => [c.name, c.arguments]),
      [["get_time", { zone: "WET" }], ["get_weather", { city: "Lisbon" }]],
    );
    for (const c of result.toolCalls) assert.equal(stream.calls.get(c.id).arguments, JSON.stringify(c.arguments));
  });
});
