// The protocol's example messages (protocol/vectors/) against the client:
// every server-valid vector is accepted by the client's frame handling (and
// has the effect it describes), every client-valid vector's message can be
// produced through the client's API.

import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { describe, test } from "node:test";

import { Client, ConnectionLostError, ERROR_CODES, StreamFailedError, WsServerError } from "../src/index.js";
import { WELCOME, connectedClient, flush } from "./helpers/mock.js";
import { repoRoot } from "./helpers/server.js";

const VECTORS = path.join(repoRoot, "protocol", "vectors");

function load(kind) {
  const dir = path.join(VECTORS, kind);
  return readdirSync(dir)
    .filter((name) => name.endsWith(".json"))
    .sort()
    .map((name) => ({ name, ...JSON.parse(readFileSync(path.join(dir, name), "utf8")) }));
}

const serverValid = load("server-valid");
const clientValid = load("client-valid");
const clientInvalid = load("client-invalid");

test("the vectors are there", () => {
  assert.ok(serverValid.length >= 10, `server-valid: ${serverValid.length}`);
  assert.ok(clientValid.length >= 10, `client-valid: ${clientValid.length}`);
  assert.ok(clientInvalid.length >= 10, `client-invalid: ${clientInvalid.length}`);
});

/** A stream s1.. started with the given id, at seq 1. */
async function streamWith(client, ws, streamId, { seq = 1, id } = {}) {
  const pending = client.generate([{ role: "user", content: "hi" }], id ? { id } : {});
  const request = ws.sent.at(-1);
  ws.receive({ type: "stream.start", seq, stream: streamId, ref: request.id, provider: "simulated", model: "sim-1" });
  return pending;
}

describe("server-valid vectors are accepted", () => {
  for (const vector of serverValid) {
    const frame = vector.message;

    test(`${vector.name}: accepted on an open connection without an error`, async () => {
      const { client, ws, errors } = await connectedClient(Client);
      const before = client.lastSeq;
      if (frame.type === "welcome" || (frame.type === "error" && frame.seq === undefined)) {
        // handshake frames; covered below
        return;
      }
      ws().receive(frame);
      await flush();
      if (typeof frame.seq === "number") assert.equal(client.lastSeq, Math.max(before, frame.seq), "seq is taken");
      if (frame.type === "error") assert.equal(errors.length, 1, "an unsolicited error is reported");
      else assert.deepEqual(errors, []);
      assert.ok(client.connected);
    });

    test(`${vector.name}: has its effect (${vector.description})`, async (t) => {
      switch (frame.type) {
        case "welcome": {
          const { client, MockWebSocket } = await connectedClient(Client, {}, { connect: false });
          const connecting = client.connect();
          MockWebSocket.last.open();
          MockWebSocket.last.receive(frame);
          await connecting;
          assert.equal(client.session, frame.session);
          assert.deepEqual(client.welcome, frame);
          assert.equal(client.state, "open");
          return;
        }
        case "error": {
          if (frame.seq === undefined) {
            const { client, MockWebSocket } = await connectedClient(Client, {}, { connect: false });
            const connecting = client.connect();
            MockWebSocket.last.open();
            MockWebSocket.last.receive(frame);
            await assert.rejects(connecting, (e) => e instanceof WsServerError && e.code === frame.code);
            assert.deepEqual(client.closeError.supported, frame.supported);
            return;
          }
          if (frame.ref === undefined) {
            // about no request (a subscription dropped on resume): reported as it came
            const { ws, errors } = await connectedClient(Client);
            ws().receive(frame);
            await flush();
            assert.equal(errors.length, 1);
            assert.ok(errors[0] instanceof WsServerError);
            assert.equal(errors[0].code, frame.code);
            assert.equal(errors[0].channel, frame.channel);
            return;
          }
          const { client, ws } = await connectedClient(Client);
          const pending = client.request({ type: "cancel", stream: frame.stream ?? "x", id: frame.ref });
          ws().receive(frame);
          await assert.rejects(pending, (e) => {
            assert.ok(e instanceof WsServerError);
            assert.equal(e.code, frame.code);
            assert.equal(e.ref, frame.ref);
            assert.equal(e.stream, frame.stream);
            assert.equal(e.detail, frame.message);
            return true;
          });
          return;
        }
        case "ok": {
          const { client, ws } = await connectedClient(Client);
          const pending = client.request({ type: "cancel", stream: "s1", id: frame.ref });
          ws().receive(frame);
          assert.deepEqual(await pending, frame);
          return;
        }
        case "pong": {
          const { client, ws } = await connectedClient(Client);
          const pending = client.request({ type: "ping", id: frame.ref });
          ws().receive(frame);
          assert.deepEqual(await pending, frame);
          return;
        }
        case "stream.start": {
          const { client, ws } = await connectedClient(Client);
          const pending = client.generate([{ role: "user", content: "hi" }], { id: frame.ref });
          ws().receive(frame);
          const stream = await pending;
          assert.equal(stream.id, frame.stream);
          assert.equal(stream.provider, frame.provider);
          assert.equal(stream.model, frame.model);
          return;
        }
        case "stream.delta": {
          const { client, ws } = await connectedClient(Client);
          const stream = await streamWith(client, ws(), frame.stream, { seq: frame.seq - 1 });
          if (frame.part === "tool_call") {
            // the call was opened by the frame before (stream.tool_call)
            ws().receive({ type: "stream.tool_call", seq: frame.seq - 1, stream: frame.stream, index: frame.index - 1, call: frame.call, name: "f" });
          }
          const events = [];
          const iterating = (async () => {
            for await (const event of stream.events()) events.push(event);
          })();
          ws().receive(frame);
          ws().receive({ type: "stream.end", seq: frame.seq + 1, stream: frame.stream, reason: "complete", usage: { input_tokens: 1, output_tokens: 1 }, duration_ms: 1 });
          await iterating;
          const last = events.at(-1);
          assert.equal(last.text, frame.text);
          assert.equal(last.index, frame.index);
          assert.equal(stream.nextIndex, frame.index + 1);
          if (frame.part === "reasoning") {
            assert.deepEqual([stream.text, stream.reasoning, last.type], ["", frame.text, "reasoning"]);
          } else if (frame.part === "tool_call") {
            assert.equal(last.type, "tool_call_delta");
            assert.equal(stream.calls.get(frame.call).arguments, frame.text);
            assert.equal(stream.text, "");
          } else {
            assert.deepEqual([stream.text, last.type], [frame.text, "text"]);
          }
          return;
        }
        case "stream.tool_call": {
          const { client, ws } = await connectedClient(Client);
          const stream = await streamWith(client, ws(), frame.stream, { seq: frame.seq - 1 });
          const seen = [];
          stream.on("tool_call", (call) => seen.push(call));
          ws().receive(frame);
          assert.deepEqual(seen, [{ call: frame.call, name: frame.name, index: frame.index }]);
          assert.deepEqual(stream.calls.get(frame.call), { id: frame.call, name: frame.name, arguments: "" });
          assert.equal(stream.nextIndex, frame.index + 1);
          return;
        }
        case "stream.end": {
          const { client, ws } = await connectedClient(Client);
          const stream = await streamWith(client, ws(), frame.stream, { seq: frame.seq - 1 });
          ws().receive(frame);
          if (frame.reason === "error") {
            await assert.rejects(stream.finished, (e) => e instanceof StreamFailedError && e.code === frame.error.code);
          } else {
            await stream.finished;
          }
          assert.equal(stream.result.reason, frame.reason);
          assert.equal(stream.result.usage.inputTokens, frame.usage.input_tokens);
          assert.equal(stream.result.usage.outputTokens, frame.usage.output_tokens);
          assert.equal(stream.result.usage.estimated, frame.usage.estimated === true);
          assert.equal(stream.result.ttftMs, frame.ttft_ms ?? null);
          assert.equal(stream.result.durationMs, frame.duration_ms);
          assert.deepEqual(stream.message, frame.message ?? null);
          assert.deepEqual(stream.toolCalls, frame.message?.tool_calls ?? []);
          assert.deepEqual(stream.messages, frame.messages ?? null);
          assert.equal(stream.result.steps, frame.steps ?? null);
          return;
        }
        case "stream.snapshot": {
          const { client, ws } = await connectedClient(Client);
          const adopted = [];
          client.on("stream", (s) => adopted.push(s));
          ws().receive(frame);
          assert.equal(adopted.length, 1);
          assert.equal(adopted[0].id, frame.stream);
          assert.equal(adopted[0].text, frame.text);
          assert.equal(adopted[0].nextIndex, frame.index);
          assert.equal(adopted[0].reasoning, frame.reasoning ?? "");
          assert.deepEqual(
            [...adopted[0].calls.values()],
            (frame.calls ?? []).map((c) => ({ id: c.call, name: c.name, arguments: c.arguments })),
          );
          // an agent run: its step and what it waits on (a pending approval, say)
          assert.equal(adopted[0].step, frame.step ?? 1);
          assert.deepEqual(
            [...adopted[0].waiting.values()],
            (frame.waiting ?? []).map((c) => ({ ...c, agent: c.agent ?? null })),
          );
          return;
        }
        case "subscribed":
        case "presence":
        case "message": {
          if (frame.type === "message" && frame.channel === undefined) {
            const { client, ws } = await connectedClient(Client);
            const got = [];
            client.onMessage((m) => got.push(m));
            ws().receive(frame);
            assert.deepEqual(got, [{ from: frame.from, data: frame.data, seq: frame.seq }]);
            return;
          }
          // subscribe with recovery (since, epoch); the vector frame is the
          // first message after `since`
          const subscribed = serverValid.find((v) => v.message.type === "subscribed").message;
          const channelName = frame.channel;
          const position = frame.type === "subscribed" ? subscribed.offset : frame.offset;
          const { client, ws } = await connectedClient(Client);
          const pending = client.subscribe(channelName, { since: position - 1, epoch: subscribed.epoch });
          const request = ws().sent.at(-1);
          assert.equal(request.since, position - 1);
          ws().receive({ ...subscribed, channel: channelName, ref: request.id, offset: position });
          const channel = await pending;
          assert.equal(channel.epoch, subscribed.epoch);
          assert.equal(channel.recovered, subscribed.recovered);
          if (subscribed.members) assert.deepEqual([...channel.members], subscribed.members);
          if (frame.type === "subscribed") return;
          const messages = [];
          const presence = [];
          channel.onMessage((m) => messages.push(m));
          channel.onPresence((p) => presence.push(p));
          ws().receive(frame);
          if (frame.type === "message") {
            assert.deepEqual(messages, [{ channel: channelName, offset: frame.offset, from: frame.from, data: frame.data }]);
          } else {
            assert.equal(presence.length, 1);
            assert.equal(presence[0].joined, frame.joined);
            assert.equal(presence[0].left, frame.left);
            if (frame.joined) assert.ok(channel.members.has(frame.joined));
          }
          assert.equal(channel.offset, frame.offset);
          return;
        }
        case "shutdown": {
          const { client, MockWebSocket, clock } = await connectedClient(Client);
          const seen = [];
          client.on("shutdown", (f) => seen.push(f));
          MockWebSocket.last.receive(frame);
          MockWebSocket.last.drop(1001);
          assert.deepEqual(seen, [frame]);
          clock.advance(frame.reconnect_ms - 1);
          assert.equal(MockWebSocket.instances.length, 1, "not before reconnect_ms");
          clock.advance(10_000);
          assert.equal(MockWebSocket.instances.length, 2);
          return;
        }
        case "stream.waiting": {
          const { client, ws } = await connectedClient(Client);
          const stream = await streamWith(client, ws(), frame.stream, { seq: frame.seq - 1 });
          const seen = [];
          stream.on("waiting", (w) => seen.push(w));
          ws().receive(frame);
          const calls = frame.calls.map((c) => ({ ...c, agent: c.agent ?? null }));
          assert.deepEqual(seen, [{ calls, step: frame.step }]);
          assert.deepEqual([...stream.waiting.values()], calls);
          assert.equal(stream.step, frame.step);
          const needed = await stream.waitForTools(); // an approval or a client's result waits for this client
          assert.deepEqual(needed, calls);
          return;
        }
        case "stream.tool_result": {
          const { client, ws } = await connectedClient(Client);
          const stream = await streamWith(client, ws(), frame.stream, { seq: frame.seq - 2 });
          ws().receive({ type: "stream.waiting", seq: frame.seq - 1, stream: frame.stream, step: 1, message: { role: "assistant", content: "" },
            calls: [{ id: frame.call, name: frame.name, arguments: {}, wait: "agent", agent: "a" }] });
          const seen = [];
          stream.on("tool_result", (r) => seen.push(r));
          ws().receive(frame);
          assert.deepEqual(seen, [{ call: frame.call, name: frame.name, content: frame.content, error: frame.error ?? null, from: frame.from ?? null }]);
          assert.equal(stream.waiting.size, 0);
          return;
        }
        case "stream.step": {
          const { client, ws } = await connectedClient(Client);
          const stream = await streamWith(client, ws(), frame.stream, { seq: frame.seq - 1 });
          const seen = [];
          stream.on("step", (step) => seen.push(step));
          ws().receive(frame);
          assert.equal(stream.step, frame.step);
          assert.deepEqual(seen, [{ step: frame.step }]);
          return;
        }
        case "tool_call": {
          const { client, ws } = await connectedClient(Client);
          const seen = [];
          client.on("tool_call", (c) => seen.push(c));
          ws().receive(frame);
          assert.deepEqual(seen, [{ call: frame.call, name: frame.name, arguments: frame.arguments, from: frame.from }]);
          // with a handler, the client answers by itself
          const second = await connectedClient(Client);
          second.client.tools.register(frame.name, (args) => ({ echo: args }));
          second.ws().receive(frame);
          await new Promise((resolve) => setTimeout(resolve, 0));
          const sent = second.ws().sent.at(-1);
          assert.equal(sent.type, "tool_result");
          assert.equal(sent.call, frame.call);
          assert.deepEqual(JSON.parse(sent.content), { echo: frame.arguments });
          return;
        }
        default:
          t.skip(`no specific check for type ${frame.type}; accepted generically above`);
      }
    });
  }
});

/** Strip `id`, and fields the vector marks as unknown to the protocol. */
function shape(message, ignore = []) {
  const out = { ...message };
  delete out.id;
  for (const key of ignore) delete out[key];
  return out;
}

/** The message the client sends for a client-valid vector, through its public API. */
async function produce(message) {
  switch (message.type) {
    case "hello": {
      const { client, MockWebSocket } = await connectedClient(
        Client,
        {
          agent: message.agent,
          token: message.token,
          session: message.session,
          lastSeq: message.last_seq,
          snapshot: message.snapshot,
        },
        { connect: false },
      );
      client.connect().catch(() => {});
      MockWebSocket.last.open();
      return MockWebSocket.last.sent[0];
    }
    case "generate": {
      const { client, ws } = await connectedClient(Client);
      client
        .generate(message.messages, {
          id: message.id,
          stream: message.stream,
          provider: message.provider,
          model: message.model,
          params: message.params,
          channel: message.channel,
          tools: message.tools,
          toolChoice: message.tool_choice,
          maxSteps: message.max_steps,
          thread: message.thread,
          onBusy: message.on_busy,
        })
        .catch(() => {});
      return ws().sent.at(-1);
    }
    case "tool_result": {
      const { client, ws } = await connectedClient(Client);
      if (message.stream === undefined) client.toolResult(message.call, message.content).catch(() => {});
      else (await streamWith(client, ws(), message.stream)).toolResult(message.call, message.content).catch(() => {});
      return ws().sent.at(-1);
    }
    case "approve": {
      const { client, ws } = await connectedClient(Client);
      const stream = await streamWith(client, ws(), message.stream);
      stream.approve(message.call, message.approved, { reason: message.reason }).catch(() => {});
      return ws().sent.at(-1);
    }
    case "cancel":
    case "interrupt": {
      const { client, ws } = await connectedClient(Client);
      const stream = await streamWith(client, ws(), message.stream);
      if (message.type === "cancel") stream.cancel().catch(() => {});
      else stream.interrupt(message.input, { newStream: message.new_stream }).catch(() => {});
      return ws().sent.at(-1);
    }
    case "ack": {
      const { client, ws } = await connectedClient(Client, { ackEvery: message.seq });
      for (let seq = 1; seq <= message.seq; seq++) ws().receive({ type: "ok", seq, ref: `none-${seq}` });
      return ws().sent.at(-1);
    }
    case "ping": {
      const { client, ws } = await connectedClient(Client);
      client.ping().catch(() => {});
      return ws().sent.at(-1);
    }
    case "subscribe": {
      const { client, ws } = await connectedClient(Client);
      client.subscribe(message.channel, { since: message.since, epoch: message.epoch }).catch(() => {});
      return ws().sent.at(-1);
    }
    case "unsubscribe": {
      const { client, ws } = await connectedClient(Client);
      const pending = client.subscribe(message.channel);
      const request = ws().sent.at(-1);
      ws().receive({ type: "subscribed", seq: 1, ref: request.id, channel: message.channel, epoch: "e", offset: 0, recovered: false });
      (await pending).unsubscribe().catch(() => {});
      return ws().sent.at(-1);
    }
    case "publish": {
      const { client, ws } = await connectedClient(Client);
      client.publish(message.channel, message.data).catch(() => {});
      return ws().sent.at(-1);
    }
    case "send": {
      const { client, ws } = await connectedClient(Client);
      client.send(message.to, message.data).catch(() => {});
      return ws().sent.at(-1);
    }
    default:
      return null;
  }
}

// Fields of each message type the client knows (anything else in a vector
// is a forward-compatibility example the client has no reason to send).
const KNOWN = {
  hello: ["type", "protocol", "session", "last_seq", "snapshot", "token", "agent", "id"],
  generate: [
    "type", "id", "messages", "stream", "provider", "model", "params", "channel", "tools", "tool_choice",
    "max_steps", "thread", "on_busy",
  ],
};

describe("client-valid vectors can be produced by the client", () => {
  for (const vector of clientValid) {
    test(`${vector.name}: ${vector.description}`, async (t) => {
      const message = vector.message;
      const sent = await produce(message);
      if (sent === null) {
        t.skip(`the client does not send ${message.type}`);
        return;
      }
      const known = KNOWN[message.type];
      const unknown = known ? Object.keys(message).filter((k) => !known.includes(k)) : [];
      if (unknown.length) t.diagnostic(`not produced (unknown to the protocol): ${unknown.join(", ")}`);
      assert.deepEqual(shape(sent), shape(message, unknown));
      if (message.type !== "hello" && message.type !== "ack") {
        assert.equal(typeof sent.id, "string", "requests carry an id");
        assert.ok(sent.id.length >= 1 && sent.id.length <= 64);
        if (message.id !== undefined && message.type === "generate") assert.equal(sent.id, message.id);
      }
    });
  }
});

describe("client-invalid vectors", () => {
  test("an id over 64 characters is refused before it is sent", async () => {
    const vector = clientInvalid.find((v) => v.name === "id-too-long.json");
    assert.ok(vector, "id-too-long.json exists");
    const raw = JSON.parse(vector.raw);
    const { client, ws } = await connectedClient(Client);
    await assert.rejects(client.request(raw), TypeError);
    assert.equal(ws().sent.filter((m) => m.id === raw.id).length, 0);
  });

  test("every one names the error the server answers with, a code the client knows", () => {
    const known = new Set(Object.values(ERROR_CODES));
    for (const vector of clientInvalid) {
      assert.equal(typeof vector.raw, "string", vector.name);
      assert.equal(typeof vector.error?.code, "string", vector.name);
      assert.ok(known.has(vector.error.code), `${vector.name}: ${vector.error.code} is in ERROR_CODES`);
    }
  });
});

test("an error frame before hello rejects connect() with a typed error, never a ConnectionLostError", async () => {
  const frame = serverValid.find((v) => v.message.type === "error" && v.message.seq === undefined)?.message;
  assert.ok(frame);
  const { client, MockWebSocket } = await connectedClient(Client, {}, { connect: false });
  const connecting = client.connect();
  MockWebSocket.last.open();
  MockWebSocket.last.receive(frame);
  await assert.rejects(connecting, (e) => !(e instanceof ConnectionLostError) && e.code === frame.code);
  void WELCOME;
});

// The same vectors over the HTTP transport: each server-valid frame, written
// as the server writes it on an event stream (event id = its seq), comes out
// of the client's SSE reader byte for byte, in chunks cut anywhere.
describe("server-valid vectors over the HTTP transport", async () => {
  const { SseParser } = await import("../src/sse.js");
  test("every frame survives the event stream, with its seq as the event id", () => {
    let wire = 'event: connection\ndata: {"connection":"t"}\n\n';
    for (const vector of serverValid) {
      const frame = JSON.stringify(vector.message);
      wire += `${typeof vector.message.seq === "number" ? `id: ${vector.message.seq}\n` : ""}data: ${frame}\n\n:\n\n`;
    }
    const events = [];
    const parser = new SseParser((event) => events.push(event));
    for (let i = 0; i < wire.length; i += 7) parser.feed(wire.slice(i, i + 7));
    assert.equal(events.length, serverValid.length + 1);
    assert.equal(events[0].event, "connection");
    serverValid.forEach((vector, i) => {
      const event = events[i + 1];
      assert.equal(event.event, "message", vector.name);
      assert.deepEqual(JSON.parse(event.data), vector.message, vector.name);
      assert.equal(event.id, typeof vector.message.seq === "number" ? String(vector.message.seq) : null, vector.name);
    });
  });
});
