// Agent runs end to end (PROTOCOL.md 4.4, 4.5): the JS client in Node
// against the real Python server. A three-step run with the simulated
// provider: a tool this client's handler answers, a tool another agent (a
// second client) answers after an approval, the network cut in every wait;
// cancel while a run waits; a queued generate in a thread.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import WebSocket from "ws";

import { Client, ERROR_CODES, WsServerError } from "../src/index.js";
import { useServer } from "./helpers/server.js";

const fixture = useServer();
const { clients } = fixture;

function newClient(options = {}) {
  const client = new Client(fixture.server.url, {
    WebSocket, heartbeatIntervalMs: 0, requestTimeoutMs: 10_000, reconnectBaseMs: 10, reconnectCapMs: 50, ...options,
  });
  clients.push(client);
  return client;
}

/** The network goes away under the client (both ends see a dead TCP connection). */
function cutNetwork(client) {
  client._ws._socket.destroy();
}

const WEATHER = {
  name: "get_weather",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
};
const LOOKUP = {
  name: "lookup",
  agent: "librarian",
  approval: true,
  parameters: { type: "object", properties: { topic: { type: "string" } }, required: ["topic"] },
};
const PROMPT = "get_weather in Oslo, then lookup Oslo";

describe("agent runs", () => {
  test("three steps: a handler answers, an approval, another agent answers; the network cut in every wait", async () => {
    const librarian = newClient({ agent: "librarian" });
    const me = newClient();
    await Promise.all([librarian.connect(), me.connect()]);
    const asked = [];
    librarian.tools.register("lookup", async (args) => {
      asked.push(args);
      cutNetwork(me); // the run waits for this answer: its client drops meanwhile
      return { topic: args.topic, summary: "capital of Norway" };
    });
    me.tools.register("get_weather", (args) => {
      cutNetwork(me); // and while it waits for this one
      return `4 C in ${args.city}`;
    });
    const stream = await me.generate(PROMPT, { tools: [WEATHER, LOOKUP], maxSteps: 3 });
    const calls = await stream.waitForTools();
    assert.deepEqual(calls.map((c) => [c.name, c.wait, c.agent]), [["lookup", "approval", "librarian"]]);
    assert.equal(stream.step, 2);
    cutNetwork(me); // and while it waits for the approval
    await stream.approve(calls[0].id); // sent once resumed
    assert.deepEqual(await stream.waitForTools(), []);
    const result = await stream.wait();
    assert.equal(result.reason, "complete");
    assert.equal(result.steps, 3);
    assert.deepEqual(asked, [{ topic: "Oslo" }]);
    assert.deepEqual(result.messages.map((m) => m.role), ["assistant", "tool", "assistant", "tool", "assistant"]);
    assert.equal(result.messages[1].content, "4 C in Oslo");
    assert.deepEqual(JSON.parse(result.messages[3].content), { topic: "Oslo", summary: "capital of Norway" });
    const events = [];
    for await (const event of stream.events()) events.push(event.type);
    assert.equal(events.filter((t) => t === "waiting").length, 3);
    assert.equal(events.filter((t) => t === "tool_result").length, 2);
    assert.equal(events.filter((t) => t === "step").length, 2);
    assert.ok(me.stats.reconnects >= 3, `reconnects: ${me.stats.reconnects}`);
  });

  test("without a handler: the caller answers, and a routed call is an event", async () => {
    const librarian = newClient({ agent: "librarian2" });
    const me = newClient();
    await Promise.all([librarian.connect(), me.connect()]);
    const routed = new Promise((resolve) => librarian.on("tool_call", resolve));
    const stream = await me.generate(PROMPT, { tools: [WEATHER, { ...LOOKUP, agent: "librarian2", approval: false }], maxSteps: 3 });
    const [call] = await stream.waitForTools();
    assert.deepEqual([call.name, call.wait, call.arguments], ["get_weather", "client", { city: "Oslo" }]);
    await stream.toolResult(call.id, { temp_c: 4 });
    const request = await routed;
    assert.deepEqual([request.name, request.arguments], ["lookup", { topic: "Oslo" }]);
    await librarian.toolResult(request.call, "found");
    const result = await stream.wait();
    assert.equal(result.messages[1].content, '{"temp_c":4}');
    assert.equal(result.messages[3].content, "found");
    // answering again with other content is refused
    await assert.rejects(librarian.toolResult(request.call, "other"), (e) => e.code === ERROR_CODES.CALL_ANSWERED);
  });

  test("cancel while the run waits for an approval ends it at once", async () => {
    const me = newClient();
    await me.connect();
    const stream = await me.generate("lookup Oslo", { tools: [{ ...LOOKUP, agent: "nobody-here" }], maxSteps: 2 });
    const [call] = await stream.waitForTools();
    assert.equal(call.wait, "approval");
    await stream.cancel();
    assert.equal(stream.result.reason, "cancelled");
    assert.equal(JSON.parse(stream.result.messages.at(-1).content).error, "cancelled");
    await assert.rejects(stream.approve(call.id), (e) => e instanceof WsServerError && e.code === ERROR_CODES.NOT_WAITING);
  });

  test("a queued generate runs after the thread's stream, continuing its conversation", async () => {
    const me = newClient();
    await me.connect();
    const first = await me.generate([{ role: "user", content: "one" }], {
      thread: "chat", params: { tokens_per_s: 300, reply_tokens: 30 },
    });
    const second = await me.generate([{ role: "user", content: "one" }, { role: "user", content: "two" }], {
      thread: "chat", onBusy: "queue",
    });
    assert.equal(second.queuedAfter, first.id);
    const a = await first.wait();
    const b = await second.wait();
    assert.equal(a.reason, "complete");
    assert.ok(b.text.startsWith('You said "two".'), b.text);
    await assert.rejects(
      me.generate("three", { thread: "chat", onBusy: "reject", params: { tokens_per_s: 5, reply_tokens: 50 } })
        .then(() => me.generate("four", { thread: "chat", onBusy: "reject" })),
      (e) => e.code === ERROR_CODES.BUSY,
    );
  });
});
