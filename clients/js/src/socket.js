// The Client: one logical connection to a wsserver that survives network loss.
//
//     const client = new Client("ws://127.0.0.1:8765/");   // {WebSocket} in Node < 22
//     client.on("state", (state) => console.log(state));   // connecting, open, reconnecting, resumed, closed
//     await client.connect();
//     const stream = await client.generate("hi", { params: { max_tokens: 50 } });
//     for await (const text of stream) output(text);
//
// What it guarantees, and how (the design of wsserver/client.py):
//
// * Exactly-once, in-order delivery. Every session-bound server frame has a
//   `seq`; the client remembers the highest one it processed (`lastSeq`)
//   and drops any frame at or below it (a replay overlapping what arrived).
// * Resume. When the connection drops, the client reconnects with
//   full-jitter exponential backoff (the first retry is jittered too) and
//   says `hello {session, last_seq}`; the server replays what was missed.
//   Requests whose reply had not come are re-sent with the SAME id: the
//   server never acts twice on an id, and the `duplicate_request` it answers
//   to a re-send whose original reply was replayed is swallowed. Requests
//   made while disconnected wait and are sent once the session is back.
//   If the session cannot be resumed (expired, or its log fell short), what
//   was under way in it fails with ConnectionLostError and the client
//   carries on in a fresh session (event "sessionLost").
// * Liveness. An application-level `ping` every `heartbeatIntervalMs`;
//   no `pong` within `heartbeatTimeoutMs` declares the connection dead and
//   starts a reconnect (browsers cannot see WebSocket pings).
// * Acks. `ack {seq}` every `ackEvery` frames lets the server trim its
//   replay log.
// * It does not reconnect after close codes that say retrying is pointless
//   or harmful (4000 session taken over, 4001, 4400, 4401, 4403, 1008), after
//   a refused `hello`, nor after `close()`.

import {
  CLOSE_CODES,
  DEFAULTS,
  ERROR_CODES,
  MAX_ID_LENGTH,
  NO_RECONNECT_CODES,
  PROTOCOL_VERSION,
  READY_STATE,
  SERVER_MESSAGES,
  STATES,
  SUBPROTOCOL,
} from "./constants.js";
import { Channel } from "./channel.js";
import { Emitter } from "./emitter.js";
import { ConnectionLostError, RequestTimeoutError, WsServerError, errorFromFrame } from "./errors.js";
import { Push } from "./push.js";
import { SseSocket } from "./sse.js";
import { Stream } from "./stream.js";
import { Timer, defaultClock, fullJitter } from "./timer.js";
import { Tools, contentOf } from "./tools.js";

const noop = () => {};

function randomPrefix() {
  const bytes = new Uint8Array(6);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  let out = "";
  for (const b of bytes) out += (b % 36).toString(36);
  return `${out}-`;
}

function utf8Length(text) {
  if (typeof TextEncoder === "function") return new TextEncoder().encode(text).length;
  return unescape(encodeURIComponent(text)).length;
}

function detach(ws) {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = noop; // the `ws` package throws on an 'error' event nobody listens to
}

export class Client extends Emitter {
  /**
   * @param {string} url e.g. "ws://127.0.0.1:8765/"
   * @param {object} [options] see index.d.ts (ClientOptions)
   */
  constructor(url, options = {}) {
    super();
    const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    const transport = options.transport ?? "auto";
    if (!["auto", "websocket", "sse"].includes(transport)) {
      throw new TypeError(`transport is "auto", "websocket" or "sse", not ${JSON.stringify(transport)}`);
    }
    if (typeof WebSocketImpl !== "function" && transport === "websocket") {
      throw new TypeError(
        "no WebSocket implementation: pass {WebSocket} (in Node before 22, the 'ws' package's WebSocket)",
      );
    }
    this.url = url;
    this._WebSocket = WebSocketImpl;
    this._transportMode = transport;
    /** The transport in use: "websocket", or "sse" (GET /v1/events + POST /v1/send). */
    this.transport = transport === "sse" || typeof WebSocketImpl !== "function" ? "sse" : "websocket";
    this._sseOptions = { fetch: options.fetch, headers: options.httpHeaders };
    this._worked = { websocket: false, sse: false };
    this._socketOpened = false;
    this._webSocketOptions = options.webSocketOptions;
    this._clock = options.clock ?? defaultClock;
    this._random = options.random ?? Math.random;
    this.requestTimeoutMs = options.requestTimeoutMs ?? DEFAULTS.requestTimeoutMs;
    this.connectTimeoutMs = options.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs;
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? DEFAULTS.heartbeatIntervalMs;
    this.heartbeatTimeoutMs = options.heartbeatTimeoutMs ?? DEFAULTS.heartbeatTimeoutMs;
    this.ackEvery = options.ackEvery ?? DEFAULTS.ackEvery;
    this.reconnect = options.reconnect ?? true;
    this.giveUpAfterMs = options.giveUpAfterMs ?? DEFAULTS.giveUpAfterMs;
    /** `(tries) => ms`: when to retry; tries is 1 for the first retry. */
    this.reconnectAfterMs =
      options.reconnectAfterMs ??
      fullJitter({
        baseMs: options.reconnectBaseMs ?? DEFAULTS.reconnectBaseMs,
        capMs: options.reconnectCapMs ?? DEFAULTS.reconnectCapMs,
        random: this._random,
      });
    this.agent = options.agent ?? null;
    /** Tool handlers: agent runs' calls, and calls routed to this client's agent (src/tools.js). */
    this.tools = new Tools(this);
    this._token = options.token ?? null;
    this._helloExtra = { ...(options.hello ?? {}) };
    this._idPrefix = options.idPrefix ?? randomPrefix();
    this._idCounter = 0;

    /** Connection state: connecting, open, reconnecting, resumed or closed. */
    this.state = STATES.CLOSED;
    /** The session id (kept to resume; may be given to resume one from storage). */
    this.session = options.session ?? null;
    /** Highest `seq` processed: what a resume sends as `last_seq`. */
    this.lastSeq = options.lastSeq ?? 0;
    /** The last `welcome` frame. */
    this.welcome = null;
    /** Round trip of the last heartbeat, in ms. */
    this.rttMs = null;
    /** The error the client closed with, once closed. */
    this.closeError = null;
    this.stats = { reconnects: 0, resent: 0, duplicateFrames: 0, duplicateRequests: 0 };

    this._snapshotNext = options.snapshot === true;
    this._ws = null;
    this._connId = 0;
    this._established = false;
    this._everOpened = false;
    this._askedResume = false;
    this._closing = false;
    this._terminalError = null;
    this._lostAt = null;
    this._shutdownDelay = null;
    this._acked = this.lastSeq;
    this._connectTimer = null;
    this._heartbeatTimer = null;
    this._connecting = null;
    /** @type {Map<string, Push>} request id -> request, until its reply */
    this._pushes = new Map();
    /** ids re-sent after a resume (their duplicate_request is expected) */
    this._resentIds = new Set();
    /** @type {Map<string, Stream>} generate/interrupt id -> stream awaiting stream.start */
    this._pendingStreams = new Map();
    /** @type {Map<string, Stream>} stream id -> running stream */
    this._streams = new Map();
    /** @type {Map<string, Channel>} */
    this._channels = new Map();
    this._reconnectTimer = new Timer(() => this._openSocket(), (tries) => this.reconnectAfterMs(tries), this._clock);
  }

  /** `await Client.connect(url, options)`: a connected client. */
  static connect(url, options) {
    return new Client(url, options).connect();
  }

  /** Whether a connection is up and welcomed. */
  get connected() {
    return this._established;
  }

  /** Running streams of this client. */
  get streams() {
    return [...this._streams.values()];
  }

  /** Subscribed channels by name. */
  get channels() {
    return new Map(this._channels);
  }

  // -------------------------------------------------------------- connecting

  /**
   * Open the connection. Resolves with the client at the first `welcome`;
   * rejects if the client closes before one (refused hello, a close code
   * that forbids reconnecting, `close()`, or `giveUpAfterMs`). Connection
   * failures before the first welcome are retried like later ones.
   */
  connect() {
    if (this._connecting) return this._connecting.promise;
    if (this.state !== STATES.CLOSED) return Promise.resolve(this);
    this._closing = false;
    this._terminalError = null;
    this.closeError = null;
    this._lostAt = null;
    let resolve, reject;
    const promise = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    this._connecting = { promise, resolve, reject };
    this._setState(STATES.CONNECTING, {});
    this._openSocket();
    return promise;
  }

  /**
   * Close for good (1000). Pending requests and running streams fail with
   * ConnectionLostError; the server keeps the session for its ttl (another
   * client may resume it). Resolves once the socket has closed.
   */
  close(code = CLOSE_CODES.NORMAL, reason = "") {
    this._closing = true;
    const ws = this._ws;
    this._ws = null;
    const closed = new Promise((resolve) => {
      if (!ws || ws.readyState === READY_STATE.CLOSED) return resolve();
      detach(ws);
      const timer = this._clock.setTimeout(resolve, 2000);
      ws.onclose = () => {
        this._clock.clearTimeout(timer);
        resolve();
      };
      try {
        ws.close(code, reason);
      } catch {
        resolve();
      }
    });
    this._finalize(new ConnectionLostError(code, reason || "closed by the client"));
    return closed;
  }

  /**
   * Drop the current connection and reconnect (and resume) at once, e.g.
   * after the network changed. A no-op unless connected or reconnecting.
   */
  reconnectNow() {
    if (this.state === STATES.CLOSED) return;
    const ws = this._ws;
    if (ws) {
      this._abandon(ws, CLOSE_CODES.CLIENT_RECONNECT, "reconnect requested");
    }
    if (this.state === STATES.RECONNECTING) {
      this._reconnectTimer.clear();
      this._openSocket();
    }
  }

  _openSocket() {
    this._reconnectTimer.clear();
    let ws;
    try {
      if (this.transport === "sse") ws = new SseSocket(this.url, [SUBPROTOCOL], this._sseOptions);
      else if (this._webSocketOptions === undefined) ws = new this._WebSocket(this.url, [SUBPROTOCOL]);
      else ws = new this._WebSocket(this.url, [SUBPROTOCOL], this._webSocketOptions);
    } catch (error) {
      // A URL the WebSocket constructor refuses will not get better.
      this._finalize(new ConnectionLostError(null, `cannot open ${this.url}: ${error?.message ?? error}`));
      return;
    }
    this._ws = ws;
    this._connId += 1;
    this._socketOpened = false;
    this._established = false;
    this._askedResume = false;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onData(ws, event.data);
    ws.onclose = (event) => this._onClose(ws, event);
    ws.onerror = noop; // a close event follows
    if (this.connectTimeoutMs > 0) {
      this._connectTimer = this._clock.setTimeout(() => {
        this._connectTimer = null;
        this._abandon(ws, CLOSE_CODES.CLIENT_CONNECT_TIMEOUT, "no welcome in time");
      }, this.connectTimeoutMs);
    }
  }

  /** The hello this client sends now. */
  _hello() {
    const hello = { type: "hello", protocol: PROTOCOL_VERSION, ...this._helloExtra };
    if (this.agent != null) hello.agent = this.agent;
    if (this._token != null) hello.token = this._token;
    if (this.session != null) {
      hello.session = this.session;
      hello.last_seq = this.lastSeq;
      if (this._snapshotNext) hello.snapshot = true;
    }
    return hello;
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    this._socketOpened = true;
    this._worked[this.transport] = true;
    const hello = this._hello();
    this._askedResume = hello.session != null;
    try {
      ws.send(JSON.stringify(hello));
    } catch {
      // the close event follows
    }
  }

  _onData(ws, data) {
    if (ws !== this._ws) return;
    if (typeof data !== "string") return; // protocol v1 is text only
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this.emit("error", new WsServerError(ERROR_CODES.BAD_JSON, "the server sent a frame that is not JSON"));
      return;
    }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) {
      this.emit("error", new WsServerError(ERROR_CODES.BAD_MESSAGE, "the server sent a frame that is not an object"));
      return;
    }
    if (this._established) this._dispatch(frame);
    else this._handshake(ws, frame);
  }

  _handshake(ws, frame) {
    if (frame.type === SERVER_MESSAGES.WELCOME) {
      this._onWelcome(frame);
    } else if (frame.type === SERVER_MESSAGES.ERROR) {
      const error = errorFromFrame(frame);
      if (error.code === ERROR_CODES.RESUME_FAILED) {
        // a `welcome {resumed: false}` follows
        this.emit("resumeFailed", error);
        return;
      }
      // hello refused (unsupported_protocol, unauthorized, agent_name_taken…):
      // trying again will not help
      this._terminalError = error;
      this._abandon(ws, CLOSE_CODES.NORMAL, "hello refused");
    }
  }

  _onWelcome(frame) {
    if (this._connectTimer !== null) this._clock.clearTimeout(this._connectTimer);
    this._connectTimer = null;
    const resumed = this._askedResume && frame.resumed === true;
    const reconnected = this._everOpened;
    if (this.session != null && !resumed) this._sessionLost();
    this.session = typeof frame.session === "string" ? frame.session : null;
    this.welcome = frame;
    this._established = true;
    this._everOpened = true;
    this._snapshotNext = false;
    this._reconnectTimer.reset();
    this._lostAt = null;
    this._shutdownDelay = null;
    if (reconnected) this.stats.reconnects += 1;
    this._startHeartbeat();
    this._flush(resumed);
    for (const channel of this._channels.values()) {
      if (channel.subscribed && !channel._push) this._resubscribe(channel);
    }
    this.emit("welcome", frame);
    this._setState(resumed ? STATES.RESUMED : STATES.OPEN, { resumed, session: this.session });
    const connecting = this._connecting;
    this._connecting = null;
    connecting?.resolve(this);
  }

  /** A fresh session: what was under way in the old one cannot complete. */
  _sessionLost() {
    const error = new ConnectionLostError(
      null,
      "the session was lost (it expired or could not be resumed); a new one was opened",
    );
    for (const push of [...this._pushes.values()]) {
      if (push.sentOn === null) continue; // never sent: it goes to the new session
      if (push.idempotent) {
        push.sentOn = null; // safe to send again in the new session
        continue;
      }
      this._pushes.delete(push.id);
      push.fail(error);
    }
    for (const [ref, stream] of [...this._pendingStreams]) {
      if (!this._pushes.has(ref)) this._pendingStreams.delete(ref);
    }
    for (const stream of this._streams.values()) stream._lost(error);
    this._streams.clear();
    this.lastSeq = 0;
    this._acked = 0;
    this._resentIds.clear();
    this.emit("sessionLost", error);
  }

  /** After a welcome: re-send what is unanswered (same id), send what waited. */
  _flush(resumed) {
    for (const push of [...this._pushes.values()]) {
      if (push.sentOn === this._connId) continue;
      if (push.sentOn !== null && resumed) {
        push.resent = true;
        this._resentIds.add(push.id);
        this.stats.resent += 1;
      }
      this._write(push);
    }
  }

  _onClose(ws, event) {
    if (ws !== this._ws) return;
    detach(ws);
    this._handleLoss(event?.code ?? CLOSE_CODES.ABNORMAL, event?.reason ?? "");
  }

  /** Give a connection up without waiting for its close handshake. */
  _abandon(ws, code, reason) {
    if (ws !== this._ws) return;
    detach(ws);
    try {
      // The connection is deemed dead: do not wait for its close handshake
      // (the `ws` package would wait 30 s for it; browsers have no terminate).
      if (typeof ws.terminate === "function") ws.terminate();
      else ws.close(code, reason);
    } catch {
      // already closing
    }
    this._handleLoss(code, reason);
  }

  _handleLoss(code, reason) {
    this._ws = null;
    this._established = false;
    this._clearConnectionTimers();
    const lost = new ConnectionLostError(code, reason);
    for (const push of [...this._pushes.values()]) {
      if (push.volatile) {
        this._pushes.delete(push.id);
        push.fail(lost);
      }
    }
    if (this._closing || this.state === STATES.CLOSED) return;
    if (this._terminalError || !this.reconnect || NO_RECONNECT_CODES.has(code)) {
      this._finalize(this._terminalError ?? lost);
      return;
    }
    const now = this._clock.now();
    this._lostAt ??= now;
    if (this.giveUpAfterMs != null && now - this._lostAt >= this.giveUpAfterMs) {
      this._finalize(lost);
      return;
    }
    this._setState(STATES.RECONNECTING, { code, reason });
    let delay;
    if (this._switchTransport()) delay = 0; // a WebSocket that cannot open: the HTTP transport at once
    else if (this._shutdownDelay != null) {
      delay = this._shutdownDelay + this.reconnectAfterMs(1);
      this._shutdownDelay = null;
    }
    const used = this._reconnectTimer.scheduleTimeout(delay);
    this.emit("retry", { attempt: this._reconnectTimer.tries + 1, delayMs: used, code, reason });
  }

  /**
   * With `transport: "auto"`: a WebSocket that never opened (a proxy refused
   * the upgrade) is followed by the HTTP transport; once that has worked the
   * client keeps it. An HTTP attempt that fails before ever working hands
   * back to the WebSocket (the server may just have been down).
   * @returns {boolean} whether the next attempt is the HTTP transport's first
   */
  _switchTransport() {
    if (this._transportMode !== "auto" || this._socketOpened) return false;
    if (this.transport === "websocket" && !this._worked.websocket) {
      this.transport = "sse";
      this.emit("transport", "sse");
      return true;
    }
    if (this.transport === "sse" && !this._worked.sse && typeof this._WebSocket === "function") {
      this.transport = "websocket";
      this.emit("transport", "websocket");
    }
    return false;
  }

  _finalize(error) {
    if (this.state === STATES.CLOSED && !this._connecting) return;
    this._reconnectTimer.reset();
    this._clearConnectionTimers();
    const ws = this._ws;
    this._ws = null;
    this._established = false;
    if (ws) {
      detach(ws);
      try {
        ws.close(CLOSE_CODES.NORMAL);
      } catch {
        // ignore
      }
    }
    this.closeError = error;
    for (const push of this._pushes.values()) push.fail(error);
    this._pushes.clear();
    this._pendingStreams.clear();
    for (const stream of this._streams.values()) stream._lost(error);
    this._streams.clear();
    for (const channel of this._channels.values()) channel._close(error);
    this._channels.clear();
    this._setState(STATES.CLOSED, { code: error.closeCode ?? null, reason: error.reason ?? "", error });
    const connecting = this._connecting;
    this._connecting = null;
    connecting?.reject(error);
  }

  _clearConnectionTimers() {
    if (this._connectTimer !== null) this._clock.clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._stopHeartbeat();
  }

  _setState(state, detail) {
    if (state === this.state) return;
    this.state = state;
    this.emit("state", state, detail);
    this.emit(state, detail);
  }

  // --------------------------------------------------------------- heartbeat

  _startHeartbeat() {
    this._stopHeartbeat();
    if (!(this.heartbeatIntervalMs > 0)) return;
    this._heartbeatTimer = this._clock.setTimeout(() => this._beat(), this.heartbeatIntervalMs);
  }

  _stopHeartbeat() {
    if (this._heartbeatTimer !== null) this._clock.clearTimeout(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }

  _beat() {
    this._heartbeatTimer = null;
    const ws = this._ws;
    if (!this._established || !ws) return;
    const started = this._clock.now();
    const push = this._push({ type: "ping" }, { timeoutMs: this.heartbeatTimeoutMs, volatile: true });
    push.reply.then(
      () => {
        this.rttMs = this._clock.now() - started;
        this.emit("heartbeat", { rttMs: this.rttMs });
        if (this._ws === ws && this._established) this._startHeartbeat();
      },
      (error) => {
        if (error instanceof RequestTimeoutError && this._ws === ws) {
          this.emit("heartbeatTimeout", { timeoutMs: this.heartbeatTimeoutMs });
          this._abandon(ws, CLOSE_CODES.CLIENT_HEARTBEAT_TIMEOUT, "heartbeat timeout");
        }
      },
    );
  }

  // ---------------------------------------------------------------- requests

  _nextId() {
    this._idCounter += 1;
    return `${this._idPrefix}${this._idCounter}`;
  }

  /**
   * Create, register and (when connected) send a request.
   * @returns {Push}
   */
  _push(message, { timeoutMs, volatile = false, idempotent = false } = {}) {
    if (message.id == null) message.id = this._nextId();
    const push = new Push(message, {
      timeoutMs: timeoutMs === undefined ? this.requestTimeoutMs : timeoutMs,
      volatile,
      idempotent,
      clock: this._clock,
      onTimeout: (p) => {
        if (this._pushes.get(p.id) === p) this._pushes.delete(p.id);
        this._pendingStreams.delete(p.id);
      },
    });
    if (this.state === STATES.CLOSED) {
      push.fail(this.closeError ?? new ConnectionLostError(null, "not connected: call connect() first"));
      return push;
    }
    if (typeof push.id !== "string" || push.id.length < 1 || push.id.length > MAX_ID_LENGTH) {
      push.fail(new TypeError(`a request id is a string of 1 to ${MAX_ID_LENGTH} characters`));
      return push;
    }
    if (this._pushes.has(push.id)) {
      push.fail(new TypeError(`request id ${push.id} is already waiting for its reply`));
      return push;
    }
    const limit = this.welcome?.limits?.max_message_bytes;
    if (limit && push.payload.length * 3 > limit && utf8Length(push.payload) > limit) {
      // the server would close the connection (1009), and the resend after
      // the reconnect would close it again
      push.fail(
        new WsServerError(ERROR_CODES.MESSAGE_TOO_LARGE, `the request is larger than the server's ${limit} bytes`),
      );
      return push;
    }
    this._pushes.set(push.id, push);
    this._write(push);
    return push;
  }

  _write(push) {
    const ws = this._ws;
    if (!this._established || !ws || ws.readyState !== READY_STATE.OPEN) return false;
    try {
      ws.send(push.payload);
    } catch {
      return false; // re-sent with the same id once resumed
    }
    push.sentOn = this._connId;
    return true;
  }

  /**
   * Send `message` (an id is added unless it has one) and resolve with its
   * reply frame. Waits while the client is reconnecting; rejects with
   * WsServerError (the server's code) for an `error` reply, with
   * ConnectionLostError when the client closed, and with
   * RequestTimeoutError after `timeoutMs` (default `requestTimeoutMs`).
   */
  request(message, { timeoutMs } = {}) {
    return this._push({ ...message }, { timeoutMs }).reply;
  }

  /** Round trip of an application-level ping, in ms. */
  async ping({ timeoutMs } = {}) {
    const started = this._clock.now();
    await this._push({ type: "ping" }, { timeoutMs, volatile: true }).reply;
    return this._clock.now() - started;
  }

  /**
   * Start a generation. Resolves with the Stream once the server accepted
   * it (`stream.start`); rejects with WsServerError (provider_unavailable,
   * stream_exists, too_many_streams, bad_message…).
   * With `tools` ([{name, description?, parameters?}]) and `toolChoice`
   * ("auto" | "none" | "required" | {name}), the model may call tools: the
   * stream ends with reason `tool_calls`; send `stream.message` and one
   * {role: "tool", tool_call_id, content} per call in the next generate.
   * With `maxSteps` > 1 the stream is an agent run that does that loop
   * itself (tools may then have `agent`, `approval`, `timeout_ms`: see
   * Stream.waitForTools and client.tools). `thread` and `onBusy`
   * ("parallel" | "queue" | "interrupt" | "reject") say what happens while a
   * stream of the thread is going.
   * @param {string|Array<object>} messages a string is one user message
   * @param {object} [options] {stream, provider, model, params, channel, tools, toolChoice, maxSteps, thread, onBusy, id, timeoutMs, signal}
   */
  async generate(messages, options = {}) {
    const list = typeof messages === "string" ? [{ role: "user", content: messages }] : [...messages];
    const message = { type: "generate", messages: list };
    for (const key of ["stream", "provider", "model", "channel", "thread"]) {
      if (options[key] != null) message[key] = options[key];
    }
    if (options.tools != null) message.tools = [...options.tools];
    if (options.toolChoice != null) message.tool_choice = options.toolChoice;
    if (options.maxSteps != null) message.max_steps = options.maxSteps;
    if (options.onBusy != null) message.on_busy = options.onBusy;
    if (options.params != null) message.params = { ...options.params };
    if (options.id != null) message.id = options.id;
    const stream = await this._startStream(message, options);
    const signal = options.signal;
    if (signal) {
      const abort = () => stream.cancel().catch(noop);
      if (signal.aborted) abort();
      else signal.addEventListener("abort", abort, { once: true });
    }
    return stream;
  }

  async _startStream(message, options = {}) {
    const push = this._push(message, { timeoutMs: options.timeoutMs });
    const stream = new Stream(this, push.id);
    if (!push.settled) this._pendingStreams.set(push.id, stream);
    try {
      await push.reply;
    } catch (error) {
      this._pendingStreams.delete(push.id);
      if (error instanceof WsServerError && error.code === ERROR_CODES.DUPLICATE_REQUEST && error.stream) {
        // The first request had started that stream (PROTOCOL.md 9.6): follow it.
        const existing = this._streams.get(error.stream);
        if (existing) return existing;
        stream._start({ stream: error.stream });
        this._streams.set(error.stream, stream);
        return stream;
      }
      throw error;
    }
    return stream;
  }

  /** Publish `data` (any JSON) on `channel`; resolves with the message's offset. */
  async publish(channel, data, { timeoutMs } = {}) {
    const reply = await this._push({ type: "publish", channel, data }, { timeoutMs }).reply;
    return reply.offset;
  }

  /** A direct message to the agent named `to`; resolves once the server accepted it. */
  async send(to, data, { timeoutMs } = {}) {
    await this._push({ type: "send", to, data }, { timeoutMs }).reply;
  }

  /**
   * Send the result of a call: of this session's run `options.stream`, or
   * (no stream) of a call routed to this client's agent (a "tool_call"
   * event). `content`: a string, a list of parts, or anything else (sent as JSON).
   */
  async toolResult(call, content, options = {}) {
    const message = { type: "tool_result", call, content: contentOf(content) };
    if (options.stream != null) message.stream = options.stream;
    await this._push(message, { timeoutMs: options.timeoutMs }).reply;
  }

  /** Call `listener({from, data, seq})` for every direct message; returns a function that stops it. */
  onMessage(listener) {
    return this.on("message", listener);
  }

  /**
   * Subscribe to `name`. Resolves with the Channel once `subscribed` came.
   * With `since` (and `epoch`), messages after that offset are recovered.
   * Listeners given here are attached before the request is sent.
   * @param {string} name
   * @param {{since?: number, epoch?: string, onMessage?: Function, onPresence?: Function, maxBacklog?: number, timeoutMs?: number}} [options]
   * @returns {Promise<Channel>}
   */
  subscribe(name, options = {}) {
    const existing = this._channels.get(name);
    if (existing && !existing.closed) {
      if (options.onMessage) existing.onMessage(options.onMessage);
      if (options.onPresence) existing.onPresence(options.onPresence);
      return existing._ready;
    }
    const channel = new Channel(this, name, {
      since: options.since ?? null,
      epoch: options.epoch ?? null,
      maxBacklog: options.maxBacklog,
    });
    if (options.onMessage) channel.onMessage(options.onMessage);
    if (options.onPresence) channel.onPresence(options.onPresence);
    this._channels.set(name, channel);
    channel._ready = this._sendSubscribe(channel, options).then(
      () => channel,
      (error) => {
        if (this._channels.get(name) === channel) this._channels.delete(name);
        channel._close();
        throw error;
      },
    );
    channel._ready.catch(noop);
    return channel._ready;
  }

  _sendSubscribe(channel, { timeoutMs } = {}) {
    const push = this._push(channel._subscribeMessage(), { timeoutMs, idempotent: true });
    channel._push = push;
    const clear = () => {
      if (channel._push === push) channel._push = null;
    };
    return push.reply.then(
      (reply) => {
        clear();
        return reply;
      },
      (error) => {
        clear();
        throw error;
      },
    );
  }

  _resubscribe(channel) {
    this._sendSubscribe(channel).catch((error) => {
      if (channel.closed) return;
      channel._finishSync(); // deliver what was held rather than hold it forever
      channel.emit("error", error);
    });
  }

  async _unsubscribe(channel, { timeoutMs } = {}) {
    if (this._channels.get(channel.name) === channel) this._channels.delete(channel.name);
    channel._close();
    if (this.state === STATES.CLOSED) return;
    await this._push({ type: "unsubscribe", channel: channel.name }, { timeoutMs, idempotent: true }).reply;
  }

  /** Send a frame as is (tests and tools; bypasses every check and the buffer). */
  sendRaw(data) {
    const ws = this._ws;
    if (!ws || ws.readyState !== READY_STATE.OPEN) throw new ConnectionLostError(null, "not connected");
    ws.send(typeof data === "string" ? data : JSON.stringify(data));
  }

  // -------------------------------------------------------------- the reader

  _dispatch(frame) {
    const seq = frame.seq;
    if (typeof seq === "number") {
      if (seq <= this.lastSeq) {
        this.stats.duplicateFrames += 1; // already seen: a replay overlapping what arrived
        return;
      }
      this.lastSeq = seq;
    }
    const type = frame.type;
    switch (type) {
      case SERVER_MESSAGES.STREAM_START:
        this._onStreamStart(frame);
        break;
      case SERVER_MESSAGES.STREAM_DELTA:
        this._streams.get(frame.stream)?._delta(frame);
        break;
      case SERVER_MESSAGES.STREAM_TOOL_CALL:
        this._streams.get(frame.stream)?._toolCall(frame);
        break;
      case SERVER_MESSAGES.STREAM_WAITING:
        this._streams.get(frame.stream)?._wait(frame.calls, frame.step);
        break;
      case SERVER_MESSAGES.STREAM_TOOL_RESULT:
        this._streams.get(frame.stream)?._toolResult(frame);
        break;
      case SERVER_MESSAGES.STREAM_STEP:
        this._streams.get(frame.stream)?._step(frame);
        break;
      case SERVER_MESSAGES.TOOL_CALL:
        this.tools._routed(frame);
        break;
      case SERVER_MESSAGES.STREAM_SNAPSHOT:
        this._onSnapshot(frame);
        break;
      case SERVER_MESSAGES.STREAM_END: {
        const stream = this._streams.get(frame.stream);
        if (stream) {
          this._streams.delete(frame.stream);
          stream._end(frame);
        }
        break;
      }
      case SERVER_MESSAGES.MESSAGE:
        if (typeof frame.channel === "string") this._channels.get(frame.channel)?._traffic(frame);
        else this.emit("message", { from: frame.from, data: frame.data, seq: frame.seq });
        break;
      case SERVER_MESSAGES.PRESENCE:
        this._channels.get(frame.channel)?._traffic(frame);
        break;
      case SERVER_MESSAGES.SUBSCRIBED:
        this._channels.get(frame.channel)?._subscribed(frame);
        break;
      case SERVER_MESSAGES.SHUTDOWN:
        if (typeof frame.reconnect_ms === "number") this._shutdownDelay = frame.reconnect_ms;
        this.emit("shutdown", frame);
        break;
      default:
        break; // ok, pong, error: replies, below; unknown types are ignored
    }
    if (typeof seq === "number" || type === SERVER_MESSAGES.PONG) {
      for (const channel of this._channels.values()) channel._settle(seq);
    }
    this.emit("frame", frame);
    this._reply(frame);
    this._maybeAck(seq);
  }

  _reply(frame) {
    const ref = frame.ref;
    if (typeof ref === "string") {
      const push = this._pushes.get(ref);
      if (push) {
        this._pushes.delete(ref);
        push.receive(frame);
        return;
      }
      if (
        frame.type === SERVER_MESSAGES.ERROR &&
        frame.code === ERROR_CODES.DUPLICATE_REQUEST &&
        this._resentIds.delete(ref)
      ) {
        this.stats.duplicateRequests += 1; // our re-send after a resume: answered already
        return;
      }
    }
    if (frame.type === SERVER_MESSAGES.ERROR) this.emit("error", errorFromFrame(frame));
  }

  _maybeAck(seq) {
    if (typeof seq !== "number" || !(this.ackEvery > 0) || seq - this._acked < this.ackEvery) return;
    const ws = this._ws;
    if (!this._established || !ws || ws.readyState !== READY_STATE.OPEN) return;
    this._acked = seq;
    try {
      ws.send(JSON.stringify({ type: "ack", seq }));
    } catch {
      // the next ack covers it
    }
  }

  _onStreamStart(frame) {
    let stream = typeof frame.ref === "string" ? this._pendingStreams.get(frame.ref) : undefined;
    let adopted = false;
    if (stream) {
      this._pendingStreams.delete(frame.ref);
    } else if (!this._streams.has(frame.stream)) {
      // started by a request this client did not make (an earlier page, a
      // timed-out generate): follow it anyway
      stream = new Stream(this, frame.ref ?? null);
      adopted = true;
    } else {
      return;
    }
    stream._start(frame);
    this._streams.set(frame.stream, stream);
    if (adopted) this.emit("stream", stream);
  }

  _onSnapshot(frame) {
    const existing = this._streams.get(frame.stream);
    if (existing) {
      existing._snapshot(frame);
      return;
    }
    // A snapshot resume (a refreshed page): the stream is new to this client.
    const stream = new Stream(this, null);
    stream.id = frame.stream;
    this._streams.set(frame.stream, stream);
    stream._snapshot(frame);
    this.emit("stream", stream);
  }
}

export function connect(url, options) {
  return Client.connect(url, options);
}
