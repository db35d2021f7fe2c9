// Unit tests of the client on a mock WebSocket and a fake clock: no server, no real time.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  CLOSE_CODES,
  Client,
  ConnectionLostError,
  RequestTimeoutError,
  StreamFailedError,
  Timer,
  WsServerError,
  fullJitter,
} from "../src/index.js";
import { FakeClock, WELCOME, connectedClient, flush, mockWebSocketClass } from "./helpers/mock.js";

const MESSAGES = [{ role: "user", content: "hi" }];

/** Start a generate and answer it with stream.start; returns the Stream. */
async function started(client, ws, { seq, stream = "s1", ...rest } = {}) {
  const pending = client.generate(MESSAGES, rest);
  const request = ws.sent.at(-1);
  assert.equal(request.type, "generate");
  ws.receive({ type: "stream.start", seq, stream, ref: request.id, provider: "simulated", model: "sim-1" });
  return pending;
}

describe("backoff and Timer", () => {
  test("full jitter: uniform(0, min(cap, base * 2^(tries-1))), the first retry jittered too", () => {
    const top = fullJitter({ baseMs: 100, capMs: 1000, random: () => 0.999999 });
    assert.deepEqual([1, 2, 3, 4, 5, 6, 10].map(top), [99, 199, 399, 799, 999, 999, 999]);
    const bottom = fullJitter({ baseMs: 100, capMs: 1000, random: () => 0 });
    assert.deepEqual([1, 2, 5].map(bottom), [0, 0, 0]);
    // with a real random source the first retry is spread over [0, base)
    const first = fullJitter({ baseMs: 250, capMs: 10_000 });
    const samples = Array.from({ length: 500 }, () => first(1));
    assert.ok(samples.every((d) => d >= 0 && d < 250));
    assert.ok(new Set(samples).size > 50, "the first retry is jittered");
    const capped = Array.from({ length: 500 }, () => first(30));
    assert.ok(capped.every((d) => d >= 0 && d < 10_000));
    assert.ok(Math.max(...capped) > 5_000);
  });

  test("Timer schedules with tries + 1, counts calls, and reset starts over", () => {
    const clock = new FakeClock();
    const calls = [];
    const delays = [];
    const timer = new Timer(() => calls.push(clock.now()), (tries) => (delays.push(tries), tries * 100), clock);
    timer.scheduleTimeout();
    clock.advance(100);
    timer.scheduleTimeout();
    clock.advance(200);
    assert.deepEqual(delays, [1, 2]);
    assert.deepEqual(calls, [100, 300]);
    assert.equal(timer.tries, 2);
    timer.scheduleTimeout();
    timer.reset();
    clock.advance(10_000);
    assert.equal(calls.length, 2, "reset cancels the scheduled call");
    assert.equal(timer.tries, 0);
    assert.equal(timer.scheduleTimeout(42), 42, "an explicit delay wins");
  });
});

describe("connecting", () => {
  test("offers wsserver.v1, says hello, and is open after welcome", async () => {
    const { client, ws, states } = await connectedClient(Client, { agent: "planner-1", token: "tok" });
    assert.deepEqual(ws().protocols, ["wsserver.v1"]);
    assert.deepEqual(ws().sent[0], { type: "hello", protocol: 1, agent: "planner-1", token: "tok" });
    assert.equal(client.state, "open");
    assert.equal(client.session, "S1");
    assert.deepEqual(states, ["connecting", "open"]);
    assert.equal(client.connected, true);
  });

  test("requests made before the welcome wait for it", async () => {
    const { client, MockWebSocket } = await connectedClient(Client, {}, { connect: false });
    const connecting = client.connect();
    const ws = MockWebSocket.last;
    const pending = client.generate(MESSAGES);
    ws.open();
    assert.deepEqual(ws.sent.map((m) => m.type), ["hello"], "nothing before hello");
    ws.receive(WELCOME);
    await connecting;
    assert.deepEqual(ws.sent.map((m) => m.type), ["hello", "generate"]);
    ws.receive({ type: "stream.start", seq: 1, stream: "s1", ref: ws.sent[1].id, provider: "p", model: "m" });
    assert.equal((await pending).id, "s1");
  });

  test("a refused hello closes for good with the server's code", async () => {
    const { client, MockWebSocket, clock, states } = await connectedClient(Client, {}, { connect: false });
    const connecting = client.connect();
    const ws = MockWebSocket.last;
    ws.open();
    ws.receive({ type: "error", code: "unsupported_protocol", message: "no", supported: [1] });
    await assert.rejects(connecting, (e) => e instanceof WsServerError && e.code === "unsupported_protocol");
    assert.deepEqual(e2(client.closeError), { code: "unsupported_protocol", supported: [1] });
    clock.advance(60_000);
    assert.equal(MockWebSocket.instances.length, 1, "no retry");
    assert.deepEqual(states, ["connecting", "closed"]);
    function e2(e) {
      return { code: e.code, supported: e.supported };
    }
  });

  test("no welcome within connectTimeoutMs: the attempt is given up and retried", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client, { connectTimeoutMs: 1000 }, { connect: false });
    client.connect();
    MockWebSocket.last.open();
    clock.advance(999);
    assert.equal(MockWebSocket.instances.length, 1);
    clock.advance(1);
    assert.equal(MockWebSocket.instances[0].closedWith.code, CLOSE_CODES.CLIENT_CONNECT_TIMEOUT);
    assert.equal(client.state, "reconnecting");
    clock.advance(250);
    assert.equal(MockWebSocket.instances.length, 2);
  });

  test("requests before connect() and after close() fail with ConnectionLostError", async () => {
    const { client } = await connectedClient(Client, {}, { connect: false });
    await assert.rejects(client.ping(), ConnectionLostError);
    const { client: c2 } = await connectedClient(Client);
    await c2.close();
    await assert.rejects(c2.generate(MESSAGES), (e) => e instanceof ConnectionLostError && e.closeCode === 1000);
  });
});

describe("reconnect and resume", () => {
  test("state events, hello with session and last_seq, resumed", async () => {
    const { client, MockWebSocket, clock, states } = await connectedClient(Client);
    const stream = await started(client, MockWebSocket.last, { seq: 1 });
    MockWebSocket.last.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "You" });
    const retries = [];
    client.on("retry", (r) => retries.push(r));
    MockWebSocket.last.drop(1006);
    assert.equal(client.state, "reconnecting");
    assert.deepEqual(retries, [{ attempt: 1, delayMs: 125, code: 1006, reason: "" }], "first retry jittered: 0.5 * 250");
    clock.advance(124);
    assert.equal(MockWebSocket.instances.length, 1);
    clock.advance(1);
    const ws2 = MockWebSocket.last;
    assert.equal(MockWebSocket.instances.length, 2);
    ws2.open();
    assert.deepEqual(ws2.sent[0], { type: "hello", protocol: 1, session: "S1", last_seq: 2 });
    ws2.receive({ ...WELCOME, resumed: true });
    ws2.receive({ type: "stream.delta", seq: 3, stream: "s1", index: 1, text: " said" });
    ws2.receive({ type: "stream.end", seq: 4, stream: "s1", reason: "complete", usage: { input_tokens: 1, output_tokens: 2 }, duration_ms: 5 });
    assert.equal((await stream.finished).text, "You said");
    await client.close();
    assert.deepEqual(states, ["connecting", "open", "reconnecting", "resumed", "closed"]);
    assert.equal(client.stats.reconnects, 1);
  });

  test("backoff grows per failed attempt up to the cap, and resets after a success", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client, {
      random: () => 0.999999,
      reconnectBaseMs: 100,
      reconnectCapMs: 1000,
    });
    const delays = [];
    client.on("retry", (r) => delays.push(r.delayMs));
    MockWebSocket.last.drop();
    for (let i = 0; i < 6; i++) {
      clock.advance(delays.at(-1));
      MockWebSocket.last.drop(); // the attempt fails
    }
    assert.deepEqual(delays, [99, 199, 399, 799, 999, 999, 999]);
    clock.advance(999);
    MockWebSocket.last.open();
    MockWebSocket.last.receive({ ...WELCOME, resumed: true });
    MockWebSocket.last.drop();
    assert.equal(delays.at(-1), 99, "a success resets the backoff");
  });

  for (const code of [4000, 4001, 4400, 4401, 4403, 1008]) {
    test(`no reconnect after close code ${code}`, async () => {
      const { client, MockWebSocket, clock, states } = await connectedClient(Client);
      const pending = client.generate(MESSAGES);
      MockWebSocket.last.drop(code, "bye");
      await assert.rejects(pending, (e) => e instanceof ConnectionLostError && e.closeCode === code);
      clock.advance(120_000);
      assert.equal(MockWebSocket.instances.length, 1);
      assert.equal(client.state, "closed");
      assert.deepEqual(states, ["connecting", "open", "closed"]);
    });
  }

  test("reconnects after 1006, 1001, 1011, 1013 and 4008", async () => {
    for (const code of [1006, 1001, 1011, 1013, 4008]) {
      const { client, MockWebSocket, clock } = await connectedClient(Client);
      MockWebSocket.last.drop(code);
      clock.advance(250);
      assert.equal(MockWebSocket.instances.length, 2, `code ${code}`);
      await client.close();
    }
  });

  test("requests made while disconnected are buffered and sent after the resume", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client);
    MockWebSocket.last.drop();
    const published = client.publish("room", { n: 1 });
    const generated = client.generate(MESSAGES);
    clock.advance(250);
    const ws2 = MockWebSocket.last;
    ws2.open();
    assert.deepEqual(ws2.sent.map((m) => m.type), ["hello"]);
    ws2.receive({ ...WELCOME, resumed: true });
    assert.deepEqual(ws2.sent.map((m) => m.type), ["hello", "publish", "generate"], "in the order they were made");
    ws2.receive({ type: "ok", seq: 1, ref: ws2.sent[1].id, offset: 7 });
    ws2.receive({ type: "stream.start", seq: 2, stream: "s1", ref: ws2.sent[2].id, provider: "p", model: "m" });
    assert.equal(await published, 7);
    assert.equal((await generated).id, "s1");
    assert.equal(client.stats.resent, 0, "never sent before: not a re-send");
  });

  test("frames with seq <= last seen are dropped (replay overlapping what arrived)", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client);
    const ws1 = MockWebSocket.last;
    const stream = await started(client, ws1, { seq: 1 });
    const deltas = [];
    stream.on("delta", (d) => deltas.push(d));
    ws1.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "a" });
    ws1.receive({ type: "stream.delta", seq: 3, stream: "s1", index: 1, text: "b" });
    ws1.receive({ type: "stream.delta", seq: 3, stream: "s1", index: 1, text: "b" }); // a duplicate on the wire
    ws1.drop();
    clock.advance(250);
    const ws2 = MockWebSocket.last;
    ws2.open();
    assert.equal(ws2.sent[0].last_seq, 3);
    ws2.receive({ ...WELCOME, resumed: true });
    // a server replaying a little more than asked must not double anything
    ws2.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "a" });
    ws2.receive({ type: "stream.delta", seq: 3, stream: "s1", index: 1, text: "b" });
    ws2.receive({ type: "stream.delta", seq: 4, stream: "s1", index: 2, text: "c" });
    ws2.receive({ type: "stream.end", seq: 5, stream: "s1", reason: "complete", usage: { input_tokens: 1, output_tokens: 3 }, duration_ms: 1 });
    const pieces = [];
    for await (const piece of stream) pieces.push(piece);
    assert.deepEqual(pieces, ["a", "b", "c"]);
    assert.deepEqual(deltas.map((d) => d.index), [0, 1, 2]);
    assert.equal(client.stats.duplicateFrames, 3);
    assert.equal(client.lastSeq, 5);
  });

  test("an unanswered request is re-sent with the same id; duplicate_request is swallowed", async () => {
    const { client, MockWebSocket, clock, errors } = await connectedClient(Client);
    const ws1 = MockWebSocket.last;
    const pending = client.generate(MESSAGES);
    const original = ws1.sent.at(-1);
    ws1.drop(); // the generate reached the server, its stream.start did not reach us
    clock.advance(250);
    const ws2 = MockWebSocket.last;
    ws2.open();
    ws2.receive({ ...WELCOME, resumed: true });
    const resent = ws2.sent.at(-1);
    assert.deepEqual(resent, original, "the same request, the same id");
    // the replay carries the original reply, then the re-send is answered duplicate_request
    ws2.receive({ type: "stream.start", seq: 1, stream: "s1", ref: original.id, provider: "p", model: "m" });
    ws2.receive({ type: "error", seq: 2, code: "duplicate_request", message: "seen", ref: original.id, stream: "s1" });
    const stream = await pending;
    assert.equal(stream.id, "s1");
    await flush();
    assert.deepEqual(errors, [], "swallowed, not reported");
    assert.equal(client.stats.resent, 1);
    assert.equal(client.stats.duplicateRequests, 1);
    // a duplicate_request that answers nothing we re-sent is reported
    ws2.receive({ type: "error", seq: 3, code: "duplicate_request", message: "seen", ref: "other" });
    assert.equal(errors.length, 1);
    assert.equal(errors[0].code, "duplicate_request");
  });

  test("duplicate_request for a pending generate follows the stream the first one started", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const pending = client.generate(MESSAGES, { id: "r7" });
    ws.receive({ type: "error", seq: 12, code: "duplicate_request", message: "…", ref: "r7", stream: "s3" });
    const stream = await pending;
    assert.equal(stream.id, "s3");
    ws.receive({ type: "stream.delta", seq: 13, stream: "s3", index: 4, text: " safely" });
    assert.equal(stream.text, " safely");
  });

  test("a session that cannot be resumed: what was under way fails, the rest carries on", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client);
    const ws1 = MockWebSocket.last;
    const stream = await started(client, ws1, { seq: 1 });
    ws1.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "a" });
    const sentBefore = client.generate(MESSAGES);
    const subscribeSent = client.subscribe("room");
    ws1.drop();
    const notYetSent = client.generate(MESSAGES);
    const events = [];
    client.on("resumeFailed", (e) => events.push(["resumeFailed", e.code]));
    client.on("sessionLost", (e) => events.push(["sessionLost", e.code]));
    clock.advance(250);
    const ws2 = MockWebSocket.last;
    ws2.open();
    ws2.receive({ type: "error", code: "resume_failed", message: "log fell short" });
    ws2.receive({ ...WELCOME, session: "S2", resumed: false });
    assert.deepEqual(events, [["resumeFailed", "resume_failed"], ["sessionLost", "connection_lost"]]);
    assert.equal(client.state, "open");
    assert.equal(client.session, "S2");
    assert.equal(client.lastSeq, 0);
    await assert.rejects(sentBefore, ConnectionLostError);
    await assert.rejects(stream.finished, ConnectionLostError);
    await assert.rejects(async () => {
      for await (const _ of stream);
    }, ConnectionLostError);
    // the subscribe (idempotent) and the generate that was never sent go to the new session
    assert.deepEqual(ws2.sent.map((m) => m.type), ["hello", "subscribe", "generate"]);
    ws2.receive({ type: "subscribed", seq: 1, ref: ws2.sent[1].id, channel: "room", epoch: "e", offset: 0, recovered: false });
    ws2.receive({ type: "stream.start", seq: 2, stream: "s1", ref: ws2.sent[2].id, provider: "p", model: "m" });
    assert.equal((await subscribeSent).name, "room");
    assert.equal((await notYetSent).id, "s1");
  });

  test("heartbeat: a missing pong declares the connection dead and reconnects", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client, {
      heartbeatIntervalMs: 1000,
      heartbeatTimeoutMs: 500,
    });
    const ws1 = MockWebSocket.last;
    clock.advance(1000);
    const ping = ws1.sent.at(-1);
    assert.equal(ping.type, "ping");
    ws1.receive({ type: "pong", ref: ping.id });
    await flush();
    clock.advance(1000);
    const ping2 = ws1.sent.at(-1);
    assert.notEqual(ping2.id, ping.id, "the next heartbeat");
    const timeouts = [];
    client.on("heartbeatTimeout", (e) => timeouts.push(e));
    clock.advance(500); // no pong
    await flush();
    assert.equal(timeouts.length, 1);
    assert.equal(ws1.closedWith.code, CLOSE_CODES.CLIENT_HEARTBEAT_TIMEOUT);
    assert.equal(client.state, "reconnecting");
    clock.advance(250);
    const ws2 = MockWebSocket.last;
    assert.notEqual(ws2, ws1);
    ws2.open();
    ws2.receive({ ...WELCOME, resumed: true });
    assert.equal(client.state, "resumed");
    assert.equal(ws2.sentOfType("ping").length, 0, "the old ping is not re-sent");
    ws1.drop(1006); // the dead socket's late close changes nothing
    assert.equal(client.state, "resumed");
  });

  test("acks every ackEvery frames", async () => {
    const { client, MockWebSocket } = await connectedClient(Client, { ackEvery: 3 });
    const ws = MockWebSocket.last;
    await started(client, ws, { seq: 1 });
    for (let seq = 2; seq <= 7; seq++) ws.receive({ type: "stream.delta", seq, stream: "s1", index: seq - 2, text: "x" });
    assert.deepEqual(ws.sentOfType("ack"), [{ type: "ack", seq: 3 }, { type: "ack", seq: 6 }]);
  });

  test("giveUpAfterMs: closes after reconnecting that long", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client, { giveUpAfterMs: 1000, random: () => 0.999999 });
    const pending = client.ping();
    MockWebSocket.last.drop();
    while (client.state === "reconnecting") {
      clock.advance(clock.pending()[0]);
      MockWebSocket.last.drop();
    }
    assert.equal(client.state, "closed");
    await assert.rejects(pending, ConnectionLostError);
    assert.ok(clock.now() >= 1000 && clock.now() < 3000);
  });

  test("shutdown: reconnect after reconnect_ms (plus jitter)", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client);
    const seen = [];
    client.on("shutdown", (f) => seen.push(f.reconnect_ms));
    MockWebSocket.last.receive({ type: "shutdown", reconnect_ms: 1000, drain_ms: 5000 });
    MockWebSocket.last.drop(1001);
    assert.deepEqual(seen, [1000]);
    clock.advance(1000);
    assert.equal(MockWebSocket.instances.length, 1);
    clock.advance(125);
    assert.equal(MockWebSocket.instances.length, 2);
  });

  test("reconnectNow drops the connection and resumes at once", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    client.reconnectNow();
    assert.equal(MockWebSocket.instances.length, 2);
    assert.equal(MockWebSocket.instances[0].closedWith.code, CLOSE_CODES.CLIENT_RECONNECT);
    MockWebSocket.last.open();
    assert.equal(MockWebSocket.last.sent[0].session, "S1");
  });

  test("close() ends streams and requests with ConnectionLostError, and is final", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client);
    const stream = await started(client, MockWebSocket.last, { seq: 1 });
    const ping = client.ping();
    const closing = client.close();
    MockWebSocket.instances[0].finishClose();
    await closing;
    await assert.rejects(ping, ConnectionLostError);
    await assert.rejects(stream.finished, ConnectionLostError);
    clock.advance(60_000);
    assert.equal(MockWebSocket.instances.length, 1);
    assert.equal(MockWebSocket.instances[0].closedWith.code, 1000);
  });
});

describe("requests", () => {
  test("a request times out with RequestTimeoutError (code timeout)", async () => {
    const { client, clock } = await connectedClient(Client, { requestTimeoutMs: 100 });
    const pending = client.request({ type: "ping" });
    clock.advance(100);
    await assert.rejects(pending, (e) => e instanceof RequestTimeoutError && e.code === "timeout");
  });

  test("server errors reject with WsServerError carrying the protocol's code", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const pending = client.generate(MESSAGES, { provider: "nonesuch" });
    ws.receive({ type: "error", seq: 1, code: "provider_unavailable", message: "not here", ref: ws.sent.at(-1).id });
    await assert.rejects(pending, (e) => e instanceof WsServerError && e.code === "provider_unavailable" && e.detail === "not here");
    const limited = client.publish("room", 1);
    ws.receive({ type: "error", seq: 2, code: "rate_limited", message: "slow down", ref: ws.sent.at(-1).id, retry_after_ms: 30 });
    await assert.rejects(limited, (e) => e.code === "rate_limited" && e.retryAfterMs === 30);
  });

  test("a request larger than the server accepts fails locally (no 1009 loop)", async () => {
    const { client, MockWebSocket } = await connectedClient(Client, {}, { welcome: { limits: { max_message_bytes: 100 } } });
    await assert.rejects(client.publish("room", "x".repeat(200)), (e) => e.code === "message_too_large");
    assert.equal(MockWebSocket.last.sentOfType("publish").length, 0);
  });

  test("an id the protocol would refuse is refused locally", async () => {
    const { client } = await connectedClient(Client);
    await assert.rejects(client.request({ type: "ping", id: "x".repeat(65) }), TypeError);
  });
});

describe("streams", () => {
  test("events, iteration from the first piece, and the result", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const stream = await started(client, ws, { seq: 1 });
    const events = [];
    stream.on("delta", (d) => events.push(["delta", d.text, d.index]));
    stream.on("end", (r) => events.push(["end", r.reason]));
    ws.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "He" });
    ws.receive({ type: "stream.delta", seq: 3, stream: "s1", index: 1, text: "llo" });
    ws.receive({ type: "stream.end", seq: 4, stream: "s1", reason: "complete", usage: { input_tokens: 3, output_tokens: 2 }, ttft_ms: 12.5, duration_ms: 40 });
    ws.receive({ type: "stream.delta", seq: 5, stream: "s1", index: 2, text: "late" }); // nothing after the end
    const pieces = [];
    for await (const piece of stream) pieces.push(piece); // started after the pieces arrived
    assert.deepEqual(pieces, ["He", "llo"]);
    assert.deepEqual(events, [["delta", "He", 0], ["delta", "llo", 1], ["end", "complete"]]);
    assert.deepEqual(stream.result, {
      stream: "s1",
      reason: "complete",
      usage: { inputTokens: 3, outputTokens: 2, estimated: false },
      ttftMs: 12.5,
      durationMs: 40,
      text: "Hello",
      reasoning: "",
      message: null,
      toolCalls: [],
      messages: null, // (an agent run's)
      steps: null,
    });
    assert.equal(stream.provider, "simulated");
  });

  test("reasoning and tool calls: events, both iterators, message and toolCalls", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const tools = [{ name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } }];
    const stream = await started(client, ws, { seq: 1, tools, toolChoice: { name: "get_weather" } });
    const request = ws.sentOfType("generate").at(-1);
    assert.deepEqual([request.tools, request.tool_choice], [tools, { name: "get_weather" }]);
    const heard = [];
    for (const name of ["delta", "reasoning", "tool_call", "tool_call_delta"]) stream.on(name, (e) => heard.push([name, e.index]));
    const message = {
      role: "assistant",
      content: [{ type: "reasoning", text: "Weather.", signature: "sig" }, { type: "text", text: "Checking." }],
      tool_calls: [{ id: "c1", name: "get_weather", arguments: { city: "Oslo" } }],
    };
    ws.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "Weather.", part: "reasoning" });
    ws.receive({ type: "stream.delta", seq: 3, stream: "s1", index: 1, text: "Checking." });
    ws.receive({ type: "stream.tool_call", seq: 4, stream: "s1", index: 2, call: "c1", name: "get_weather" });
    ws.receive({ type: "stream.delta", seq: 5, stream: "s1", index: 3, text: '{"city":', part: "tool_call", call: "c1" });
    assert.equal(stream.calls.get("c1").arguments, '{"city":');
    ws.receive({ type: "stream.delta", seq: 6, stream: "s1", index: 4, text: '"Oslo"}', part: "tool_call", call: "c1" });
    ws.receive({ type: "stream.delta", seq: 7, stream: "s1", index: 3, text: "dup", part: "tool_call", call: "c1" }); // seen
    ws.receive({ type: "stream.delta", seq: 8, stream: "s1", index: 5, text: "?", part: "audio" }); // a newer part: skipped
    assert.deepEqual([stream.message, stream.toolCalls], [null, []]);
    ws.receive({ type: "stream.end", seq: 9, stream: "s1", reason: "tool_calls", usage: { input_tokens: 9, output_tokens: 7 }, duration_ms: 5, message });
    const texts = [];
    for await (const text of stream) texts.push(text);
    const events = [];
    for await (const event of stream.events()) events.push(event);
    assert.deepEqual(texts, ["Checking."]);
    assert.deepEqual(events, [
      { type: "reasoning", text: "Weather.", index: 0 },
      { type: "text", text: "Checking.", index: 1 },
      { type: "tool_call", call: "c1", name: "get_weather", index: 2 },
      { type: "tool_call_delta", call: "c1", text: '{"city":', index: 3 },
      { type: "tool_call_delta", call: "c1", text: '"Oslo"}', index: 4 },
    ]);
    assert.deepEqual(heard, [["reasoning", 0], ["delta", 1], ["tool_call", 2], ["tool_call_delta", 3], ["tool_call_delta", 4]]);
    assert.deepEqual([stream.text, stream.reasoning], ["Checking.", "Weather."]);
    assert.deepEqual(stream.calls.get("c1"), { id: "c1", name: "get_weather", arguments: '{"city":"Oslo"}' });
    assert.equal(stream.result.reason, "tool_calls");
    assert.deepEqual(stream.message, message);
    assert.deepEqual(stream.toolCalls, [{ id: "c1", name: "get_weather", arguments: { city: "Oslo" } }]);
  });

  test("a snapshot brings reasoning and calls so far; only the unseen rest is delivered", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const stream = await started(client, ws, { seq: 1 });
    ws.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "Thin", part: "reasoning" });
    const events = [];
    const iterating = (async () => {
      for await (const event of stream.events()) events.push(event);
    })();
    ws.receive({
      type: "stream.snapshot", seq: 3, stream: "s1", index: 4, text: "Ok.", reasoning: "Think.",
      calls: [{ call: "c1", name: "f", arguments: '{"a"' }],
    });
    ws.receive({ type: "stream.delta", seq: 4, stream: "s1", index: 3, text: '{"a"', part: "tool_call", call: "c1" }); // covered
    ws.receive({ type: "stream.delta", seq: 5, stream: "s1", index: 4, text: ":1}", part: "tool_call", call: "c1" });
    ws.receive({ type: "stream.end", seq: 6, stream: "s1", reason: "tool_calls", usage: { input_tokens: 1, output_tokens: 5 }, duration_ms: 1 });
    await iterating;
    assert.deepEqual(events.map((e) => [e.type, e.text ?? e.name]), [
      ["reasoning", "Thin"], ["reasoning", "k."], ["text", "Ok."], ["tool_call", "f"], ["tool_call_delta", '{"a"'], ["tool_call_delta", ":1}"],
    ]);
    assert.deepEqual([stream.reasoning, stream.text, stream.calls.get("c1").arguments], ["Think.", "Ok.", '{"a":1}']);
  });

  test("a stream that ends with an error throws StreamFailedError with its code", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const stream = await started(client, ws, { seq: 1 });
    ws.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "part" });
    ws.receive({ type: "stream.end", seq: 3, stream: "s1", reason: "error", error: { code: "provider_error", message: "500" }, usage: { input_tokens: 1, output_tokens: 1, estimated: true }, duration_ms: 2 });
    const pieces = [];
    await assert.rejects(
      async () => {
        for await (const piece of stream) pieces.push(piece);
      },
      (e) => e instanceof StreamFailedError && e.code === "provider_error" && e.result.text === "part",
    );
    assert.deepEqual(pieces, ["part"], "the text before the failure is delivered");
    assert.equal(stream.result.usage.estimated, true);
    await assert.rejects(stream.finished, StreamFailedError);
  });

  test("cancel sends cancel for the stream; unknown_stream (it had ended) counts as done", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const stream = await started(client, ws, { seq: 1 });
    const cancelling = stream.cancel();
    const cancel = ws.sent.at(-1);
    assert.deepEqual({ ...cancel, id: undefined }, { type: "cancel", stream: "s1", id: undefined });
    ws.receive({ type: "stream.end", seq: 2, stream: "s1", reason: "complete", usage: { input_tokens: 1, output_tokens: 0 }, duration_ms: 1 });
    ws.receive({ type: "error", seq: 3, code: "unknown_stream", message: "ended", ref: cancel.id, stream: "s1" });
    assert.equal((await cancelling).reason, "complete");
    assert.equal(await stream.cancel(), stream.result, "cancel after the end is a no-op");
    assert.equal(ws.sentOfType("cancel").length, 1);
  });

  test("interrupt with input returns the steered stream", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const stream = await started(client, ws, { seq: 1 });
    let steeredEvent = null;
    stream.on("steered", (s) => (steeredEvent = s));
    const steering = stream.interrupt("make it about cats", { newStream: "s2" });
    const request = ws.sent.at(-1);
    assert.equal(request.type, "interrupt");
    assert.equal(request.input, "make it about cats");
    assert.equal(request.new_stream, "s2");
    ws.receive({ type: "stream.end", seq: 2, stream: "s1", reason: "interrupted", usage: { input_tokens: 4, output_tokens: 0 }, duration_ms: 3 });
    ws.receive({ type: "stream.start", seq: 3, stream: "s2", ref: request.id, provider: "p", model: "m", steered_from: "s1" });
    const steered = await steering;
    assert.equal(steered.id, "s2");
    assert.equal(steered.steeredFrom, "s1");
    assert.equal(steeredEvent, steered);
    assert.equal(stream.result.reason, "interrupted");
    // without input: only stops
    const stopping = steered.interrupt();
    ws.receive({ type: "ok", seq: 4, ref: ws.sent.at(-1).id });
    assert.equal(await stopping, null);
  });

  test("snapshot resume: hello asks for it, unknown streams are adopted with their text", async () => {
    const { client, MockWebSocket } = await connectedClient(
      Client,
      { session: "OLD", lastSeq: 40, snapshot: true },
      { connect: false },
    );
    const adopted = [];
    client.on("stream", (s) => adopted.push(s));
    const connecting = client.connect();
    const ws = MockWebSocket.last;
    ws.open();
    assert.deepEqual(ws.sent[0], { type: "hello", protocol: 1, session: "OLD", last_seq: 40, snapshot: true });
    ws.receive({ ...WELCOME, session: "OLD", resumed: true });
    await connecting;
    assert.equal(client.state, "resumed");
    ws.receive({ type: "stream.snapshot", seq: 58, stream: "s1", text: 'You said "hi". The stream', index: 9 });
    assert.equal(adopted.length, 1);
    const stream = adopted[0];
    assert.equal(stream.id, "s1");
    assert.equal(stream.text, 'You said "hi". The stream');
    ws.receive({ type: "stream.delta", seq: 59, stream: "s1", index: 9, text: " keeps" });
    assert.equal(stream.text, 'You said "hi". The stream keeps');
    stream.cancel();
    assert.deepEqual(ws.sent.at(-1).stream, "s1");
    // a later reconnect is a plain resume again
    ws.drop();
    client._reconnectTimer.clear();
    client._openSocket();
    MockWebSocket.last.open();
    assert.equal(MockWebSocket.last.sent[0].snapshot, undefined);
    assert.equal(MockWebSocket.last.sent[0].last_seq, 59);
  });

  test("onDelta replays the deltas that came before it, then follows", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const stream = await started(client, ws, { seq: 1 });
    ws.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "a" });
    ws.receive({ type: "stream.delta", seq: 3, stream: "s1", index: 1, text: "b" });
    const seen = [];
    const late = [];
    stream.onDelta((d) => seen.push([d.text, d.index]));
    stream.on("delta", (d) => late.push(d.text));
    ws.receive({ type: "stream.delta", seq: 4, stream: "s1", index: 2, text: "c" });
    assert.deepEqual(seen, [["a", 0], ["b", 1], ["c", 2]]);
    assert.deepEqual(late, ["c"]);
  });

  test("an AbortSignal given to generate cancels the stream", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const controller = new AbortController();
    await started(client, ws, { seq: 1, signal: controller.signal });
    controller.abort();
    assert.deepEqual({ ...ws.sent.at(-1), id: undefined }, { type: "cancel", stream: "s1", id: undefined });
  });

  test("a snapshot for a known stream adds only what the handle has not seen", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const stream = await started(client, ws, { seq: 1 });
    ws.receive({ type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "You" });
    ws.receive({ type: "stream.snapshot", seq: 3, stream: "s1", text: "You said", index: 2 });
    ws.receive({ type: "stream.delta", seq: 4, stream: "s1", index: 1, text: " said" }); // covered by the snapshot
    ws.receive({ type: "stream.delta", seq: 5, stream: "s1", index: 2, text: " hi" });
    assert.equal(stream.text, "You said hi");
  });
});

describe("channels and direct messages", () => {
  async function subscribed(client, ws, name, { seq, offset = 0, epoch = "e1", members = [] } = {}) {
    const pending = client.subscribe(name);
    const request = ws.sent.at(-1);
    assert.deepEqual({ ...request, id: undefined }, { type: "subscribe", channel: name, id: undefined });
    ws.receive({ type: "subscribed", seq, ref: request.id, channel: name, epoch, offset, recovered: false, members });
    return pending;
  }

  test("messages in offset order exactly once; presence keeps members", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const channel = await subscribed(client, ws, "room", { seq: 1, offset: 5, members: ["me", "bob"] });
    assert.deepEqual([...channel.members], ["me", "bob"]);
    const got = [];
    const presence = [];
    channel.onPresence((p) => presence.push(p));
    ws.receive({ type: "message", channel: "room", offset: 6, from: "bob", data: { n: 1 } });
    channel.onMessage((m) => got.push(m)); // attached late: the backlog comes first
    ws.receive({ type: "message", channel: "room", offset: 6, from: "bob", data: { n: 1 } }); // duplicate
    ws.receive({ type: "presence", channel: "room", offset: 7, joined: "carol" });
    ws.receive({ type: "message", channel: "room", offset: 8, from: "carol", data: "hi" });
    ws.receive({ type: "presence", channel: "room", offset: 9, left: "bob" });
    ws.receive({ type: "message", channel: "other", offset: 1, from: "x", data: 1 }); // not ours
    assert.deepEqual(got, [
      { channel: "room", offset: 6, from: "bob", data: { n: 1 } },
      { channel: "room", offset: 8, from: "carol", data: "hi" },
    ]);
    assert.deepEqual(presence.map((p) => [p.joined ?? null, p.left ?? null]), [["carol", null], [null, "bob"]]);
    assert.deepEqual([...channel.members].sort(), ["carol", "me"]);
    assert.equal(channel.offset, 9);
    assert.equal(channel.duplicates, 1);
  });

  test("async iteration of a channel ends on unsubscribe", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const channel = await subscribed(client, ws, "room", { seq: 1 });
    const seen = [];
    const reading = (async () => {
      for await (const m of channel) seen.push(m.data);
    })();
    ws.receive({ type: "message", channel: "room", offset: 1, from: "a", data: 1 });
    ws.receive({ type: "message", channel: "room", offset: 2, from: "a", data: 2 });
    await flush();
    const leaving = channel.unsubscribe();
    assert.deepEqual(ws.sent.at(-1), { type: "unsubscribe", channel: "room", id: ws.sent.at(-1).id });
    ws.receive({ type: "ok", seq: 2, ref: ws.sent.at(-1).id });
    await leaving;
    await reading;
    assert.deepEqual(seen, [1, 2]);
    ws.receive({ type: "message", channel: "room", offset: 3, from: "a", data: 3 });
    assert.deepEqual(seen, [1, 2]);
  });

  test("after a resume: re-subscribe with since/epoch; live traffic is held until the recovery fills the gap", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client);
    const ws1 = MockWebSocket.last;
    const channel = await subscribed(client, ws1, "room", { seq: 1, offset: 10, epoch: "e1" });
    const got = [];
    channel.onMessage((m) => got.push(m.offset));
    const resubscribed = [];
    channel.on("subscribed", (s) => resubscribed.push(s.recovered));
    ws1.receive({ type: "message", channel: "room", offset: 11, from: "a", data: 11 });
    ws1.drop();
    clock.advance(250);
    const ws2 = MockWebSocket.last;
    ws2.open();
    ws2.receive({ ...WELCOME, resumed: true });
    const again = ws2.sent.at(-1);
    assert.deepEqual({ ...again, id: undefined }, { type: "subscribe", channel: "room", since: 11, epoch: "e1", id: undefined });
    // live traffic overtakes the subscribed reply and the recovered messages
    ws2.receive({ type: "message", channel: "room", offset: 15, from: "a", data: 15 });
    ws2.receive({ type: "subscribed", seq: 2, ref: again.id, channel: "room", epoch: "e1", offset: 14, recovered: true, members: [] });
    ws2.receive({ type: "message", channel: "room", offset: 12, from: "a", data: 12 });
    ws2.receive({ type: "presence", channel: "room", offset: 13, joined: "z" });
    assert.deepEqual(got, [11, 12], "15 waits for 14");
    ws2.receive({ type: "message", channel: "room", offset: 14, from: "a", data: 14 });
    ws2.receive({ type: "message", channel: "room", offset: 15, from: "a", data: 15 }); // a duplicate of the held one
    ws2.receive({ type: "message", channel: "room", offset: 16, from: "a", data: 16 });
    assert.deepEqual(got, [11, 12, 14, 15, 16]);
    assert.deepEqual(resubscribed, [true]);
    assert.equal(channel.offset, 16);
  });

  test("a recovery that cannot be had emits gap and carries on", async () => {
    const { client, MockWebSocket, clock } = await connectedClient(Client);
    const ws1 = MockWebSocket.last;
    const channel = await subscribed(client, ws1, "room", { seq: 1, offset: 10, epoch: "e1" });
    const got = [];
    const gaps = [];
    channel.onMessage((m) => got.push(m.offset));
    channel.on("gap", (g) => gaps.push(g));
    ws1.drop();
    clock.advance(250);
    const ws2 = MockWebSocket.last;
    ws2.open();
    ws2.receive({ ...WELCOME, resumed: true });
    const again = ws2.sent.at(-1);
    ws2.receive({ type: "message", channel: "room", offset: 3, from: "a", data: 3 });
    ws2.receive({ type: "subscribed", seq: 2, ref: again.id, channel: "room", epoch: "e2", offset: 3, recovered: false });
    ws2.receive({ type: "message", channel: "room", offset: 4, from: "a", data: 4 });
    assert.deepEqual(got, [3, 4]);
    assert.equal(gaps.length, 1);
    assert.equal(channel.epoch, "e2");
  });

  test("a stream published to a channel is followed token by token", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const channel = await subscribed(client, ws, "room", { seq: 1 });
    const remote = [];
    channel.on("stream", (s) => remote.push(s));
    const send = (offset, data) => ws.receive({ type: "message", channel: "room", offset, from: "bot", data });
    send(1, { type: "stream.start", stream: "s1", provider: "simulated", model: "sim-1" });
    send(2, { type: "stream.delta", stream: "s1", index: 0, text: "You" });
    send(3, { type: "stream.delta", stream: "s1", index: 1, text: " said" });
    assert.equal(remote.length, 1);
    assert.equal(remote[0].from, "bot");
    assert.equal(remote[0].text, "You said");
    send(4, { type: "stream.end", stream: "s1", reason: "complete", usage: { input_tokens: 1, output_tokens: 2 }, duration_ms: 1 });
    assert.equal(remote[0].result.reason, "complete");
    assert.equal(channel.streams.length, 0);
  });

  test("a published stream's reasoning and tool calls are kept apart from its text", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const channel = await subscribed(client, ws, "room", { seq: 1 });
    let remote = null;
    channel.on("stream", (s) => (remote = s));
    const calls = [];
    const send = (offset, data) => ws.receive({ type: "message", channel: "room", offset, from: "bot", data });
    send(1, { type: "stream.start", stream: "s1", provider: "simulated", model: "sim-1" });
    remote.on("tool_call", (c) => calls.push(c));
    send(2, { type: "stream.delta", stream: "s1", index: 0, text: "hmm", part: "reasoning" });
    send(3, { type: "stream.delta", stream: "s1", index: 1, text: "Calling." });
    send(4, { type: "stream.tool_call", stream: "s1", index: 2, call: "c1", name: "f" });
    send(5, { type: "stream.delta", stream: "s1", index: 3, text: "{}", part: "tool_call", call: "c1" });
    assert.deepEqual([remote.text, remote.reasoning], ["Calling.", "hmm"]);
    assert.deepEqual(remote.calls.get("c1"), { id: "c1", name: "f", arguments: "{}" });
    assert.deepEqual(calls, [{ call: "c1", name: "f", index: 2 }]);
  });

  test("direct messages reach onMessage; send resolves on ok", async () => {
    const { client, MockWebSocket } = await connectedClient(Client);
    const ws = MockWebSocket.last;
    const got = [];
    client.onMessage((m) => got.push(m));
    ws.receive({ type: "message", seq: 1, from: "planner-1", data: { task: "x" } });
    assert.deepEqual(got, [{ from: "planner-1", data: { task: "x" }, seq: 1 }]);
    const sending = client.send("worker-7", "do the thing");
    assert.deepEqual({ ...ws.sent.at(-1), id: undefined }, { type: "send", to: "worker-7", data: "do the thing", id: undefined });
    ws.receive({ type: "ok", seq: 2, ref: ws.sent.at(-1).id });
    await sending;
  });
});

test("the WebSocket constructor is injectable, and required for transport: \"websocket\"", () => {
  const saved = globalThis.WebSocket;
  try {
    delete globalThis.WebSocket;
    assert.throws(() => new Client("ws://x/", { transport: "websocket" }), TypeError);
    assert.equal(new Client("ws://x/").transport, "sse", "no WebSocket at all: the HTTP transport");
    const MockWebSocket = mockWebSocketClass();
    globalThis.WebSocket = MockWebSocket;
    const client = new Client("ws://x/", { heartbeatIntervalMs: 0 });
    client.connect().catch(() => {});
    assert.equal(MockWebSocket.instances.length, 1, "globalThis.WebSocket by default");
    client.close();
  } finally {
    if (saved === undefined) delete globalThis.WebSocket;
    else globalThis.WebSocket = saved;
  }
});
