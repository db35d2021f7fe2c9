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
      if (part.state === "output-available" || part.state === "output-error") {
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

/**
 * One stream's frames -> UI message chunks. `push(frame)` returns the chunks
 * the frame makes; `done` is true after the frame that ends the message.
 */
export class FrameMapper {
  constructor({ messageId } = {}) {
    this.messageId = messageId;
    this.done = false;
    this._open = null; // {kind: "text" | "reasoning", id}
    this._blocks = 0;
    this._started = false;
    /** toolCallId -> {toolName, text} */
    this._calls = new Map();
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
      case "stream.end":
        this._start(frame, out);
        this._end(frame, out);
        break;
      default:
        break;
    }
    return out;
  }

  _end(frame, out) {
    this._close(out);
    const finished = new Map((frame.message?.tool_calls ?? []).map((call) => [call.id, call]));
    for (const [toolCallId, call] of this._calls) {
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
    if (!chat || chat.done) return null;
    return chat.reader(null);
  }

  /** Follow `streamId`'s frames for `chatId`, keeping every chunk for a replay. */
  _track(chatId, streamId) {
    this._chats.get(chatId)?.stop();
    const mapper = new FrameMapper({ messageId: streamId });
    const client = this.client;
    const chat = {
      streamId,
      chunks: [],
      listeners: new Set(),
      done: false,
      add: (chunks, end) => {
        chat.chunks.push(...chunks);
        for (const listener of chat.listeners) listener(chunks, end);
        if (end) chat.stop();
      },
      stop: () => {
        chat.done = true;
        client.off("frame", onFrame);
        if (this._chats.get(chatId) === chat) this._chats.delete(chatId);
      },
      reader: (onCancel) => {
        let listener;
        return new ReadableStream({
          start(controller) {
            for (const chunk of chat.chunks) controller.enqueue(chunk);
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
      if (chunks.length) chat.add(chunks, mapper.done);
    };
    client.on("frame", onFrame);
    this._chats.set(chatId, chat);
    return chat;
  }
}
