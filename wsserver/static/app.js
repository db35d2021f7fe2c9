// The wsserver demo page: a chat with streaming, Stop, steering and usage,
// reasoning (shown collapsed as it streams), tool calls (name and arguments
// as they stream) with a built-in demo tool round trip (tools.js: the page
// runs the tools the model calls and continues the conversation with their
// results), agent runs (the "Agent run" option: the server loops, the
// page's client answers the demo tools as handlers, a pending approval shows
// Approve/Deny, a second agent in the page answers ask_helper), and a
// channel panel with presence, messages and other agents' streams.
// It uses the bundled client as is (no build step) and keeps its session,
// last seq and transcript in sessionStorage, so a reload resumes the
// session (`snapshot: true`) and picks running answers up where they are.
//
// Query parameters: agent, channel, provider, model, max_tokens,
// tokens_per_s, reply_tokens, reasoning (an effort: minimal, low, medium,
// high), tools=0 (no demo tools), run=1 (agent runs) (prefill the options),
// autojoin=1.
//
// Hooks for tests: data-testid attributes, data-state on the status pill
// (and data-connection on <html>), window.__wsserverClient and
// window.__wsserverDemo.

import { Client, WsServerError } from "/client/index.js";
import { DEMO_TOOLS, helperAnswer, runTool, runTools } from "/static/tools.js";

const STORE_KEY = "wsserver-demo/v1";
const FEED_LIMIT = 200;
/** Tool round trips the page makes by itself after one message of yours. */
const MAX_TOOL_STEPS = 4;
/** Steps of an agent run. */
const RUN_STEPS = 6;
const query = new URLSearchParams(location.search);
const $ = (id) => document.querySelector(`[data-testid="${id}"]`);

// ------------------------------------------------------------------ state

const stored = loadStore();
/** The conversation sent with each generate. */
let history = stored.history ?? [];
/** Turns on screen: {role, text, reasoning, calls, stream, status, meta, steer, messages}. */
let turns = [];
/** The answer streaming now: {turn, stream}. */
let current = null;
/** The last generate's request (for tests): {messages, options}. */
let lastRequest = null;
const agent = query.get("agent") || stored.agent || null;
let channel = null;
let channelState = stored.channel ?? { name: query.get("channel") || "lobby", joined: false, share: true };
let feed = [];
let firstWelcome = true;
let sessionWasLost = false;

const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`;
const client = new Client(url, {
  agent,
  session: stored.session ?? null,
  lastSeq: stored.lastSeq ?? 0,
  snapshot: Boolean(stored.session),
});
window.__wsserverClient = client;
// The demo tools answer an agent run's calls by themselves (client.tools).
for (const tool of runTools(null)) {
  if (!tool.agent) client.tools.register(tool.name, async (args) => JSON.parse(await runTool({ name: tool.name, arguments: args })));
}
/** The helper: a second agent (its own session) that answers ask_helper; started for agent runs. */
const helperName = stored.helper?.name ?? `helper-${Math.random().toString(36).slice(2, 8)}`;
let helper = null;
let helperCount = stored.helper?.count ?? 0;

function startHelper() {
  if (helper) return helper;
  const saved = stored.helper?.name === helperName ? stored.helper : {};
  helper = new Client(url, { agent: helperName, session: saved.session ?? null, lastSeq: saved.lastSeq ?? 0 });
  window.__wsserverHelper = helper;
  helper.tools.register("ask_helper", (args) => {
    helperCount += 1;
    $("helper-count").textContent = String(helperCount);
    save();
    return helperAnswer(args);
  });
  helper.on("frame", save);
  $("helper").hidden = false;
  $("helper-name").textContent = helperName;
  $("helper-count").textContent = String(helperCount);
  helper.connect().catch((error) => console.warn("wsserver: the helper agent could not connect", error));
  return helper;
}
window.__wsserverDemo = {
  get history() {
    return history.map((m) => ({ ...m }));
  },
  get turns() {
    return turns.map(serializeTurn);
  },
  get lastRequest() {
    return lastRequest;
  },
  get channel() {
    return channel;
  },
};

// ---------------------------------------------------------------- storage

function loadStore() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE_KEY) ?? "{}") ?? {};
  } catch {
    return {};
  }
}

let saveTimer = null;
function save() {
  if (saveTimer !== null) return;
  saveTimer = setTimeout(saveNow, 250);
}

function saveNow() {
  clearTimeout(saveTimer);
  saveTimer = null;
  const data = {
    session: client.session,
    lastSeq: client.lastSeq,
    agent,
    history,
    turns: turns.map(serializeTurn),
    channel: channel ? { ...channelState, offset: channel.offset, epoch: channel.epoch } : channelState,
    helper: helper ? { name: helperName, session: helper.session, lastSeq: helper.lastSeq, count: helperCount } : stored.helper,
    run: $("opt-run").checked,
    feed: feed.slice(-FEED_LIMIT).map(({ kind, key, from, text, status, tokens, json }) => ({ kind, key, from, text, status, tokens, json })),
  };
  try {
    sessionStorage.setItem(STORE_KEY, JSON.stringify(data));
  } catch {
    // storage full or disabled: the page still works, it just won't resume
  }
}
addEventListener("pagehide", saveNow);

function serializeTurn({ role, text, reasoning, calls, stream, status, meta, steer, messages }) {
  const saved = calls ? [...calls.values()].map(({ id, name, arguments: args, result }) => ({ id, name, arguments: args, result })) : undefined;
  return { role, text, reasoning, calls: saved, stream, status, meta, steer, messages };
}

// ------------------------------------------------------------- formatting

function formatMs(ms) {
  if (ms == null) return "–";
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

function metaOf(result) {
  return {
    reason: result.reason,
    inputTokens: result.usage.inputTokens,
    outputTokens: result.usage.outputTokens,
    estimated: result.usage.estimated,
    ttftMs: result.ttftMs,
    durationMs: result.durationMs,
    error: result.error ? `${result.error.code}: ${result.error.message}` : undefined,
  };
}

// ------------------------------------------------------------- transcript

const transcript = $("transcript");

/** A new element: `<tag class=className data-testid=testid>text</tag>`. */
function element(tag, className, { testid, text } = {}) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (testid) el.dataset.testid = testid;
  if (text != null) el.textContent = text;
  return el;
}

/** Change `container` with `mutate()`, keeping it scrolled to the end if it was there. */
function growing(container, mutate) {
  const atEnd = container.scrollHeight - container.scrollTop - container.clientHeight < 80;
  mutate();
  if (atEnd) container.scrollTop = container.scrollHeight;
}

function addTurn(turn) {
  $("empty").hidden = true;
  const el = document.createElement("article");
  el.className = `turn ${turn.role}${turn.steer ? " steer" : ""}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = turn.role === "user" ? "You" : "Assistant";
  const text = document.createElement("div");
  text.className = "text";
  if (turn.steer) {
    const label = document.createElement("span");
    label.className = "steer-label";
    label.textContent = "Steered";
    el.append(label);
  }
  el.append(who);
  if (turn.role === "assistant") {
    // reasoning, collapsed, above the answer; the calls below it
    const reasoning = element("details", "reasoning", { testid: "reasoning" });
    reasoning.hidden = true;
    const body = element("div", "reasoning-text");
    reasoning.append(element("summary", null, { text: "Reasoning" }), body);
    el.append(reasoning);
    turn.reasoningEl = reasoning;
    turn.reasoningTextEl = body;
  }
  el.append(text);
  if (turn.role === "assistant") {
    const calls = element("div", "calls");
    el.append(calls);
    turn.callsEl = calls;
    el.dataset.testid = "answer";
    const meta = document.createElement("footer");
    meta.className = "meta";
    meta.dataset.testid = "answer-meta";
    el.append(meta);
    turn.metaEl = meta;
  } else {
    el.dataset.testid = "question";
  }
  turn.el = el;
  turn.textEl = text;
  text.textContent = turn.text ?? "";
  if (turn.role === "assistant") {
    const saved = Array.isArray(turn.calls) ? turn.calls : [];
    turn.calls = new Map();
    if (turn.reasoning) addReasoning(turn, turn.reasoning, false);
    for (const call of saved) {
      openCall(turn, call.id, call.name);
      addArguments(turn, call.id, call.arguments ?? "");
      if (call.result != null) showResult(turn, call.id, call.result);
    }
  }
  transcript.append(el);
  turns.push(turn);
  renderTurn(turn);
  transcript.scrollTop = transcript.scrollHeight;
  return turn;
}

function renderTurn(turn) {
  if (turn.role !== "assistant") return;
  turn.el.dataset.status = turn.status;
  if (turn.stream) turn.el.dataset.stream = turn.stream;
  const meta = turn.metaEl;
  meta.replaceChildren();
  const m = turn.meta;
  if (!m) return;
  const reason = document.createElement("span");
  reason.className = `reason ${m.reason}`;
  reason.dataset.testid = "answer-reason";
  reason.textContent = m.label ?? m.reason;
  meta.append(reason);
  if (m.outputTokens !== undefined) {
    const usage = document.createElement("span");
    usage.dataset.testid = "answer-usage";
    usage.textContent = `${m.inputTokens} in · ${m.outputTokens} out tokens${m.estimated ? " (estimated)" : ""}`;
    const ttft = document.createElement("span");
    ttft.dataset.testid = "answer-ttft";
    ttft.textContent = `TTFT ${formatMs(m.ttftMs)}`;
    const duration = document.createElement("span");
    duration.textContent = formatMs(m.durationMs);
    meta.append(usage, ttft, duration);
    turn.el.dataset.outputTokens = String(m.outputTokens);
  }
  if (m.error) {
    const error = document.createElement("span");
    error.textContent = m.error;
    meta.append(error);
  }
}

/** Reasoning text into the turn's collapsed block (its summary says when it streams). */
function addReasoning(turn, text, save_ = true) {
  if (!text) return;
  if (save_) turn.reasoning = (turn.reasoning ?? "") + text;
  turn.reasoningEl.hidden = false;
  turn.reasoningTextEl.append(text);
  if (save_) save();
}

function openCall(turn, id, name) {
  if (turn.calls.has(id)) return turn.calls.get(id);
  const el = element("div", "call", { testid: "tool-call" });
  el.dataset.call = id;
  const head = element("div", "call-head");
  const state = element("span", "call-state", { text: "calling…" });
  head.append(element("code", "call-name", { testid: "tool-name", text: name }), state);
  const args = element("pre", "call-args", { testid: "tool-args" });
  const result = element("pre", "call-result", { testid: "tool-result" });
  result.hidden = true;
  el.append(head, args, result);
  growing(transcript, () => turn.callsEl.append(el));
  const call = { id, name, arguments: "", result: null, el, argsEl: args, resultEl: result, stateEl: state };
  turn.calls.set(id, call);
  return call;
}

function addArguments(turn, id, text) {
  const call = turn.calls.get(id) ?? openCall(turn, id, "?");
  call.arguments += text;
  growing(transcript, () => call.argsEl.append(text));
}

function showResult(turn, id, content, error = null) {
  const call = turn.calls.get(id);
  if (!call) return;
  call.result = typeof content === "string" ? content : JSON.stringify(content);
  call.stateEl.textContent = error ?? "result";
  call.el.dataset.state = error ?? "done";
  call.resultEl.hidden = false;
  call.resultEl.textContent = call.result;
  call.decideEl?.remove();
  call.decideEl = null;
}

const WAIT_LABELS = { approval: "needs your approval", client: "running here…", agent: "asked agent" };

/** An agent run waits on `calls`: each one says what for; an approval gets Approve / Deny buttons. */
function showWaiting(turn, stream, calls) {
  for (const waiting of calls) {
    const call = turn.calls.get(waiting.id) ?? openCall(turn, waiting.id, waiting.name);
    if (call.result != null) continue;
    call.stateEl.textContent = waiting.wait === "agent" ? `${WAIT_LABELS.agent} ${waiting.agent}…` : WAIT_LABELS[waiting.wait];
    call.el.dataset.state = `waiting-${waiting.wait}`;
    if (waiting.wait !== "approval") {
      call.decideEl?.remove();
      call.decideEl = null;
      continue;
    }
    if (call.decideEl) continue;
    const buttons = element("div", "decide", { testid: "decide" });
    const approve = element("button", "primary", { testid: "approve", text: "Approve" });
    const deny = element("button", "secondary", { testid: "deny", text: "Deny" });
    approve.type = deny.type = "button";
    const decide = (approved) => {
      approve.disabled = deny.disabled = true;
      stream.approve(waiting.id, approved, approved ? {} : { reason: "denied on the demo page" }).catch((error) => {
        approve.disabled = deny.disabled = false;
        console.warn("approve failed", error);
      });
    };
    approve.addEventListener("click", () => decide(true));
    deny.addEventListener("click", () => decide(false));
    buttons.append(approve, deny);
    call.decideEl = buttons;
    growing(transcript, () => call.el.append(buttons));
  }
  turn.status = calls.length ? "waiting" : "streaming";
  renderTurn(turn);
}

function addAssistantFor(stream, turn = null) {
  turn ??= addTurn({ role: "assistant", text: "", status: "streaming" });
  bind(turn, stream);
  return turn;
}

/** Show `stream` in `turn`: its text so far, every later delta, and its end. */
function bind(turn, stream) {
  turn.stream = stream.id;
  turn.status = "streaming";
  turn.bound = true;
  turn.text = stream.text;
  turn.textEl.textContent = stream.text;
  // what came before the page listened (a snapshot, or frames with the start)
  turn.reasoning = "";
  turn.reasoningTextEl.textContent = "";
  addReasoning(turn, stream.reasoning);
  for (const call of stream.calls.values()) {
    openCall(turn, call.id, call.name);
    const seen = turn.calls.get(call.id).arguments;
    if (call.arguments.startsWith(seen)) addArguments(turn, call.id, call.arguments.slice(seen.length));
  }
  renderTurn(turn);
  current = { turn, stream };
  updateComposer();
  stream.on("delta", ({ text }) => {
    turn.text += text;
    growing(transcript, () => turn.textEl.append(text));
    save();
  });
  stream.on("reasoning", ({ text }) => growing(transcript, () => addReasoning(turn, text)));
  stream.on("tool_call", ({ call, name }) => {
    openCall(turn, call, name);
    save();
  });
  stream.on("tool_call_delta", ({ call, text }) => {
    addArguments(turn, call, text);
    save();
  });
  // an agent run: what it waits on, each result, the next step
  if (stream.waiting.size) showWaiting(turn, stream, [...stream.waiting.values()]);
  stream.on("waiting", ({ calls }) => {
    showWaiting(turn, stream, calls);
    save();
  });
  stream.on("tool_result", ({ call, content, error }) => {
    showResult(turn, call, content, error);
    save();
  });
  stream.on("step", () => {
    turn.status = "streaming";
    renderTurn(turn);
  });
  stream.finished.then(
    (result) => finish(turn, stream, result),
    (error) => finish(turn, stream, stream.result, error),
  );
}

function finish(turn, stream, result, error = null) {
  turn.text = stream.text;
  if (result) {
    turn.meta = metaOf(result);
    turn.status = result.reason;
    // the conversation goes on with what was said, exactly as the server
    // says it goes back (text, signed reasoning, tool calls)
    const message = result.message ?? { role: "assistant", content: result.text };
    if (result.messages) history.push(...result.messages); // an agent run: everything it added
    else if ((message.content?.length || message.tool_calls?.length) && result.reason !== "error") history.push(message);
    for (const call of turn.calls.values()) {
      call.decideEl?.remove();
      if (call.result == null && !result.toolCalls.some((c) => c.id === call.id)) {
        call.stateEl.textContent = "dropped"; // partial: not in the message
        call.el.dataset.state = "dropped";
      }
    }
    if (result.reason === "tool_calls" && result.toolCalls.length) {
      growing(transcript, () => renderTurn(turn));
      if (current?.turn === turn) current = null;
      runCalls(turn, result.toolCalls);
      return;
    }
  } else {
    turn.status = "lost";
    turn.meta = { reason: "lost", label: "lost", error: error?.message ?? "the connection was lost" };
  }
  growing(transcript, () => renderTurn(turn));
  if (current?.turn === turn) current = null;
  updateComposer();
  save();
}

/** Run the calls the model made, then continue the conversation with their results. */
async function runCalls(turn, calls) {
  const chat = chatNumber;
  const next = addTurn({ role: "assistant", text: "", status: "pending" });
  current = { turn: next, stream: null }; // the composer waits for the next step
  updateComposer();
  for (const call of calls) {
    const content = await runTool(call);
    if (chat !== chatNumber) return; // "New chat" meanwhile
    history.push({ role: "tool", tool_call_id: call.id, content });
    showResult(turn, call.id, content);
  }
  save();
  toolSteps += 1;
  if (toolSteps > MAX_TOOL_STEPS) {
    failTurn(next, new Error(`stopped after ${MAX_TOOL_STEPS} tool round trips`));
    return;
  }
  await generateInto(next);
}

// --------------------------------------------------------------- composer

const prompt = $("prompt");

function options() {
  const read = (id) => $(id).value.trim();
  const opts = {};
  if (read("opt-provider")) opts.provider = read("opt-provider");
  if (read("opt-model")) opts.model = read("opt-model");
  const params = {};
  for (const [id, key] of [
    ["opt-max-tokens", "max_tokens"],
    ["opt-speed", "tokens_per_s"],
    ["opt-reply-tokens", "reply_tokens"],
  ]) {
    const value = read(id);
    if (value !== "") params[key] = key === "tokens_per_s" ? Number(value) : Math.round(Number(value));
  }
  const effort = $("opt-reasoning").value;
  if (effort) params.reasoning = { effort };
  if (Object.keys(params).length) opts.params = params;
  if ($("opt-tools").checked) opts.tools = DEMO_TOOLS.map((t) => ({ ...t }));
  if ($("opt-run").checked) {
    startHelper();
    opts.tools = runTools(helperName);
    opts.maxSteps = RUN_STEPS;
  }
  if (channel && channelState.share) opts.channel = channel.name;
  return opts;
}

function updateComposer() {
  const streaming = Boolean(current?.stream && !current.stream.done);
  $("stop").disabled = !streaming;
  const send = $("send");
  send.textContent = streaming ? "Steer" : "Send";
  send.classList.toggle("steer", streaming);
  send.title = streaming ? "Interrupt the answer and continue with your new words" : "";
  prompt.placeholder = streaming
    ? "Type to steer the answer  (Enter interrupts it with your words)"
    : "Message  (Enter sends, Shift+Enter adds a line)";
}

async function submit() {
  const text = prompt.value.trim();
  if (!text) return;
  if (current && !current.stream) return; // a generate is on its way
  prompt.value = "";
  if (current?.stream && !current.stream.done) await steer(text);
  else await ask(text);
}

/** Tool round trips since your last message. */
let toolSteps = 0;
/** Counts "New chat" clicks (a tool round trip under way belongs to the old chat). */
let chatNumber = 0;

async function ask(text) {
  history.push({ role: "user", content: text });
  addTurn({ role: "user", text });
  toolSteps = 0;
  await generateInto(addTurn({ role: "assistant", text: "", status: "pending" }));
}

/** Generate the next answer of the conversation into `turn`. */
async function generateInto(turn) {
  const messages = history.map((m) => ({ ...m }));
  const opts = options();
  turn.messages = messages;
  lastRequest = { messages, options: opts };
  current = { turn, stream: null };
  updateComposer();
  try {
    const stream = await client.generate(messages, opts);
    bind(turn, stream);
  } catch (error) {
    failTurn(turn, error);
  }
  save();
}

async function steer(text) {
  const { stream } = current;
  addTurn({ role: "user", text, steer: true });
  toolSteps = 0;
  const turn = addTurn({ role: "assistant", text: "", status: "pending" });
  current = { turn, stream: null };
  updateComposer();
  try {
    const steered = await stream.interrupt(text);
    // the interrupted answer (its partial text) is in the history by now
    history.push({ role: "user", content: text });
    turn.messages = history.map((m) => ({ ...m }));
    lastRequest = { messages: turn.messages, options: { steeredFrom: stream.id } };
    bind(turn, steered);
  } catch (error) {
    failTurn(turn, error);
  }
  save();
}

function failTurn(turn, error) {
  turn.status = "error";
  const code = error instanceof WsServerError ? error.code : "error";
  turn.meta = { reason: "error", label: code, error: error.detail || error.message };
  renderTurn(turn);
  if (current?.turn === turn) current = null;
  updateComposer();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
$("stop").addEventListener("click", () => {
  current?.stream?.cancel().catch((error) => console.warn("cancel failed", error));
});
$("new-chat").addEventListener("click", () => {
  current?.stream?.cancel().catch(() => {});
  current = null;
  chatNumber += 1;
  history = [];
  for (const turn of turns) turn.el.remove();
  turns = [];
  $("empty").hidden = false;
  updateComposer();
  save();
});

for (const [id, key] of [
  ["opt-provider", "provider"],
  ["opt-model", "model"],
  ["opt-max-tokens", "max_tokens"],
  ["opt-speed", "tokens_per_s"],
  ["opt-reply-tokens", "reply_tokens"],
  ["opt-reasoning", "reasoning"],
]) {
  if (query.has(key)) $(id).value = query.get(key);
}
if (query.get("tools") === "0") $("opt-tools").checked = false;
if (query.get("run") === "1" || stored.run) $("opt-run").checked = true;
$("opt-run").addEventListener("change", save);
if (stored.helper) startHelper(); // (it resumes its session: calls routed to it meanwhile are in its log)

// ------------------------------------------------------------- connection

const LABELS = {
  connecting: "Connecting…",
  open: "Connected",
  reconnecting: "Reconnecting…",
  resumed: "Resumed",
  closed: "Disconnected",
};

function setStatus(state, detail = {}) {
  const pill = $("status");
  pill.dataset.state = state;
  document.documentElement.dataset.connection = state;
  let label = LABELS[state] ?? state;
  if (state === "open" && sessionWasLost) label = "Connected · new session";
  if (state !== "reconnecting") sessionWasLost = false;
  if (state === "closed" && detail.code === 4000) label = "Disconnected · opened in another tab";
  else if (state === "closed" && detail.code) label = `Disconnected (${detail.code})`;
  $("status-label").textContent = label;
  pill.title = client.session ? `session ${client.session}` : "";
  $("reconnect").hidden = state !== "closed";
}

client.on("state", (state, detail) => {
  setStatus(state, detail);
  if (state === "closed") {
    // a closed client ends its subscriptions; Reconnect joins again
    if (channel) {
      channelState = { ...channelState, offset: channel.offset, epoch: channel.epoch };
      channel = null;
      setChannelUi();
    }
    updateComposer();
    save();
  }
});
client.on("retry", ({ attempt, delayMs }) => {
  $("status-label").textContent = `Reconnecting… (attempt ${attempt}, ${formatMs(delayMs)})`;
});
client.on("welcome", () => {
  $("session").textContent = client.session ? `${client.session.slice(0, 8)}…` : "–";
  save();
  if (firstWelcome) {
    firstWelcome = false;
    afterFirstWelcome();
  }
});
client.on("heartbeat", ({ rttMs }) => ($("rtt").textContent = formatMs(rttMs)));
let seqShown = 0;
client.on("frame", () => {
  if (client.lastSeq !== seqShown) {
    seqShown = client.lastSeq;
    $("seq").textContent = String(seqShown);
    save();
  }
});
client.on("sessionLost", () => {
  sessionWasLost = true;
  for (const turn of turns) {
    if (turn.role === "assistant" && (turn.status === "streaming" || turn.status === "pending") && !turn.bound) {
      markAway(turn, "lost", "the session expired; the rest of this answer is lost");
    }
  }
});
// A stream the page did not start in this life: after a reload (snapshot) or
// a replay of a generate made by the previous page.
client.on("stream", (stream) => {
  const turn = turns.find((t) => t.role === "assistant" && t.stream === stream.id && !t.bound);
  addAssistantFor(stream, turn ?? null);
});
$("reconnect").addEventListener("click", () => {
  client.connect().then(rejoin, () => {});
});

function rejoin() {
  if (channelState.joined) {
    join(channelState.name, { since: channelState.offset ?? undefined, epoch: channelState.epoch ?? undefined });
  }
}

function markAway(turn, reason, text) {
  turn.status = reason;
  turn.meta = { reason, label: reason === "lost" ? "lost" : "ended while away", error: text };
  renderTurn(turn);
}

async function afterFirstWelcome() {
  // Snapshots of running streams come right after the welcome; a pong comes
  // after them. A stored answer that got none has ended while we were away.
  try {
    $("rtt").textContent = formatMs(await client.ping());
  } catch {
    return;
  }
  for (const turn of turns) {
    if (turn.role === "assistant" && (turn.status === "streaming" || turn.status === "pending") && !turn.bound) {
      markAway(turn, "away", "this answer finished while the page was away; its end was not kept");
    }
  }
  save();
}

// ---------------------------------------------------------------- channel

const feedEl = $("feed");

function setChannelUi() {
  const joined = Boolean(channel);
  $("join").textContent = joined ? "Leave" : "Join";
  $("channel-name").disabled = joined;
  $("publish").disabled = !joined;
  $("publish-text").disabled = !joined;
  const badge = $("channel-state");
  badge.textContent = joined ? `joined #${channel.name}` : "not joined";
  badge.classList.toggle("on", joined);
  renderMembers();
}

function renderMembers() {
  const list = $("members");
  const members = channel ? [...channel.members].sort() : [];
  list.replaceChildren(
    ...members.map((name) => {
      const li = document.createElement("li");
      li.textContent = name === agent ? `${name} (you)` : name;
      li.dataset.member = name;
      return li;
    }),
  );
  $("member-count").textContent = String(members.length);
}

function feedItem(item) {
  feedEl.querySelector(".feed-empty")?.remove();
  const el = document.createElement("div");
  el.className = `item ${item.kind}`;
  el.dataset.testid = `feed-${item.kind}`;
  if (item.kind === "presence") {
    el.textContent = item.text;
  } else {
    const from = document.createElement("div");
    from.className = "from";
    from.textContent = item.from === agent ? `${item.from} (you)` : item.from;
    if (item.kind === "stream") {
      const kind = document.createElement("span");
      kind.className = "kind";
      kind.textContent = streamLabel(item);
      from.append(kind);
      item.kindEl = kind;
    }
    const body = document.createElement("div");
    body.className = "body";
    if (item.json) body.classList.add("json");
    body.textContent = item.text;
    el.append(from, body);
    item.bodyEl = body;
  }
  if (item.status) el.dataset.status = item.status;
  if (item.key) el.dataset.stream = item.key;
  item.el = el;
  growing(feedEl, () => feedEl.append(el));
  feed.push(item);
  if (feed.length > FEED_LIMIT) feed.shift().el?.remove();
  save();
  return item;
}

function streamLabel(item) {
  if (item.status === "streaming") return "· streaming an answer";
  return `· ${item.status}${item.tokens != null ? ` · ${item.tokens} tokens` : ""}`;
}

function streamItem(remote) {
  const key = `${remote.from}/${remote.id}`;
  let item = feed.find((i) => i.kind === "stream" && i.key === key && i.status === "streaming");
  if (item) {
    // kept from before a reload; the recovery brings what came after it
    item.text += remote.text;
    item.bodyEl.append(remote.text);
  } else {
    item = feedItem({ kind: "stream", key, from: remote.from, text: remote.text, status: "streaming" });
  }
  remote.on("delta", ({ text }) => {
    item.text += text;
    growing(feedEl, () => item.bodyEl.append(text));
    save();
  });
  remote.on("end", (end) => {
    item.status = end.reason;
    item.tokens = end.usage?.output_tokens;
    item.el.dataset.status = end.reason;
    item.kindEl.textContent = streamLabel(item);
    save();
  });
}

async function join(name, { since, epoch } = {}) {
  if (channel) return;
  $("join").disabled = true;
  try {
    channel = await client.subscribe(name, {
      since,
      epoch,
      onMessage: (message) => {
        const data = message.data;
        if (data && typeof data === "object" && typeof data.type === "string" && data.type.startsWith("stream.")) {
          return; // a stream frame: shown by its stream item
        }
        const text = typeof data === "string" ? data : typeof data?.text === "string" ? data.text : JSON.stringify(data);
        feedItem({ kind: "message", from: message.from, text, json: typeof data !== "string" && typeof data?.text !== "string" });
      },
      onPresence: (event) => {
        if (event.joined) feedItem({ kind: "presence", text: `${event.joined} joined` });
        if (event.left) feedItem({ kind: "presence", text: `${event.left} left` });
        renderMembers();
      },
    });
    channel.on("stream", streamItem);
    channel.on("subscribed", () => renderMembers());
    channel.on("gap", () => feedItem({ kind: "presence", text: "some messages could not be recovered" }));
    channelState = { name, joined: true, share: $("share").checked };
  } catch (error) {
    feedItem({ kind: "presence", text: `could not join #${name}: ${error.code ?? ""} ${error.detail ?? error.message}` });
  } finally {
    $("join").disabled = false;
  }
  setChannelUi();
  save();
}

async function leave() {
  const ch = channel;
  channel = null;
  channelState = { name: channelState.name, joined: false, share: channelState.share };
  setChannelUi();
  save();
  await ch?.unsubscribe().catch(() => {});
}

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (channel) leave();
  else join($("channel-name").value.trim() || "lobby");
});
$("share").addEventListener("change", () => {
  channelState = { ...channelState, share: $("share").checked };
  save();
});
$("publish-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("publish-text");
  const text = input.value.trim();
  if (!text || !channel) return;
  input.value = "";
  try {
    await channel.publish({ text });
  } catch (error) {
    feedItem({ kind: "presence", text: `publish failed: ${error.code ?? ""} ${error.detail ?? error.message}` });
  }
});

// ---------------------------------------------------------------- restore

function restore() {
  $("me").textContent = agent ?? "anonymous (add ?agent=NAME)";
  $("channel-name").value = channelState.name ?? "lobby";
  $("share").checked = channelState.share !== false;
  for (const saved of stored.turns ?? []) {
    const turn = addTurn({ ...saved });
    if (turn.status === "pending") turn.status = "streaming";
    renderTurn(turn);
  }
  for (const item of stored.feed ?? []) feedItem(item);
  transcript.scrollTop = transcript.scrollHeight;
  feedEl.scrollTop = feedEl.scrollHeight;
  setChannelUi();
  updateComposer();
}

restore();
setStatus("connecting");
client.connect().then(
  () => {
    if (channelState.joined) rejoin();
    else if (query.get("autojoin") === "1") join(channelState.name);
  },
  (error) => console.warn("wsserver: could not connect", error),
);
prompt.focus();
