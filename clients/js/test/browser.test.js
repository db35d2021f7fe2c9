// The demo page in a real browser (headless Chromium through playwright-core)
// against the real server: a prompt streams, Stop cancels, typing while an
// answer streams steers it, a network loss mid-answer loses or doubles no
// token, a reload resumes the running answer from a snapshot, another
// agent's channel traffic shows up, reasoning streams collapsed, a demo
// tool round trip runs (also across a reload mid-arguments), and an agent
// run: the page's tools answer by themselves, a pending approval shows
// Approve/Deny (also after a reload), and a second agent (the page's
// helper) answers a call. Saves screenshots to test/artifacts/.
//
// The page reaches the server through a TCP proxy, so the test can cut the
// connection the way a network does (both ends see it die).
//
// Chromium: $CHROMIUM_PATH or /usr/bin/chromium (Debian's `chromium`
// package). Missing, it skips with the reason; under CI=true it fails.

import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";

import { Client } from "../src/index.js";
import { startProxy } from "./helpers/proxy.js";
import { startServer } from "./helpers/server.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.join(here, "artifacts");
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const CI = process.env.CI === "true" || process.env.CI === "1";

let missing = null;
if (!existsSync(CHROMIUM)) missing = `no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)`;
let chromium = null;
if (!missing) {
  try {
    ({ chromium } = await import("playwright-core"));
  } catch (error) {
    missing = `playwright-core is not installed (npm ci in clients/js): ${error.message}`;
  }
}

if (missing && CI) {
  test("a browser is available under CI", () => {
    assert.fail(missing);
  });
}

/** A browser and a page whose errors (console errors not matching `expected`) go to `problems`. */
async function openPage(problems, expected) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  const context = await browser.newContext({ viewport: { width: 1280, height: 820 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.on("pageerror", (error) => problems.push(`pageerror: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error" && !expected.test(message.text())) problems.push(`console.error: ${message.text()}`);
  });
  return { browser, page };
}

describe("demo page in Chromium", { skip: missing && !CI ? missing : false }, () => {
  if (missing) return;
  let server;
  let proxy;
  let browser;
  let page;
  let node; // a Node client: computes expected texts, plays another agent
  const problems = [];

  before(async () => {
    server = await startServer();
    proxy = await startProxy(server.port);
    ({ browser, page } = await openPage(problems, /WebSocket|ERR_CONNECTION|net::/));
    node = new Client(server.url, { WebSocket, heartbeatIntervalMs: 0, requestTimeoutMs: 10_000, agent: "node-bot" });
    await node.connect();
    mkdirSync(ARTIFACTS, { recursive: true });
  });

  after(async () => {
    await browser?.close();
    await node?.close();
    await proxy?.close();
    await server?.stop();
  });

  const base = () => `http://127.0.0.1:${proxy.port}/`;
  const answers = () => page.locator('[data-testid="answer"]');
  const answer = (i) => answers().nth(i);

  async function state() {
    return page.getAttribute('[data-testid="status"]', "data-state");
  }

  async function waitState(...states) {
    await page.waitForFunction(
      (wanted) => wanted.includes(document.querySelector('[data-testid="status"]').dataset.state),
      states,
      { timeout: 10_000 },
    );
  }

  async function waitText(i, minLength) {
    await page.waitForFunction(
      ([index, n]) => {
        const el = document.querySelectorAll('[data-testid="answer"]')[index];
        return el && el.querySelector(".text").textContent.length >= n;
      },
      [i, minLength],
      { timeout: 10_000 },
    );
  }

  async function waitStatus(i, ...statuses) {
    await page.waitForFunction(
      ([index, wanted]) => {
        const el = document.querySelectorAll('[data-testid="answer"]')[index];
        return el && wanted.includes(el.dataset.status);
      },
      [i, statuses],
      { timeout: 15_000 },
    );
  }

  async function say(text) {
    await page.fill('[data-testid="prompt"]', text);
    await page.press('[data-testid="prompt"]', "Enter");
  }

  async function setOptions(speed, replyTokens) {
    await page.click(".options summary");
    await page.fill('[data-testid="opt-speed"]', String(speed));
    await page.fill('[data-testid="opt-reply-tokens"]', String(replyTokens));
    await page.click(".options summary");
  }

  /** What the simulated provider answers to the messages of answer i (it is deterministic). */
  async function expectedFor(i, replyTokens) {
    const turns = await page.evaluate(() => window.__wsserverDemo.turns.filter((t) => t.role === "assistant"));
    const messages = turns[i].messages;
    assert.ok(messages, `answer ${i} keeps its request`);
    const stream = await node.generate(messages, { params: { reply_tokens: replyTokens, tokens_per_s: 0 } });
    return (await stream.wait()).text;
  }

  async function until(predicate, ms = 5000) {
    const deadline = Date.now() + ms;
    while (!predicate()) {
      if (Date.now() > deadline) throw new Error("timed out");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  async function recordStates() {
    await page.evaluate(() => {
      window.__states = [];
      window.__wsserverClient.on("state", (s) => window.__states.push(s));
    });
  }

  test("loads, connects, and streams a prompt; Stop cancels it mid-stream", async () => {
    await page.goto(`${base()}?tokens_per_s=50&reply_tokens=400&agent=browser-1`);
    await waitState("open");
    assert.equal(await page.getAttribute("html", "data-connection"), "open");
    assert.equal(await page.textContent('[data-testid="status-label"]'), "Connected");

    await say("Tell me how streaming works");
    await waitText(0, 40);
    assert.equal(await answer(0).getAttribute("data-status"), "streaming");
    assert.equal(await page.isEnabled('[data-testid="stop"]'), true);
    assert.equal(await page.textContent('[data-testid="send"]'), "Steer");
    await page.click('[data-testid="stop"]');
    await waitStatus(0, "cancelled");
    const out = Number(await answer(0).getAttribute("data-output-tokens"));
    assert.ok(out > 0 && out < 400, `cancelled after ${out} tokens`);
    assert.match(await answer(0).locator('[data-testid="answer-ttft"]').textContent(), /^TTFT \d+ ms$/);
    assert.match(await answer(0).locator('[data-testid="answer-usage"]').textContent(), new RegExp(`in · ${out} out tokens`));
    const text = await answer(0).locator(".text").textContent();
    assert.ok(text.startsWith('You said "Tell me how streaming works".'), text);
    assert.equal(await page.isEnabled('[data-testid="stop"]'), false);
    assert.equal(await page.textContent('[data-testid="send"]'), "Send");
  });

  test("typing while an answer streams steers it", async () => {
    await say("Write about dragons");
    await waitText(1, 40);
    await say("Make it about cats");
    await waitStatus(1, "interrupted");
    await waitText(2, 30);
    const steered = await answer(2).locator(".text").textContent();
    assert.ok(steered.startsWith('You said "Make it about cats".'), steered);
    assert.equal(await page.locator(".turn.user.steer").count(), 1);
    // the page's conversation mirrors the server's steered one
    const history = await page.evaluate(() => window.__wsserverDemo.history);
    assert.deepEqual(history.slice(-3).map((m) => m.role), ["user", "assistant", "user"]);
    assert.equal(history.at(-1).content, "Make it about cats");
    await page.click('[data-testid="stop"]');
    await waitStatus(2, "cancelled");
  });

  test("a network loss mid-answer: the page reconnects, resumes, and the text is intact", async () => {
    await setOptions(80, 160);
    await recordStates();
    await say("Survive a network loss");
    await waitText(3, 60);
    assert.ok(proxy.dropAll() >= 1, "the page's connection went through the proxy");
    await waitStatus(3, "complete");
    const states = await page.evaluate(() => window.__states);
    assert.deepEqual(states.slice(0, 2), ["reconnecting", "resumed"]);
    assert.equal(await state(), "resumed");
    const text = await answer(3).locator(".text").textContent();
    assert.equal(text, await expectedFor(3, 160), "no token lost or doubled");
    assert.equal(await answer(3).getAttribute("data-output-tokens"), "160");
    await page.screenshot({ path: path.join(ARTIFACTS, "demo-after-resume.png") });
  });

  test("a reload mid-answer resumes the session and the running answer (snapshot)", async () => {
    await setOptions(80, 200);
    const session = await page.evaluate(() => window.__wsserverClient.session);
    await say("Survive a reload");
    await waitText(4, 60);
    await page.reload();
    await waitState("resumed");
    assert.equal(await page.evaluate(() => window.__wsserverClient.session), session, "the same session");
    assert.equal(await answers().count(), 5, "the transcript is restored");
    await waitStatus(4, "complete");
    const text = await answer(4).locator(".text").textContent();
    assert.equal(text, await expectedFor(4, 200));
    const first = await answer(0).locator(".text").textContent();
    assert.ok(first.startsWith('You said "Tell me how streaming works".'), "earlier answers are kept");
  });

  test("the channel panel: join, presence, messages, another agent's stream, sharing answers", async () => {
    const channel = await node.subscribe("lobby");
    await page.fill('[data-testid="channel-name"]', "lobby");
    await page.click('[data-testid="join"]');
    await page.waitForSelector('[data-testid="channel-state"].on');
    await page.waitForSelector('[data-testid="members"] li[data-member="node-bot"]');
    await page.waitForSelector('[data-testid="members"] li[data-member="browser-1"]');
    await until(() => channel.members.has("browser-1"));

    await node.publish("lobby", { text: "Hello from a Node agent" });
    await page.waitForSelector('[data-testid="feed-message"] >> text=Hello from a Node agent');
    const stream = await node.generate("Summarise the plan for the team", {
      channel: "lobby",
      params: { reply_tokens: 45, tokens_per_s: 0 },
    });
    const result = await stream.wait();
    await page.waitForFunction(
      (expected) =>
        [...document.querySelectorAll('[data-testid="feed-stream"]')].some(
          (el) => el.querySelector(".body").textContent === expected && el.dataset.status === "complete",
        ),
      result.text,
      { timeout: 10_000 },
    );

    // the page's own answers go to the channel too ("Share" is on): node-bot sees them token by token
    await setOptions(0, 30);
    const seen = new Promise((resolve) => channel.once("stream", resolve));
    await say("Share this with the team");
    const remote = await seen;
    assert.equal(remote.from, "browser-1");
    await waitStatus(5, "complete");
    if (!remote.done) await new Promise((resolve) => remote.once("end", resolve));
    assert.equal(remote.text, await answer(5).locator(".text").textContent());

    await page.fill('[data-testid="publish-text"]', "Thanks, on it.");
    await page.click('[data-testid="publish"]');
    await page.waitForSelector('[data-testid="feed-message"] >> text=Thanks, on it.');
    await page.fill('[data-testid="prompt"]', "What should we do next?");
    await page.screenshot({ path: path.join(ARTIFACTS, "demo.png") });
    assert.deepEqual(problems, [], "no page errors");
  });

  test("reasoning streams collapsed; a demo tool round trip: the page runs the calls and continues", async () => {
    await page.click('[data-testid="new-chat"]');
    await setOptions(60, 150); // long enough to quote both results
    await page.click(".options summary");
    await page.selectOption('[data-testid="opt-reasoning"]', "low");
    assert.equal(await page.isChecked('[data-testid="opt-tools"]'), true, "demo tools are on by default");
    await page.click(".options summary");
    await say("get_time UTC and get_weather Paris");
    // the reasoning block shows up while the answer streams, collapsed
    await page.waitForSelector('[data-testid="answer"] [data-testid="reasoning"]:not([hidden])', { timeout: 10_000 });
    assert.equal(await answer(0).locator('[data-testid="reasoning"]').getAttribute("open"), null, "collapsed");
    // two calls, name and arguments as they stream, then each one's result
    await waitStatus(0, "tool_calls");
    const calls = answer(0).locator('[data-testid="tool-call"]');
    assert.equal(await calls.count(), 2);
    assert.deepEqual(await calls.locator('[data-testid="tool-name"]').allTextContents(), ["get_time", "get_weather"]);
    assert.deepEqual(JSON.parse(await calls.nth(1).locator('[data-testid="tool-args"]').textContent()), { city: "Paris" });
    await page.waitForFunction(
      () => [...document.querySelectorAll('[data-testid="tool-result"]')].filter((el) => !el.hidden).length === 2,
      null,
      { timeout: 10_000 },
    );
    const weather = JSON.parse(await calls.nth(1).locator('[data-testid="tool-result"]').textContent());
    assert.equal(weather.city, "Paris");
    // the next step answers with the results: it quotes them
    await waitStatus(1, "complete");
    const text = await answer(1).locator(".text").textContent();
    assert.ok(text.startsWith(`get_time returned "{`), text);
    assert.ok(text.includes(`get_weather returned "${JSON.stringify(weather).slice(0, 40)}`), text);
    // the conversation as the server saw it: the signed assistant message, the two results
    const history = await page.evaluate(() => window.__wsserverDemo.history);
    assert.deepEqual(history.map((m) => m.role), ["user", "assistant", "tool", "tool", "assistant"]);
    const [reasoning] = history[1].content;
    assert.equal(reasoning.type, "reasoning");
    assert.match(reasoning.signature, /^sim-/);
    assert.deepEqual(history[1].tool_calls.map((c) => c.name), ["get_time", "get_weather"]);
    assert.deepEqual(history.slice(2, 4).map((m) => m.tool_call_id), history[1].tool_calls.map((c) => c.id));
    await answer(0).locator('[data-testid="reasoning"] summary').click();
    assert.equal(await answer(0).locator('[data-testid="reasoning"]').getAttribute("open"), "");
    await page.screenshot({ path: path.join(ARTIFACTS, "demo-tools.png") });
    assert.deepEqual(problems, [], "no page errors");
  });

  test("a reload mid-arguments picks the call up from the snapshot", async () => {
    await page.click('[data-testid="new-chat"]');
    await setOptions(8, 20);
    await page.click(".options summary");
    await page.selectOption('[data-testid="opt-reasoning"]', "");
    await page.click(".options summary");
    await say("get_weather Reykjavik please");
    await page.waitForFunction(
      () => (document.querySelector('[data-testid="tool-args"]')?.textContent.length ?? 0) >= 6,
      null,
      { timeout: 10_000 },
    );
    await page.reload();
    await waitState("resumed");
    await waitStatus(0, "tool_calls");
    const args = await answer(0).locator('[data-testid="tool-args"]').textContent();
    assert.deepEqual(JSON.parse(args), { city: "Reykjavik" }, "no fragment lost or doubled across the reload");
    await waitStatus(1, "complete");
    assert.ok((await answer(1).locator(".text").textContent()).startsWith('get_weather returned "{'));
    assert.deepEqual(problems, [], "no page errors");
  });

  test("an agent run: the page's tools answer, Approve/Deny survives a reload, the helper agent answers", async () => {
    await page.click('[data-testid="new-chat"]');
    await setOptions(0, 30);
    await page.click(".options summary");
    await page.check('[data-testid="opt-run"]');
    await page.click(".options summary");
    await say("get_weather in Oslo, then book_table in Oslo, then ask_helper on Oslo");
    // step 1: get_weather, answered by the page's own handler; step 2: book_table waits for an approval
    await page.waitForSelector('[data-testid="answer"] [data-testid="approve"]', { timeout: 10_000 });
    assert.equal(await answers().count(), 1, "the whole run is one answer");
    assert.equal(await answer(0).getAttribute("data-status"), "waiting");
    const calls = answer(0).locator('[data-testid="tool-call"]');
    assert.deepEqual(await calls.locator('[data-testid="tool-name"]').allTextContents(), ["get_weather", "book_table"]);
    assert.equal(JSON.parse(await calls.nth(0).locator('[data-testid="tool-result"]').textContent()).city, "Oslo");
    assert.equal(await calls.nth(1).getAttribute("data-state"), "waiting-approval");
    await page.screenshot({ path: path.join(ARTIFACTS, "demo-approval.png") });
    // a reload: the pending approval comes back from the snapshot, buttons and all
    await page.reload();
    await waitState("resumed");
    await page.waitForSelector('[data-testid="answer"] [data-testid="approve"]', { timeout: 10_000 });
    assert.equal(await answer(0).locator('[data-testid="tool-call"]').count(), 2);
    await answer(0).locator('[data-testid="approve"]').click();
    // book_table runs in the page, ask_helper is answered by the helper agent (another session), then the answer
    await waitStatus(0, "complete");
    const done = answer(0).locator('[data-testid="tool-call"]');
    assert.deepEqual(await done.locator('[data-testid="tool-name"]').allTextContents(), ["get_weather", "book_table", "ask_helper"]);
    assert.equal(JSON.parse(await done.nth(1).locator('[data-testid="tool-result"]').textContent()).booked, true);
    const helped = JSON.parse(await done.nth(2).locator('[data-testid="tool-result"]').textContent());
    assert.equal(helped.topic, "Oslo");
    assert.equal(await page.textContent('[data-testid="helper-count"]'), "1");
    assert.equal(await answer(0).locator('[data-testid="approve"]').count(), 0, "no buttons once decided");
    assert.ok((await answer(0).locator(".text").textContent()).includes('ask_helper returned "{'));
    const history = await page.evaluate(() => window.__wsserverDemo.history);
    assert.deepEqual(history.map((m) => m.role), ["user", "assistant", "tool", "assistant", "tool", "assistant", "tool", "assistant"]);
    await page.screenshot({ path: path.join(ARTIFACTS, "demo-agent-run.png") });
    // Deny: the model is told, and says so
    await setOptions(0, 30); // (the reload prefilled the page's query options again)
    await say("book_table in Paris");
    await page.waitForSelector('[data-testid="answer"] >> nth=1 >> [data-testid="deny"]', { timeout: 10_000 });
    await answer(1).locator('[data-testid="deny"]').click();
    await waitStatus(1, "complete");
    assert.equal(await answer(1).locator('[data-testid="tool-call"]').getAttribute("data-state"), "denied");
    assert.ok((await answer(1).locator(".text").textContent()).includes('book_table returned "{"error":"denied"'));
    assert.deepEqual(problems, [], "no page errors");
  });
});

// The same demo page, unchanged, behind a proxy that refuses the WebSocket
// upgrade (as some corporate proxies do): the client falls back to the HTTP
// transport by itself and every feature keeps working.
describe("demo page in Chromium behind a proxy that refuses WebSockets", { skip: missing && !CI ? missing : false }, () => {
  if (missing) return;
  let server;
  let proxy;
  let browser;
  let page;
  let node;
  const problems = [];

  before(async () => {
    server = await startServer();
    proxy = await startProxy(server.port, "127.0.0.1", { refuseUpgrade: true });
    ({ browser, page } = await openPage(problems, /WebSocket|ERR_CONNECTION|net::|403/));
    node = new Client(server.url, { WebSocket, heartbeatIntervalMs: 0, requestTimeoutMs: 10_000, agent: "node-bot-2" });
    await node.connect();
    mkdirSync(ARTIFACTS, { recursive: true });
  });

  after(async () => {
    await browser?.close();
    await node?.close();
    await proxy?.close();
    await server?.stop();
  });

  const answer = (i) => page.locator('[data-testid="answer"]').nth(i);
  const waitFor = (fn, arg, timeout = 15_000) => page.waitForFunction(fn, arg, { timeout });
  const waitText = (i, n) =>
    waitFor(([index, min]) => {
      const el = document.querySelectorAll('[data-testid="answer"]')[index];
      return el && el.querySelector(".text").textContent.length >= min;
    }, [i, n]);
  const waitStatus = (i, ...statuses) =>
    waitFor(([index, wanted]) => {
      const el = document.querySelectorAll('[data-testid="answer"]')[index];
      return el && wanted.includes(el.dataset.status);
    }, [i, statuses]);
  async function say(text) {
    await page.fill('[data-testid="prompt"]', text);
    await page.press('[data-testid="prompt"]', "Enter");
  }

  test("falls back to the HTTP transport; chat, Stop, steering and channels work", async () => {
    await page.goto(`http://127.0.0.1:${proxy.port}/?tokens_per_s=50&reply_tokens=400&agent=browser-http`);
    await waitFor(() => ["open", "resumed"].includes(document.querySelector('[data-testid="status"]').dataset.state));
    assert.equal(await page.evaluate(() => window.__wsserverClient.transport), "sse");
    assert.ok(proxy.refused >= 1, "the page's WebSocket was refused by the proxy");

    await say("Tell me how streaming works");
    await waitText(0, 40);
    await page.click('[data-testid="stop"]');
    await waitStatus(0, "cancelled");
    const out = Number(await answer(0).getAttribute("data-output-tokens"));
    assert.ok(out > 0 && out < 400, `cancelled after ${out} tokens`);

    await say("Write about dragons");
    await waitText(1, 40);
    await say("Make it about cats");
    await waitStatus(1, "interrupted");
    await waitText(2, 30);
    assert.ok((await answer(2).locator(".text").textContent()).startsWith('You said "Make it about cats".'));
    await page.click('[data-testid="stop"]');
    await waitStatus(2, "cancelled");

    const channel = await node.subscribe("lobby-http");
    await page.fill('[data-testid="channel-name"]', "lobby-http");
    await page.click('[data-testid="join"]');
    await page.waitForSelector('[data-testid="members"] li[data-member="node-bot-2"]', { timeout: 10_000 });
    await node.publish("lobby-http", { text: "Hello over plain HTTP" });
    await page.waitForSelector('[data-testid="feed-message"] >> text=Hello over plain HTTP', { timeout: 10_000 });
    const heard = new Promise((resolve) => channel.onMessage((m) => m.from === "browser-http" && resolve(m)));
    await page.fill('[data-testid="publish-text"]', "Heard you.");
    await page.click('[data-testid="publish"]');
    assert.equal((await heard).data?.text ?? (await heard).data, "Heard you.");
    await page.screenshot({ path: path.join(ARTIFACTS, "demo-http-transport.png") });
    assert.deepEqual(problems, [], "no page errors");
  });
});
