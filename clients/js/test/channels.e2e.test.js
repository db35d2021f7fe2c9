// Channels, presence and direct messages against the real server, written
// against PROTOCOL.md. A server that answers `not_implemented` makes these
// tests skip with that reason.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { describe, test } from "node:test";
import WebSocket from "ws";

import { Client, WsServerError } from "../src/index.js";
import { useServer } from "./helpers/server.js";

const fixture = useServer();
const { clients } = fixture;

const unique = (name) => `${name}-${randomBytes(3).toString("hex")}`;

async function agent(name) {
  const client = new Client(fixture.server.url, {
    WebSocket,
    heartbeatIntervalMs: 0,
    requestTimeoutMs: 10_000,
    agent: unique(name),
  });
  clients.push(client);
  await client.connect();
  return client;
}

/** Run `fn`; a `not_implemented` answer skips the test with the server's words. */
async function orSkip(t, fn) {
  try {
    return await fn();
  } catch (error) {
    if (error instanceof WsServerError && error.code === "not_implemented") {
      t.skip(`the server answers not_implemented: ${error.detail}`);
      return undefined;
    }
    throw error;
  }
}

/** Resolve when `predicate()` holds (checked on every event of `emitter`), or fail after `ms`. */
function until(predicate, emitter, event, ms = 5000) {
  return new Promise((resolve, reject) => {
    if (predicate()) return resolve();
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out waiting on ${event}`));
    }, ms);
    const off = emitter.on(event, () => {
      if (predicate()) {
        clearTimeout(timer);
        off();
        resolve();
      }
    });
  });
}

describe("channels", () => {
  test("presence, publish and receive, unsubscribe", async (t) => {
    const alice = await agent("alice");
    const bob = await agent("bob");
    const room = unique("room");
    const a = await orSkip(t, () => alice.subscribe(room));
    if (!a) return;
    assert.equal(a.name, room);
    assert.equal(typeof a.epoch, "string");
    const presence = [];
    a.onPresence((p) => presence.push(p));
    const b = await bob.subscribe(room);
    assert.ok(b.members.has(alice.agent) && b.members.has(bob.agent), [...b.members].join());
    await until(() => a.members.has(bob.agent), a, "presence");
    assert.equal(presence.at(-1).joined, bob.agent);

    const got = [];
    b.onMessage((m) => got.push(m));
    const own = [];
    a.onMessage((m) => own.push(m));
    const offset = await alice.publish(room, { step: 1 });
    assert.equal(typeof offset, "number");
    const offset2 = await a.publish("two");
    assert.equal(offset2, offset + 1);
    await until(() => got.length === 2, b, "message");
    assert.deepEqual(got, [
      { channel: room, offset, from: alice.agent, data: { step: 1 } },
      { channel: room, offset: offset2, from: alice.agent, data: "two" },
    ]);
    await until(() => own.length === 2, a, "message");
    assert.deepEqual(own.map((m) => m.data), [{ step: 1 }, "two"], "a subscribed publisher gets its own messages");

    await b.unsubscribe();
    await until(() => !a.members.has(bob.agent), a, "presence");
    assert.equal(presence.at(-1).left, bob.agent);
    await alice.publish(room, "after");
    await bob.ping();
    assert.equal(got.length, 2, "nothing after unsubscribe");
  });

  test("a stream generated with `channel` is seen token by token by the channel's subscribers", async (t) => {
    const alice = await agent("alice");
    const bob = await agent("bob");
    const room = unique("room");
    const b = await orSkip(t, () => bob.subscribe(room));
    if (!b) return;
    const seen = new Promise((resolve) => b.once("stream", resolve));
    const stream = await alice.generate("share this", { channel: room, params: { reply_tokens: 40 } });
    const remote = await seen;
    assert.equal(remote.from, alice.agent);
    assert.equal(remote.id, stream.id);
    const deltas = [];
    remote.on("delta", (d) => deltas.push(d.index));
    const local = await stream.wait();
    if (!remote.done) await new Promise((resolve) => remote.once("end", resolve));
    assert.equal(remote.text, local.text);
    assert.equal(remote.result.reason, "complete");
    assert.equal(remote.result.usage.output_tokens, 40);
  });

  test("after a network loss the channel recovers what was published meanwhile, once each, in order", async (t) => {
    const alice = await agent("alice");
    const bob = await agent("bob");
    const room = unique("room");
    const a = await orSkip(t, () => alice.subscribe(room));
    if (!a) return;
    const got = [];
    a.onMessage((m) => got.push(m.data));
    const recovered = [];
    a.on("subscribed", (s) => recovered.push(s.recovered));
    await bob.publish(room, 0);
    await until(() => got.length === 1, a, "message");
    alice._ws._socket.destroy();
    for (let i = 1; i <= 5; i++) await bob.publish(room, i);
    await until(() => got.length === 6, a, "message");
    for (let i = 6; i <= 8; i++) await bob.publish(room, i);
    await until(() => got.length === 9, a, "message");
    assert.deepEqual(got, [0, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert.deepEqual(recovered, [true], "re-subscribed with since/epoch and recovered");
    assert.equal(a.duplicates >= 0, true);
  });

  test("a new client subscribing with since/epoch gets the history after that offset", async (t) => {
    const alice = await agent("alice");
    const room = unique("room");
    const a = await orSkip(t, () => alice.subscribe(room));
    if (!a) return;
    const first = await alice.publish(room, "one");
    await alice.publish(room, "two");
    await alice.publish(room, "three");
    const carol = await agent("carol");
    const got = [];
    const c = await carol.subscribe(room, { since: first, epoch: a.epoch, onMessage: (m) => got.push(m.data) });
    assert.equal(c.recovered, true);
    await until(() => got.length >= 2, c, "message");
    assert.deepEqual(got.slice(0, 2), ["two", "three"]);
  });

  test("bad names and limits are typed errors", async (t) => {
    const alice = await agent("alice");
    const sub = await orSkip(t, () => alice.subscribe(unique("ok")));
    if (!sub) return;
    await assert.rejects(alice.subscribe("no spaces allowed"), (e) => e instanceof WsServerError && e.code === "bad_name");
    await assert.rejects(alice.publish("bad name", 1), (e) => e.code === "bad_name");
  });
});

describe("direct messages", () => {
  test("send reaches the named agent's onMessage; an unknown agent is unknown_agent", async (t) => {
    const alice = await agent("alice");
    const bob = await agent("bob");
    const got = [];
    bob.onMessage((m) => got.push(m));
    const sent = await orSkip(t, () => alice.send(bob.agent, { task: "x" }).then(() => true));
    if (!sent) return;
    await until(() => got.length === 1, bob, "message");
    assert.equal(got[0].from, alice.agent);
    assert.deepEqual(got[0].data, { task: "x" });
    assert.equal(typeof got[0].seq, "number", "direct messages are session-bound");
    await assert.rejects(alice.send(unique("nobody"), 1), (e) => e instanceof WsServerError && e.code === "unknown_agent");
  });

  test("a direct message sent while the recipient's network is down arrives after its resume", async (t) => {
    const alice = await agent("alice");
    const bob = await agent("bob");
    const got = [];
    bob.onMessage((m) => got.push(m.data));
    const ok = await orSkip(t, () => alice.send(bob.agent, "before").then(() => true));
    if (!ok) return;
    await until(() => got.length === 1, bob, "message");
    bob._ws._socket.destroy();
    await alice.send(bob.agent, "during");
    await until(() => got.length === 2, bob, "message");
    assert.deepEqual(got, ["before", "during"]);
  });
});
