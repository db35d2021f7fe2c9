// One generation: an async iterator of text pieces that also emits events.
//
//     const stream = await client.generate("hi");
//     stream.on("delta", ({ text, index }) => render(text));
//     for await (const text of stream) process.stdout.write(text);
//     console.log(stream.result);   // {reason, usage, ttftMs, durationMs, text, message, toolCalls}
//
// Every iterator starts at the first piece, so text that arrived before the
// loop began is not lost. Iteration ends normally for every end reason but
// `error`, which throws StreamFailedError; a stream the client could not
// follow (its session was lost) throws ConnectionLostError.
//
// Reasoning and tool calls: `stream.reasoning` (text so far), `stream.calls`
// (Map: call id -> {id, name, arguments: the JSON text so far}), and once
// ended `stream.message` (the assistant message to put back into
// `messages`) and `stream.toolCalls` ([{id, name, arguments}], parsed).
// `for await (const event of stream.events())` yields every event in order:
// {type: "text"|"reasoning", text, index}, {type: "tool_call", call, name,
// index}, {type: "tool_call_delta", call, text, index}.
//
// Agent runs (generate with maxSteps > 1): one stream over the run's steps;
// text, reasoning and calls accumulate across them. `stream.waiting` (Map:
// call id -> {id, name, arguments, wait, agent}) holds the calls the run
// waits on; `await stream.waitForTools()` resolves when some need this
// client (an approval, a result no registered handler gives), answered with
// `stream.toolResult(call, content)` and `stream.approve(call, approved)`.
// events() also yields {type: "waiting", calls, step}, {type: "tool_result",
// call, name, content, error, from} and {type: "step", step}; `result.messages`
// is everything the run added to the conversation.
//
// Events: "start" (the stream.start frame), "delta" ({text, index}: answer
// text), "reasoning" ({text, index}), "tool_call" ({call, name, index}),
// "tool_call_delta" ({call, text, index}), "waiting" ({calls, step}),
// "tool_result" ({call, name, content, error, from}), "step" ({step}),
// "snapshot" ({text, index, reasoning, calls}: everything so far, after a
// snapshot resume), "end" (result), "steered" (the new Stream, after
// interrupt with input), "error" (StreamFailedError or ConnectionLostError).

import { DELTA_PARTS, END_REASONS, ERROR_CODES } from "./constants.js";
import { Emitter } from "./emitter.js";
import { StreamFailedError, WsServerError } from "./errors.js";

export class Stream extends Emitter {
  /**
   * @param {import("./socket.js").Client} client
   * @param {string|null} ref the id of the request that started it (null: adopted)
   */
  constructor(client, ref) {
    super();
    this._client = client;
    this.ref = ref;
    /** The stream id (set by stream.start, or by a snapshot for an adopted stream). */
    this.id = null;
    this.provider = null;
    this.model = null;
    /** The stream this one steered from (interrupt with input). */
    this.steeredFrom = null;
    /** Everything received so far. */
    this.text = "";
    /** The reasoning text received so far. */
    this.reasoning = "";
    /** Tool calls as far as they have streamed: call id -> {id, name, arguments (JSON text so far)}. */
    this.calls = new Map();
    /** The index the next delta-like frame (stream.delta, stream.tool_call) must carry. */
    this.nextIndex = 0;
    /** An agent run: the step it is at, and the calls it waits on (call id -> {id, name, arguments, wait, agent}). */
    this.step = 1;
    this.waiting = new Map();
    this._acted = new Set(); // calls this client answered or decided
    /** The stream of its thread it was queued behind (stream.start queued_after). */
    this.queuedAfter = null;
    this.thread = null;
    /** Set once stream.end arrived: {stream, reason, usage, ttftMs, durationMs, text, reasoning, message, toolCalls, error?}. */
    this.result = null;
    /** The error that ended it (StreamFailedError, ConnectionLostError), if any. */
    this.failure = null;
    this._pieces = [];
    this._events = [];
    this._wake = null;
    this.finished = new Promise((resolve, reject) => {
      this._resolveFinished = resolve;
      this._rejectFinished = reject;
    });
    this.finished.catch(() => {});
  }

  /** Whether the stream has ended (or was lost). */
  get done() {
    return this.result !== null || this.failure !== null;
  }

  /** Consume the rest of the stream: resolves with `result`, rejects with `failure`. */
  wait() {
    return this.finished;
  }

  /** The assistant message as it goes back into `messages` (null until ended). */
  get message() {
    return this.result?.message ?? null;
  }

  /** The calls the model made, arguments parsed ([] until ended; reason `tool_calls`). */
  get toolCalls() {
    return this.result?.toolCalls ?? [];
  }

  /** What an agent run added to the conversation (null until ended; a plain stream: null). */
  get messages() {
    return this.result?.messages ?? null;
  }

  /**
   * Resolves when the run waits on calls that need this client (an approval,
   * or a result no registered handler gives and this client has not sent),
   * with every call the run waits on; with [] once the stream has ended
   * (rejects, as iteration does, if it failed).
   */
  async waitForTools() {
    for (;;) {
      if (this.failure !== null) throw this.failure;
      if (this.result !== null) return [];
      const pending = [...this.waiting.values()];
      if (pending.some((call) => !this._acted.has(call.id) && this._needsMe(call))) return pending;
      await this._changed();
    }
  }

  _needsMe(call) {
    return call.wait === "approval" || (call.wait === "client" && !this._client.tools.handles(call.name));
  }

  /** Send the result of `call` (a string, a list of parts, or anything else: sent as JSON). */
  async toolResult(call, content, options = {}) {
    if (this.id === null) throw new TypeError("the stream has not started");
    this._acted.add(call);
    await this._client.toolResult(call, content, { ...options, stream: this.id });
  }

  /**
   * Approve (or deny) a call that waits for an approval; a denial (with its
   * `reason`) is the call's result for the model.
   * @param {string} call
   * @param {boolean} [approved]
   * @param {{reason?: string, timeoutMs?: number}} [options]
   */
  async approve(call, approved = true, options = {}) {
    if (this.id === null) throw new TypeError("the stream has not started");
    this._acted.add(call);
    const message = { type: "approve", stream: this.id, call, approved: Boolean(approved) };
    if (options.reason != null) message.reason = String(options.reason);
    await this._client.request(message, options);
  }

  /**
   * Stop the generation (`cancel`). Resolves once the stream has ended, with
   * its result; a no-op for a stream that has ended (also when the end and
   * the cancel crossed on the wire, PROTOCOL.md 9.4).
   * @param {{timeoutMs?: number}} [options]
   */
  async cancel(options = {}) {
    if (this.done || this.id === null) return this.result;
    try {
      await this._client.request({ type: "cancel", stream: this.id }, options);
    } catch (error) {
      if (!(error instanceof WsServerError && error.code === ERROR_CODES.UNKNOWN_STREAM)) throw error;
    }
    return this.result;
  }

  /**
   * Steer: stop this stream where it is and, with `input`, continue the
   * conversation (its messages, the partial answer, then `input` as the
   * user's words) in a new stream, which is returned. Without `input` it
   * only stops (reason `interrupted`) and resolves with null.
   * @param {string} [input]
   * @param {{newStream?: string, timeoutMs?: number}} [options]
   * @returns {Promise<Stream|null>}
   */
  async interrupt(input, options = {}) {
    if (this.id === null) throw new TypeError("the stream has not started");
    const message = { type: "interrupt", stream: this.id };
    if (input == null) {
      await this._client.request(message, options);
      return null;
    }
    message.input = String(input);
    if (options.newStream != null) message.new_stream = options.newStream;
    const steered = await this._client._startStream(message, options);
    this.emit("steered", steered);
    return steered;
  }

  /**
   * Call `listener({text, index})` for every delta of this stream, those that
   * arrived before the call included (unlike `on("delta")`, which sees only
   * later ones). Returns a function that stops it.
   */
  onDelta(listener) {
    for (const piece of this._pieces) listener({ text: piece.text, index: piece.index });
    return this.on("delta", listener);
  }

  [Symbol.asyncIterator]() {
    return this._iterate(this._pieces, (piece) => piece.text);
  }

  /**
   * Every event of the stream in order, from the first on: answer text,
   * reasoning, tool calls opening, argument fragments. Ends (or throws) like
   * the text iterator.
   */
  events() {
    return this._iterate(this._events, (event) => event);
  }

  _iterate(list, map) {
    let position = 0;
    let finished = false;
    const next = async () => {
      for (;;) {
        if (finished) return { value: undefined, done: true };
        if (position < list.length) return { value: map(list[position++]), done: false };
        if (this.failure !== null) {
          finished = true; // throw once; a later next() just ends
          throw this.failure;
        }
        if (this.result !== null) {
          finished = true;
          return { value: undefined, done: true };
        }
        await this._changed();
      }
    };
    return {
      next,
      return: async () => {
        finished = true;
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  toString() {
    return this.text;
  }

  // ------------------------------------------------------- called by the client

  _changed() {
    if (this._wake === null) {
      let resolve;
      const promise = new Promise((r) => (resolve = r));
      this._wake = { promise, resolve };
    }
    return this._wake.promise;
  }

  _notify() {
    const wake = this._wake;
    this._wake = null;
    wake?.resolve();
  }

  _start(frame) {
    this.id = frame.stream;
    this.provider = frame.provider ?? null;
    this.model = frame.model ?? null;
    this.steeredFrom = frame.steered_from ?? null;
    this.thread = frame.thread ?? null;
    this.queuedAfter = frame.queued_after ?? null;
    this.emit("start", frame);
  }

  _record(event) {
    this._events.push(event);
    const { type, ...rest } = event;
    this.emit(type, rest);
    this._notify();
  }

  /** stream.waiting (or a snapshot's waiting): what the run waits on now. */
  _wait(calls, step) {
    if (this.done) return;
    if (typeof step === "number") this.step = step;
    this.waiting = new Map();
    for (const c of Array.isArray(calls) ? calls : []) {
      const call = { id: c.id, name: c.name, arguments: c.arguments ?? {}, wait: c.wait, agent: c.agent ?? null };
      this.waiting.set(call.id, call);
      // a registered handler answers what waits for the client
      if (call.wait === "client" && this._client.tools.answer(this.id, call.id, call.name, call.arguments)) {
        this._acted.add(call.id);
      }
    }
    this._record({ type: "waiting", calls: [...this.waiting.values()], step: this.step });
  }

  _toolResult(frame) {
    if (this.done) return;
    this.waiting.delete(frame.call);
    this._record({
      type: "tool_result",
      call: frame.call,
      name: frame.name ?? "",
      content: frame.content,
      error: frame.error ?? null,
      from: frame.from ?? null,
    });
  }

  _step(frame) {
    if (this.done) return;
    this.step = frame.step;
    this.waiting = new Map();
    this._record({ type: "step", step: frame.step });
  }

  _feed(text, index) {
    if (typeof text !== "string" || text === "") return;
    this._pieces.push({ text, index });
    this.text += text;
    this._events.push({ type: "text", text, index });
    this.emit("delta", { text, index });
    this._notify();
  }

  _reason(text, index) {
    if (typeof text !== "string" || text === "") return;
    this.reasoning += text;
    this._events.push({ type: "reasoning", text, index });
    this.emit("reasoning", { text, index });
    this._notify();
  }

  _openCall(call, name, index) {
    if (typeof call !== "string" || this.calls.has(call)) return;
    this.calls.set(call, { id: call, name: name ?? "", arguments: "" });
    this._events.push({ type: "tool_call", call, name: name ?? "", index });
    this.emit("tool_call", { call, name: name ?? "", index });
    this._notify();
  }

  _arguments(call, text, index) {
    if (typeof call !== "string" || typeof text !== "string" || text === "") return;
    if (!this.calls.has(call)) this.calls.set(call, { id: call, name: "", arguments: "" });
    this.calls.get(call).arguments += text;
    this._events.push({ type: "tool_call_delta", call, text, index });
    this.emit("tool_call_delta", { call, text, index });
    this._notify();
  }

  /** Whether a delta-like frame is new (advances nextIndex), or one already had. */
  _take(frame) {
    if (this.done) return null;
    const index = typeof frame.index === "number" ? frame.index : this.nextIndex;
    if (index < this.nextIndex) return null; // already have it (a snapshot covered it)
    this.nextIndex = index + 1;
    return index;
  }

  _delta(frame) {
    const index = this._take(frame);
    if (index === null) return;
    if (frame.part === DELTA_PARTS.REASONING) this._reason(frame.text, index);
    else if (frame.part === DELTA_PARTS.TOOL_CALL) this._arguments(frame.call, frame.text, index);
    else if (frame.part == null) this._feed(frame.text, index);
    // an unknown part is a newer server's: skipped
  }

  _toolCall(frame) {
    const index = this._take(frame);
    if (index !== null) this._openCall(frame.call, frame.name, index);
  }

  _snapshot(frame) {
    if (this.done) return;
    if (this.id === null) this.id = frame.stream;
    // The server's answer so far: deliver only what this handle has not seen.
    const rest = (have, text) => (typeof text === "string" && text.startsWith(have) ? text.slice(have.length) : "");
    this._reason(rest(this.reasoning, frame.reasoning), null);
    this._feed(rest(this.text, frame.text), null);
    for (const call of Array.isArray(frame.calls) ? frame.calls : []) {
      this._openCall(call.call, call.name, null);
      this._arguments(call.call, rest(this.calls.get(call.call)?.arguments ?? "", call.arguments), null);
    }
    if (typeof frame.index === "number" && frame.index > this.nextIndex) this.nextIndex = frame.index;
    if (frame.queued_after != null) this.queuedAfter = frame.queued_after;
    this.emit("snapshot", { text: this.text, index: this.nextIndex, reasoning: this.reasoning, calls: [...this.calls.values()] });
    if (typeof frame.step === "number") this._wait(frame.waiting, frame.step); // an agent run
  }

  _end(frame) {
    if (this.done) return;
    const usage = frame.usage ?? {};
    this.result = {
      stream: this.id,
      reason: frame.reason,
      usage: {
        inputTokens: usage.input_tokens ?? 0,
        outputTokens: usage.output_tokens ?? 0,
        estimated: usage.estimated === true,
      },
      ttftMs: frame.ttft_ms ?? null,
      durationMs: frame.duration_ms ?? 0,
      text: this.text,
      reasoning: this.reasoning,
      message: frame.message ?? null,
      toolCalls: Array.isArray(frame.message?.tool_calls)
        ? frame.message.tool_calls.map((c) => ({ id: c.id, name: c.name, arguments: c.arguments }))
        : [],
      messages: Array.isArray(frame.messages) ? frame.messages : null,
      steps: typeof frame.steps === "number" ? frame.steps : null,
    };
    this.waiting = new Map();
    if (frame.error) this.result.error = { code: frame.error.code, message: frame.error.message ?? "" };
    if (frame.reason === END_REASONS.ERROR) {
      const error = frame.error ?? {};
      this.failure = new StreamFailedError(error.code ?? ERROR_CODES.INTERNAL, error.message ?? "", this.result);
      this._rejectFinished(this.failure);
      this.emit("end", this.result);
      this.emit("error", this.failure);
    } else {
      this._resolveFinished(this.result);
      this.emit("end", this.result);
    }
    this._notify();
  }

  _lost(error) {
    if (this.done) return;
    this.failure = error;
    this._rejectFinished(error);
    this.emit("error", error);
    this._notify();
  }
}
