// The AI SDK transport (src/ai-sdk.js) against the real `ai` package: its
// readUIMessageStream builds the UI message from our chunks. Recorded frames
// for the rich vocabulary (reasoning, tool calls: DESIGN v2), and end to end
// against the real server for text, finish, abort and error.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  AbstractChat,
  lastAssistantMessageIsCompleteWithApprovalResponses,
  lastAssistantMessageIsCompleteWithToolCalls,
  readUIMessageStream,
} from "ai";
import WebSocket from "ws";

import { FrameMapper, WsServerChatTransport, answersFor, toWireMessages } from "../src/ai-sdk.js";
import { Client, WsServerError } from "../src/index.js";
import { startServer, useServer } from "./helpers/server.js";

/** Chunks -> the last UI message readUIMessageStream builds (errors collected). */
async function uiMessage(chunks, errors = []) {
  const stream = chunks instanceof ReadableStream ? chunks : new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(chunk);
      controller.close();
    },
  });
  let last;
  for await (const message of readUIMessageStream({ stream, onError: (e) => errors.push(e) })) last = message;
  return last;
}

async function collect(stream) {
  const chunks = [];
  const reader = stream.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return chunks;
    chunks.push(value);
  }
}

function mapAll(frames) {
  const mapper = new FrameMapper();
  return frames.flatMap((frame) => mapper.push(frame));
}

const usage = { input_tokens: 3, output_tokens: 5 };

describe("FrameMapper with recorded frames", () => {
  test("text: start, deltas, finish stop", async () => {
    const chunks = mapAll([
      { type: "stream.start", seq: 1, stream: "s1", provider: "simulated", model: "sim-1" },
      { type: "stream.delta", seq: 2, stream: "s1", index: 0, text: "Hel" },
      { type: "stream.delta", seq: 3, stream: "s1", index: 1, text: "lo" },
      { type: "stream.end", seq: 4, stream: "s1", reason: "complete", usage, duration_ms: 1 },
    ]);
    assert.deepEqual(chunks.at(-1), { type: "finish", finishReason: "stop" });
    const message = await uiMessage(chunks);
    assert.equal(message.id, "s1");
    assert.equal(message.role, "assistant");
    const text = message.parts.filter((p) => p.type === "text");
    assert.deepEqual(text.map((p) => [p.text, p.state]), [["Hello", "done"]]);
  });

  test("reasoning, then text, then a tool call whose arguments stream (reason tool_calls)", async () => {
    const frames = [
      { type: "stream.start", seq: 1, stream: "s2", provider: "simulated", model: "sim-1" },
      { type: "stream.delta", seq: 2, stream: "s2", index: 0, part: "reasoning", text: "The user wants " },
      { type: "stream.delta", seq: 3, stream: "s2", index: 1, part: "reasoning", text: "the weather." },
      { type: "stream.delta", seq: 4, stream: "s2", index: 2, text: "Let me look." },
      { type: "stream.tool_call", seq: 5, stream: "s2", index: 3, call: "c1", name: "get_weather" },
      { type: "stream.delta", seq: 6, stream: "s2", index: 4, part: "tool_call", call: "c1", text: '{"city":' },
      { type: "stream.delta", seq: 7, stream: "s2", index: 5, part: "tool_call", call: "c1", text: '"Paris"}' },
      {
        type: "stream.end", seq: 8, stream: "s2", reason: "tool_calls", usage, duration_ms: 1,
        message: {
          role: "assistant",
          content: [{ type: "reasoning", text: "The user wants the weather." }, { type: "text", text: "Let me look." }],
          tool_calls: [{ id: "c1", name: "get_weather", arguments: { city: "Paris" } }],
        },
      },
    ];
    const chunks = mapAll(frames);
    assert.ok(chunks.some((c) => c.type === "tool-input-delta" && c.inputTextDelta === '{"city":'));
    assert.deepEqual(chunks.at(-1), { type: "finish", finishReason: "tool-calls" });
    const message = await uiMessage(chunks);
    const kinds = message.parts.filter((p) => p.type !== "step-start").map((p) => p.type);
    assert.deepEqual(kinds, ["reasoning", "text", "tool-get_weather"]);
    const [reasoning, text, tool] = message.parts.filter((p) => p.type !== "step-start");
    assert.equal(reasoning.text, "The user wants the weather.");
    assert.equal(text.text, "Let me look.");
    assert.equal(tool.toolCallId, "c1");
    assert.equal(tool.state, "input-available");
    assert.deepEqual(tool.input, { city: "Paris" });
  });

  test("an interrupted stream with a partial tool call: abort, the call is an input error", async () => {
    const chunks = mapAll([
      { type: "stream.start", seq: 1, stream: "s3", provider: "p", model: "m" },
      { type: "stream.tool_call", seq: 2, stream: "s3", index: 0, call: "c9", name: "search" },
      { type: "stream.delta", seq: 3, stream: "s3", index: 1, part: "tool_call", call: "c9", text: '{"q": "ca' },
      { type: "stream.end", seq: 4, stream: "s3", reason: "interrupted", usage, duration_ms: 1,
        message: { role: "assistant", content: "" } },
    ]);
    assert.deepEqual(chunks.at(-1), { type: "abort", reason: "interrupted" });
    assert.ok(chunks.some((c) => c.type === "tool-input-error" && c.toolCallId === "c9"));
    const message = await uiMessage(chunks);
    const tool = message.parts.find((p) => p.type === "tool-search");
    assert.equal(tool.state, "output-error");
  });

  test("an error end is an error chunk (the chat's error)", async () => {
    const chunks = mapAll([
      { type: "stream.start", seq: 1, stream: "s4", provider: "p", model: "m" },
      { type: "stream.delta", seq: 2, stream: "s4", index: 0, text: "par" },
      { type: "stream.end", seq: 3, stream: "s4", reason: "error", error: { code: "provider_error", message: "boom" },
        usage, duration_ms: 1 },
    ]);
    assert.deepEqual(chunks.at(-1), { type: "error", errorText: "provider_error: boom" });
    const errors = [];
    const message = await uiMessage(chunks, errors);
    assert.deepEqual(errors.map((e) => e.message), ["provider_error: boom"]);
    assert.equal(message.parts.find((p) => p.type === "text").text, "par", "the text so far is kept");
  });

  test("a snapshot after a resume gives the text so far", async () => {
    const chunks = mapAll([
      { type: "stream.snapshot", seq: 9, stream: "s5", text: "so far", index: 4 },
      { type: "stream.delta", seq: 10, stream: "s5", index: 4, text: " and more" },
      { type: "stream.end", seq: 11, stream: "s5", reason: "length", usage, duration_ms: 1 },
    ]);
    const message = await uiMessage(chunks);
    assert.equal(message.parts.find((p) => p.type === "text").text, "so far and more");
  });
});

describe("FrameMapper: agent runs", () => {
  const message = {
    role: "assistant", content: "Calling lookup.",
    tool_calls: [{ id: "c1", name: "lookup", arguments: { topic: "Oslo" } }],
  };
  const call = { type: "stream.tool_call", seq: 3, stream: "r", index: 1, call: "c1", name: "lookup" };
  const start = { type: "stream.start", seq: 1, stream: "r", provider: "simulated", model: "sim-1" };

  test("an agent's call keeps the response open: input, output, next step, finish", async () => {
    const mapper = new FrameMapper();
    const chunks = [
      start,
      { type: "stream.delta", seq: 2, stream: "r", index: 0, text: "Calling lookup." },
      call,
      { type: "stream.delta", seq: 4, stream: "r", index: 2, part: "tool_call", call: "c1", text: '{"topic":"Oslo"}' },
      { type: "stream.waiting", seq: 5, stream: "r", step: 1, message, calls: [{ ...message.tool_calls[0], wait: "agent", agent: "librarian" }] },
      { type: "stream.tool_result", seq: 6, stream: "r", call: "c1", name: "lookup", content: "capital of Norway", from: "librarian" },
      { type: "stream.step", seq: 7, stream: "r", step: 2 },
      { type: "stream.delta", seq: 8, stream: "r", index: 3, text: "It is the capital." },
      { type: "stream.end", seq: 9, stream: "r", reason: "complete", usage, duration_ms: 1, steps: 2,
        message: { role: "assistant", content: "It is the capital." } },
    ].flatMap((frame) => mapper.push(frame));
    assert.equal(chunks.filter((c) => c.type === "finish").length, 1, "one response: nothing waited for the page");
    assert.equal(chunks.filter((c) => c.type === "tool-input-available").length, 1, "the input once");
    const ui = await uiMessage(chunks);
    const tool = ui.parts.find((p) => p.type === "tool-lookup");
    assert.equal(tool.state, "output-available");
    assert.equal(tool.output, "capital of Norway");
    assert.equal(ui.parts.filter((p) => p.type === "step-start").length, 2);
    assert.equal(ui.parts.filter((p) => p.type === "text").at(-1).text, "It is the capital.");
  });

  test("an approval ends the response with an approval request; a denial is output-denied", async () => {
    const mapper = new FrameMapper();
    const first = [start, call, { type: "stream.waiting", seq: 4, stream: "r", step: 1, message,
      calls: [{ ...message.tool_calls[0], wait: "approval", agent: "librarian" }] }].flatMap((f) => mapper.push(f));
    assert.equal(mapper.paused, true);
    assert.deepEqual(first.slice(-3), [
      { type: "tool-approval-request", approvalId: "c1", toolCallId: "c1" },
      { type: "finish-step" },
      { type: "finish", finishReason: "tool-calls" },
    ]);
    const ui = await uiMessage(first);
    const tool = ui.parts.find((p) => p.type === "tool-lookup");
    assert.equal(tool.state, "approval-requested");
    assert.equal(tool.approval.id, "c1");
    // what useChat sends after addToolApprovalResponse: an approve for the run
    tool.state = "approval-responded";
    tool.approval = { id: "c1", approved: false, reason: "no" };
    assert.deepEqual(answersFor([ui], mapper.waiting), [{ type: "approve", call: "c1", approved: false, reason: "no" }]);
    const denied = mapper.push({ type: "stream.tool_result", seq: 5, stream: "r", call: "c1", name: "lookup", error: "denied",
      content: '{"error":"denied","message":"the user denied this call","reason":"no"}' });
    assert.deepEqual(denied, [{ type: "tool-output-denied", toolCallId: "c1" }]);
    assert.equal(mapper.paused, false);
  });
});

describe("toWireMessages", () => {
  test("text, images, reasoning with its signature, tool calls and their results", () => {
    const wire = toWireMessages([
      { id: "1", role: "system", parts: [{ type: "text", text: "Be brief." }] },
      { id: "2", role: "user", parts: [{ type: "text", text: "Weather " }, { type: "text", text: "in Paris?" }] },
      {
        id: "3", role: "assistant", parts: [
          { type: "step-start" },
          { type: "reasoning", text: "Look it up.", providerMetadata: { wsserver: { signature: "sig" } } },
          { type: "dynamic-tool", toolName: "get_weather", toolCallId: "c1", state: "output-available",
            input: { city: "Paris" }, output: { temp: 21 } },
        ],
      },
      { id: "4", role: "user", parts: [{ type: "text", text: "and this?" },
        { type: "file", mediaType: "image/png", url: "data:image/png;base64,AAAA" }] },
    ]);
    assert.deepEqual(wire, [
      { role: "system", content: "Be brief." },
      { role: "user", content: "Weather in Paris?" },
      { role: "assistant", content: [{ type: "reasoning", text: "Look it up.", signature: "sig" }],
        tool_calls: [{ id: "c1", name: "get_weather", arguments: { city: "Paris" } }] },
      { role: "tool", tool_call_id: "c1", content: '{"temp":21}' },
      { role: "user", content: [{ type: "text", text: "and this?" }, { type: "image", url: "data:image/png;base64,AAAA" }] },
    ]);
  });
});

describe("end to end against the server", () => {
  const fixture = useServer();
  const { clients } = fixture;

  function transport(options = {}) {
    const client = new Client(fixture.server.url, { WebSocket, heartbeatIntervalMs: 0, ...options.clientOptions });
    clients.push(client);
    return new WsServerChatTransport({ client, ...options });
  }

  const ask = (text) => [{ id: "u1", role: "user", parts: [{ type: "text", text }] }];

  test("text and finish", async () => {
    const chat = transport({ params: { reply_tokens: 25 } });
    const stream = await chat.sendMessages({ trigger: "submit-message", chatId: "c1", messages: ask("hello"),
      messageId: undefined, abortSignal: undefined });
    const chunks = await collect(stream);
    assert.deepEqual(chunks.at(-1), { type: "finish", finishReason: "stop" });
    const message = await uiMessage(chunks);
    const text = message.parts.find((p) => p.type === "text").text;
    assert.ok(text.startsWith('You said "hello".'), text);
    const again = await chat.client.generate("hello", { params: { reply_tokens: 25 } });
    assert.equal((await again.wait()).text, text, "the whole answer, once");
  });

  test("reasoning and a tool call from the simulated provider, through readUIMessageStream", async () => {
    const tools = [{
      name: "get_weather",
      description: "the weather in a city",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    }];
    const chat = transport({
      params: { reasoning: { effort: "low" } },
      prepareGenerate: (messages) => ({ messages, tools }),
    });
    const chunks = await collect(await chat.sendMessages({ chatId: "c-tools", messages: ask("get_weather in Paris please"),
      trigger: "submit-message", messageId: undefined, abortSignal: undefined }));
    assert.ok(chunks.some((c) => c.type === "reasoning-delta"), "reasoning streamed");
    assert.ok(chunks.some((c) => c.type === "tool-input-delta"), "the arguments streamed");
    assert.deepEqual(chunks.at(-1), { type: "finish", finishReason: "tool-calls" });
    const message = await uiMessage(chunks);
    const parts = message.parts.filter((p) => p.type !== "step-start");
    assert.equal(parts[0].type, "reasoning");
    assert.ok(parts[0].text.length > 0);
    const tool = parts.find((p) => p.type === "tool-get_weather");
    assert.equal(tool.state, "input-available");
    assert.equal(typeof tool.input.city, "string");
    assert.ok(tool.input.city.length > 0, JSON.stringify(tool.input));
  });

  // (A bound of its own: this test sometimes hangs, a known flake; a hang fails here, by name, in 30 s.)
  test("an agent run in useChat's own loop (AbstractChat): a client-side tool, an approval, another agent", { timeout: 30_000 }, async () => {
    const librarian = new Client(fixture.server.url, { WebSocket, heartbeatIntervalMs: 0, agent: "ai-librarian" });
    clients.push(librarian);
    await librarian.connect();
    librarian.tools.register("lookup", (args) => ({ topic: args.topic, summary: "capital of Norway" }));
    const tools = [
      { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } },
      { name: "lookup", agent: "ai-librarian", approval: true,
        parameters: { type: "object", properties: { topic: { type: "string" } }, required: ["topic"] } },
    ];
    const wsTransport = transport({ prepareGenerate: (messages) => ({ messages, tools, maxSteps: 3 }) });
    const state = {
      status: "ready", error: undefined, messages: [],
      pushMessage(m) { this.messages = [...this.messages, m]; },
      popMessage() { this.messages = this.messages.slice(0, -1); },
      replaceMessage(i, m) { this.messages = this.messages.map((old, j) => (j === i ? m : old)); },
      snapshot: (thing) => structuredClone(thing),
    };
    class TestChat extends AbstractChat {}
    let chat;
    chat = new TestChat({
      id: "run-chat",
      transport: wsTransport,
      state,
      sendAutomaticallyWhen: (options) =>
        lastAssistantMessageIsCompleteWithToolCalls(options) || lastAssistantMessageIsCompleteWithApprovalResponses(options),
      onToolCall: ({ toolCall }) => {
        if (toolCall.toolName === "get_weather") {
          chat.addToolOutput({ tool: "get_weather", toolCallId: toolCall.toolCallId, output: `4 C in ${toolCall.input.city}` });
        }
      },
    });
    const until = async (condition) => {
      for (let i = 0; i < 500 && !condition(); i++) await new Promise((r) => setTimeout(r, 10));
      assert.ok(condition(), JSON.stringify(state.messages.at(-1)?.parts, null, 1));
    };
    const lookupPart = () => state.messages.at(-1)?.parts.find((p) => p.type === "tool-lookup");
    await chat.sendMessage({ text: "get_weather in Oslo, then lookup Oslo" });
    await until(() => lookupPart()?.state === "approval-requested" && chat.status === "ready");
    await chat.addToolApprovalResponse({ id: lookupPart().approval.id, approved: true });
    await until(() => chat.status === "ready" && lookupPart()?.state === "output-available"
      && state.messages.at(-1).parts.at(-1).type === "text" && state.messages.at(-1).parts.at(-1).state === "done");
    const assistant = state.messages.at(-1);
    assert.equal(state.messages.length, 2, "one user message, one assistant message for the whole run");
    const weather = assistant.parts.find((p) => p.type === "tool-get_weather");
    assert.equal(weather.state, "output-available");
    assert.equal(weather.output, "4 C in Oslo");
    assert.deepEqual(JSON.parse(lookupPart().output), { topic: "Oslo", summary: "capital of Norway" });
    assert.ok(assistant.parts.at(-1).text.startsWith('lookup returned "'), assistant.parts.at(-1).text);
    assert.equal(assistant.parts.filter((p) => p.type === "step-start").length >= 3, true);
  });

  test("the same over the HTTP transport, with max_tokens: finish length", async () => {
    const chat = transport({ params: { reply_tokens: 40, max_tokens: 7 }, clientOptions: { transport: "sse" } });
    const message = await uiMessage(await chat.sendMessages({ chatId: "c2", messages: ask("short"),
      trigger: "submit-message", messageId: undefined, abortSignal: undefined }));
    assert.ok(message.parts.some((p) => p.type === "text" && p.text.length > 0));
    assert.equal(chat.client.transport, "sse");
  });

  test("the abort signal cancels the generation upstream: abort chunk, stream.end cancelled", async () => {
    const chat = transport({ params: { reply_tokens: 100_000, tokens_per_s: 200 } });
    const ends = [];
    chat.client.on("frame", (f) => f.type === "stream.end" && ends.push(f));
    const controller = new AbortController();
    const stream = await chat.sendMessages({ chatId: "c3", messages: ask("go on"), abortSignal: controller.signal,
      trigger: "submit-message", messageId: undefined });
    const reader = stream.getReader();
    const chunks = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      chunks.push(value);
      if (value.type === "text-delta" && chunks.filter((c) => c.type === "text-delta").length === 3) controller.abort();
    }
    assert.deepEqual(chunks.at(-1), { type: "abort", reason: "cancelled" });
    assert.equal(ends.length, 1);
    assert.equal(ends[0].reason, "cancelled");
    assert.ok(ends[0].usage.output_tokens < 1000, "stopped early");
  });

  test("reconnectToStream gives the running stream from its beginning, then live", async () => {
    const chat = transport({ params: { reply_tokens: 60, tokens_per_s: 300 } });
    const first = (await chat.sendMessages({ chatId: "c4", messages: ask("resume"), trigger: "submit-message",
      messageId: undefined, abortSignal: undefined })).getReader();
    await first.read();
    await first.read();
    const resumed = await chat.reconnectToStream({ chatId: "c4" });
    assert.ok(resumed, "a running stream");
    const message = await uiMessage(resumed);
    const reference = await chat.client.generate("resume", { params: { reply_tokens: 60, tokens_per_s: 0 } });
    assert.equal(message.parts.find((p) => p.type === "text").text, (await reference.wait()).text);
    assert.equal(await chat.reconnectToStream({ chatId: "c4" }), null, "ended: nothing to resume");
    assert.equal(await chat.reconnectToStream({ chatId: "nope" }), null);
  });

  test("a refused generate rejects with the server's code", async () => {
    const chat = transport({ provider: "nonesuch" });
    await assert.rejects(
      chat.sendMessages({ chatId: "c5", messages: ask("x"), trigger: "submit-message", messageId: undefined,
        abortSignal: undefined }),
      (error) => error instanceof WsServerError && error.code === "provider_unavailable",
    );
  });

  test("a stream that ends in error (the server shuts down mid-answer) is an error chunk", async () => {
    const own = await startServer(["--drain-timeout", "0.2"]);
    const client = new Client(own.url, { WebSocket, heartbeatIntervalMs: 0, reconnect: false });
    try {
      const chat = new WsServerChatTransport({ client, params: { reply_tokens: 100_000, tokens_per_s: 100 } });
      const reader = (await chat.sendMessages({ chatId: "c6", messages: ask("long"), trigger: "submit-message",
        messageId: undefined, abortSignal: undefined })).getReader();
      const chunks = [(await reader.read()).value];
      const stopping = own.stop();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        chunks.push(value);
      }
      await stopping;
      const last = chunks.at(-1);
      assert.equal(last.type, "error");
      assert.match(last.errorText, /^shutdown: /);
    } finally {
      await client.close();
      await own.stop();
    }
  });
});
