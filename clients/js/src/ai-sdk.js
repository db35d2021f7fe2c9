// An AI SDK `ChatTransport` over wsserver: `useChat` talks to a wsserver
// session (WebSocket, or the HTTP transport when WebSockets are blocked)
// instead of POSTing to a route handler.
//
//     import { useChat } from "@ai-sdk/react";
//     import { WsServerChatTransport } from "wsserver-client/ai-sdk";
//
//     const transport = new WsServerChatTransport({ url: "wss://example.com/", params: { max_tokens: 500 } });
//     const { messages, sendMessage, stop } = useChat({ transport });
//
// What it does:
// * sendMessages maps the UI messages to one `generate` (text, reasoning and
//   tool parts become wire messages in DESIGN v2's vocabulary) and the
//   stream's frames to UI message chunks (FrameMapper below): text,
//   reasoning, tool input, finish, abort, error.
// * The abort signal (useChat's stop()) cancels the generation upstream
//   (`cancel`: the provider's request is closed, which stops the bill).
// * The client resumes its session by itself after a network loss, so a
//   chat's stream just continues; reconnectToStream (useChat's
//   resumeStream(), e.g. after a component remounts) gives a running
//   stream again from its beginning (resumeStreamIsReplay), then live.
// * Agent runs (`prepareGenerate` returning `{maxSteps, tools}`): a run's
//   steps are the UI message's steps (`stream.step` -> finish-step,
//   start-step); a wait gives each call's complete input
//   (tool-input-available, so useChat's onToolCall runs client-side tools)
//   and, for a call that needs an approval, a tool-approval-request
//   (approvalId = the call's id); each result is tool-output-available,
//   tool-output-error, or tool-output-denied. A wait that needs the page (an
//   approval, or a result no handler of the client's `tools` gives) ends the
//   response (finish, "tool-calls") as useChat expects; when useChat sends
//   again (addToolOutput or addToolApprovalResponse, with
//   sendAutomaticallyWhen), the transport answers the run (`tool_result`,
//   `approve`) instead of starting a new generation, and the same stream
//   goes on in the same UI message. Calls answered elsewhere (by other
//   agents, by the client's handlers) keep the response open.
//
// It needs no import of the `ai` package: the chunks are plain objects of
// its UIMessageChunk shapes (tested against the real package's readers).

import { Client } from "./socket.js";

const END_TO_FINISH = Object.freeze({ complete: "stop", length: "length", tool_calls: "tool-calls" });

function textOf(parts) {
  return parts
    .filter((part) => part.type === "text")
    .map((part) => part.text)
    .join("");
}

function isToolPart(part) {
  return part.type === "dynamic-tool" || (typeof part.type === "string" && part.type.startsWith("tool-"));
}

function toolName(part) {
  return part.type === "dynamic-tool" ? part.toolName : part.type.slice("tool-".length);
}

/**
 * UI messages -> wire messages (DESIGN v2): text stays a string when it is
 * all there is; reasoning parts (with their signature) and image files
 * become content parts; an assistant's tool parts become `tool_calls`, and
 * those with an output a following `{role: "tool"}` message.
 */
export function toWireMessages(uiMessages) {
  const out = [];
  for (const message of uiMessages) {
    const parts = message.parts ?? [];
    if (message.role !== "assistant") {
      const images = parts.filter((p) => p.type === "file" && String(p.mediaType).startsWith("image/"));
      if (!images.length) out.push({ role: message.role, content: textOf(parts) });
      else {
        const content = parts
          .filter((p) => p.type === "text" || images.includes(p))
          .map((p) => (p.type === "text" ? { type: "text", text: p.text } : { type: "image", url: p.url }));
        out.push({ role: message.role, content });
      }
      continue;
    }
    const reasoning = parts.filter((p) => p.type === "reasoning" && p.text);
    const calls = parts.filter((p) => isToolPart(p) && p.input !== undefined && p.state !== "input-streaming");
    const wire = { role: "assistant" };
    if (reasoning.length) {
      wire.content = [
        ...reasoning.map((p) => {
          const signature = p.providerMetadata?.wsserver?.signature;
          return signature ? { type: "reasoning", text: p.text, signature } : { type: "reasoning", text: p.text };
        }),
        ...(textOf(parts) ? [{ type: "text", text: textOf(parts) }] : []),
      ];
    } else wire.content = textOf(parts);
    if (calls.length) {
      wire.tool_calls = calls.map((p) => ({ id: p.toolCallId, name: toolName(p), arguments: p.input ?? {} }));
    }
    out.push(wire);
    for (const part of calls) {
      if (part.state === "output-denied") {
        const reason = part.approval?.reason;
        out.push({ role: "tool", tool_call_id: part.toolCallId, content: denial(reason) });
      } else if (part.state === "output-available" || part.state === "output-error") {
        const content = part.state === "output-error" ? `error: ${part.errorText}` : part.output;
        out.push({
          role: "tool",
          tool_call_id: part.toolCallId,
          content: typeof content === "string" ? content : JSON.stringify(content),
        });
      }
    }
  }
  return out;
}

/** The content a denied call's result has (as the server makes it, PROTOCOL.md 4.4). */
function denial(reason) {
  const result = { error: "denied", message: "the user denied this call" };
  if (reason != null) result.reason = reason;
  return JSON.stringify(result);
}

/**
 * One stream's frames -> UI message chunks. `push(frame)` returns the chunks
 * the frame makes; `done` is true after the frame that ends the message.
 */
export class FrameMapper {
  /**
   * @param {{messageId?: string, needsPage?: (call: {id, name, wait, agent}) => boolean}} [options]
   *   needsPage: whether a waiting call needs the page (default: approvals and the client's results)
   */
  constructor({ messageId, needsPage } = {}) {
    this.messageId = messageId;
    this.needsPage = needsPage ?? ((call) => call.wait === "approval" || call.wait === "client");
    this.done = false;
    /** The last push ended the response for the page to answer the run (it goes on after). */
    this.paused = false;
    this._open = null; // {kind: "text" | "reasoning", id}
    this._blocks = 0;
    this._started = false;
    /** toolCallId -> {toolName, text} */
    this._calls = new Map();
    /** Calls whose complete input was given (tool-input-available), and approvals asked. */
    this._inputs = new Set();
    this._asked = new Set();
    /** An agent run that waits: call id -> what it waits for ("approval", "client", "agent"). */
    this.waiting = new Map();
  }

  _start(frame, out) {
    if (this._started) return;
    this._started = true;
    out.push({ type: "start", messageId: this.messageId ?? frame.stream });
    out.push({ type: "start-step" });
  }

  _close(out) {
    const open = this._open;
    if (open) out.push({ type: `${open.kind}-end`, id: open.id });
    this._open = null;
  }

  _text(kind, delta, out) {
    if (this._open?.kind !== kind) {
      this._close(out);
      this._blocks += 1;
      this._open = { kind, id: `${kind === "text" ? "t" : "r"}${this._blocks}` };
      out.push({ type: `${kind}-start`, id: this._open.id });
    }
    if (delta) out.push({ type: `${kind}-delta`, id: this._open.id, delta });
  }

  push(frame) {
    const out = [];
    this.paused = false;
    if (this.done) return out;
    switch (frame.type) {
      case "stream.start":
        this._start(frame, out);
        break;
      case "stream.snapshot": {
        // a resume with snapshot: what was said so far, then live
        this._start(frame, out);
        if (frame.reasoning) this._text("reasoning", frame.reasoning, out);
        if (frame.text) this._text("text", frame.text, out);
        break;
      }
      case "stream.delta": {
        this._start(frame, out);
        if (frame.part === "reasoning") this._text("reasoning", frame.text, out);
        else if (frame.part === "tool_call") {
          const call = this._calls.get(frame.call);
          if (call) {
            call.text += frame.text;
            out.push({ type: "tool-input-delta", toolCallId: frame.call, inputTextDelta: frame.text });
          }
        } else this._text("text", frame.text, out);
        break;
      }
      case "stream.tool_call": {
        this._start(frame, out);
        this._close(out);
        this._calls.set(frame.call, { toolName: frame.name, text: "" });
        out.push({ type: "tool-input-start", toolCallId: frame.call, toolName: frame.name });
        break;
      }
      case "stream.waiting":
        this._start(frame, out);
        this._wait(frame, out);
        break;
      case "stream.tool_result":
        this._start(frame, out);
        this.waiting.delete(frame.call);
        out.push(toolOutput(frame));
        break;
      case "stream.step":
        this._start(frame, out);
        this._close(out);
        this.waiting.clear();
        this._calls.clear();
        out.push({ type: "finish-step" }, { type: "start-step" });
        break;
      case "stream.end":
        this._start(frame, out);
        this._end(frame, out);
        break;
      default:
        break;
    }
    return out;
  }

  /** A run waits: each call's complete input, an approval request where one is needed. */
  _wait(frame, out) {
    this._close(out);
    for (const call of frame.message?.tool_calls ?? []) {
      if (this._inputs.has(call.id)) continue;
      this._inputs.add(call.id);
      if (!this._calls.has(call.id)) out.push({ type: "tool-input-start", toolCallId: call.id, toolName: call.name });
      out.push({ type: "tool-input-available", toolCallId: call.id, toolName: call.name, input: call.arguments ?? {} });
    }
    this.waiting = new Map((frame.calls ?? []).map((call) => [call.id, call.wait]));
    let ask = false;
    for (const call of frame.calls ?? []) {
      if (this.needsPage(call) && !this._asked.has(call.id)) {
        this._asked.add(call.id);
        ask = true;
        if (call.wait === "approval") out.push({ type: "tool-approval-request", approvalId: call.id, toolCallId: call.id });
      }
    }
    if (ask) {
      // the page answers (addToolOutput, addToolApprovalResponse): this response ends, the run goes on after
      out.push({ type: "finish-step" }, { type: "finish", finishReason: "tool-calls" });
      this.paused = true;
    }
  }

  _end(frame, out) {
    this._close(out);
    this.waiting.clear();
    const finished = new Map((frame.message?.tool_calls ?? []).map((call) => [call.id, call]));
    for (const [toolCallId, call] of this._calls) {
      if (this._inputs.has(toolCallId)) continue; // given when the run waited
      const done = finished.get(toolCallId);
      if (done) {
        out.push({ type: "tool-input-available", toolCallId, toolName: call.toolName, input: done.arguments ?? {} });
        continue;
      }
      let input;
      try {
        input = call.text ? JSON.parse(call.text) : {};
      } catch {
        out.push({
          type: "tool-input-error",
          toolCallId,
          toolName: call.toolName,
          input: call.text,
          errorText: "the tool call was cut off before its arguments were complete",
        });
        continue;
      }
      if (frame.reason === "tool_calls") out.push({ type: "tool-input-available", toolCallId, toolName: call.toolName, input });
    }
    const finish = END_TO_FINISH[frame.reason];
    if (finish) {
      out.push({ type: "finish-step" });
      out.push({ type: "finish", finishReason: finish });
    } else if (frame.reason === "error") {
      const error = frame.error ?? {};
      out.push({ type: "error", errorText: `${error.code ?? "error"}: ${error.message ?? "the generation failed"}` });
    } else {
      out.push({ type: "abort", reason: frame.reason }); // cancelled, interrupted
    }
    this.done = true;
  }
}

/** stream.tool_result -> its UI chunk. */
function toolOutput(frame) {
  const toolCallId = frame.call;
  if (frame.error === "denied") return { type: "tool-output-denied", toolCallId };
  if (frame.error) {
    let message = "";
    try {
      message = JSON.parse(frame.content).message ?? "";
    } catch {
      message = String(frame.content);
    }
    return { type: "tool-output-error", toolCallId, errorText: `${frame.error}: ${message}` };
  }
  return { type: "tool-output-available", toolCallId, output: frame.content };
}

/**
 * What the last UI message answers of a run that waits: tool outputs for
 * calls that wait for the client, approval responses for calls that wait
 * for one. [] when it answers nothing (a new message).
 */
export function answersFor(uiMessages, waiting) {
  const last = uiMessages?.at(-1);
  if (!last || last.role !== "assistant" || !waiting?.size) return [];
  const out = [];
  for (const part of last.parts ?? []) {
    if (!isToolPart(part)) continue;
    const wait = waiting.get(part.toolCallId);
    if (wait === "client" && (part.state === "output-available" || part.state === "output-error")) {
      const content = part.state === "output-error" ? JSON.stringify({ error: "tool_failed", message: part.errorText }) : part.output;
      out.push({ type: "tool_result", call: part.toolCallId, content: typeof content === "string" ? content : JSON.stringify(content ?? null) });
    } else if (wait === "approval" && part.state === "approval-responded" && part.approval) {
      const answer = { type: "approve", call: part.toolCallId, approved: Boolean(part.approval.approved) };
      if (part.approval.reason != null) answer.reason = part.approval.reason;
      out.push(answer);
    }
  }
  return out;
}

let counter = 0;

function randomTag() {
  return Math.random().toString(36).slice(2, 8);
}

export class WsServerChatTransport {
  /**
   * @param {object} options
   * @param {Client} [options.client] a wsserver Client (connected on first use if it is not)
   * @param {string} [options.url] else: the server's URL, for a Client made here
   * @param {object} [options.clientOptions] options of that Client (WebSocket, transport, token…)
   * @param {string} [options.provider]
   * @param {string} [options.model]
   * @param {object} [options.params] generate params (max_tokens, temperature…)
   * @param {(messages: object[], options: {chatId: string, body?: object}) => object} [options.prepareGenerate]
   *   last word on the generate request: gets the wire messages, returns `{messages?, ...generate options}`
   */
  constructor(options = {}) {
    if (!options.client && !options.url) throw new TypeError("WsServerChatTransport needs {client} or {url}");
    this.client = options.client ?? new Client(options.url, options.clientOptions ?? {});
    this.provider = options.provider;
    this.model = options.model;
    this.params = options.params;
    this.prepareGenerate = options.prepareGenerate;
    /** A reconnect gives the running stream from its beginning. */
    this.resumeStreamIsReplay = true;
    /** chatId -> {streamId, chunks (all so far), listeners (live readers), done} */
    this._chats = new Map();
  }

  async _connected() {
    if (!this.client.connected) await this.client.connect();
    return this.client;
  }

  async sendMessages({ chatId, messages, abortSignal, body } = {}) {
    const client = await this._connected();
    const waiting = this._chats.get(chatId);
    const answers = waiting && !waiting.done ? answersFor(messages, waiting.mapper.waiting) : [];
    if (answers.length) {
      // the run waits for these: answer it, and the same stream goes on (from where the last response ended)
      const from = waiting.pausedAt;
      for (const answer of answers) await client.request({ ...answer, stream: waiting.streamId });
      return waiting.reader(() => client.request({ type: "cancel", stream: waiting.streamId }).catch(() => {}), from);
    }
    const streamId = `ai-${randomTag()}-${++counter}`;
    const request = {
      stream: streamId,
      provider: this.provider,
      model: this.model,
      params: { ...(this.params ?? {}), ...(body?.params ?? {}) },
      signal: abortSignal,
    };
    let wire = toWireMessages(messages ?? []);
    if (this.prepareGenerate) {
      const { messages: prepared, ...more } = this.prepareGenerate(wire, { chatId, body }) ?? {};
      if (prepared) wire = prepared;
      Object.assign(request, more);
    }
    const chat = this._track(chatId ?? streamId, streamId);
    const stream = await client.generate(wire, request); // rejects (typed) when the server refuses it
    stream.wait().catch((error) => {
      // the session was lost or the client closed before stream.end
      if (!chat.done) chat.add([{ type: "error", errorText: `${error.code ?? "error"}: ${error.message}` }], true);
    });
    return chat.reader(() => stream.cancel().catch(() => {}));
  }

  async reconnectToStream({ chatId } = {}) {
    const chat = this._chats.get(chatId);
    if (!chat || chat.done || chat.pausedAt !== null) return null; // (paused: the page has to answer the run)
    return chat.reader(null);
  }

  /** Follow `streamId`'s frames for `chatId`, keeping every chunk for a replay. */
  _track(chatId, streamId) {
    this._chats.get(chatId)?.stop();
    const client = this.client;
    const needsPage = (call) => call.wait === "approval" || (call.wait === "client" && !client.tools.handles(call.name));
    const mapper = new FrameMapper({ messageId: streamId, needsPage });
    const chat = {
      streamId,
      mapper,
      chunks: [],
      listeners: new Set(),
      done: false,
      /** Where the response the page answers ended (null: not paused). */
      pausedAt: null,
      add: (chunks, end, paused = false) => {
        chat.chunks.push(...chunks);
        for (const listener of chat.listeners) listener(chunks, end || paused);
        if (paused) {
          chat.listeners.clear();
          chat.pausedAt = chat.chunks.length;
        }
        if (end) chat.stop();
      },
      stop: () => {
        chat.done = true;
        client.off("frame", onFrame);
        if (this._chats.get(chatId) === chat) this._chats.delete(chatId);
      },
      reader: (onCancel, from = 0) => {
        let listener;
        chat.pausedAt = null;
        return new ReadableStream({
          start(controller) {
            for (const chunk of chat.chunks.slice(from)) controller.enqueue(chunk);
            if (chat.done) return controller.close();
            listener = (chunks, end) => {
              for (const chunk of chunks) controller.enqueue(chunk);
              if (end) {
                chat.listeners.delete(listener);
                controller.close();
              }
            };
            chat.listeners.add(listener);
          },
          cancel() {
            chat.listeners.delete(listener);
            onCancel?.(); // the reader went away (useChat's stop): cancel upstream
          },
        });
      },
    };
    const onFrame = (frame) => {
      if (frame.stream !== streamId) return;
      const chunks = mapper.push(frame);
      if (chunks.length) chat.add(chunks, mapper.done, mapper.paused);
    };
    client.on("frame", onFrame);
    this._chats.set(chatId, chat);
    return chat;
  }
}
