// The HTTP transport, shaped like a WebSocket (PROTOCOL.md "HTTP transport").
//
//     const socket = new SseSocket("ws://127.0.0.1:8765/");   // or http(s)://
//     socket.onopen = () => socket.send(JSON.stringify({ type: "hello", protocol: 1 }));
//     socket.onmessage = ({ data }) => console.log(JSON.parse(data));
//     socket.onclose = ({ code, reason }) => …;
//
// `GET /v1/events` (read with fetch and a stream reader, so it works in
// browsers and in Node ≥ 20 alike, and can carry headers) gives the server's
// frames, one SSE event each; its first event names the connection. `send()`
// queues a frame; one POST to `/v1/send?connection=…` is in flight at a
// time, carrying everything queued meanwhile as one JSON array, so the
// server reads the frames in the order they were sent. The server's
// `event: close` gives the close code (4000 taken over, 1013 slow, …); a
// stream that just ends closes with 1006, as a dropped socket does.
//
// The Client (socket.js) uses it in place of a WebSocket: with
// `transport: "sse"`, or by itself when a WebSocket cannot open.

import { CLOSE_CODES, READY_STATE } from "./constants.js";

const EVENTS_PATH = "/v1/events";
const SEND_PATH = "/v1/send";

/** `ws://h:p/path?q` -> {base: "http://h:p", query: "q"}; wss -> https. */
export function httpEndpoint(url) {
  const parsed = new URL(url, globalThis.location?.href);
  const protocol = { "ws:": "http:", "wss:": "https:" }[parsed.protocol] ?? parsed.protocol;
  return { base: `${protocol}//${parsed.host}`, query: parsed.search.replace(/^\?/, "") };
}

/** HTTP status of a refused stream -> the close code a WebSocket would have had. */
function closeCodeOf(status) {
  if (status === 401) return CLOSE_CODES.UNAUTHORIZED;
  if (status === 403) return CLOSE_CODES.FORBIDDEN;
  if (status === 413) return CLOSE_CODES.TOO_BIG;
  if (status === 503 || status === 429) return CLOSE_CODES.TRY_AGAIN_LATER;
  return CLOSE_CODES.ABNORMAL;
}

function isJson(text) {
  try {
    JSON.parse(text);
    return true;
  } catch {
    return false;
  }
}

/** Splits a text stream into SSE events ({event, data, id}); comments are dropped. */
export class SseParser {
  constructor(onEvent) {
    this._onEvent = onEvent;
    this._buffer = "";
    this._reset();
  }

  _reset() {
    this._event = "message";
    this._data = [];
    this._id = null;
  }

  feed(text) {
    this._buffer += text;
    let start = 0;
    for (;;) {
      const lf = this._buffer.indexOf("\n", start);
      if (lf < 0) break;
      let line = this._buffer.slice(start, lf);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      start = lf + 1;
      this._line(line);
    }
    this._buffer = this._buffer.slice(start);
  }

  _line(line) {
    if (line === "") {
      if (this._data.length) this._onEvent({ event: this._event, data: this._data.join("\n"), id: this._id });
      this._reset();
      return;
    }
    if (line.startsWith(":")) return; // a heartbeat
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this._data.push(value);
    else if (field === "event") this._event = value;
    else if (field === "id") this._id = value;
  }
}

export class SseSocket {
  /**
   * @param {string} url the server's ws(s):// or http(s):// URL (its query, e.g. ?token=, is kept)
   * @param {string[]} [_protocols] ignored (the WebSocket constructor's second argument)
   * @param {{fetch?: typeof fetch, headers?: Record<string, string>}} [options]
   */
  constructor(url, _protocols, options = {}) {
    this.url = url;
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    if (typeof this._fetch !== "function") throw new TypeError("no fetch implementation for the HTTP transport");
    this._headers = options.headers ?? {};
    const { base, query } = httpEndpoint(url);
    this._base = base;
    this._query = query;
    this.readyState = READY_STATE.CONNECTING;
    this.protocol = "";
    /** The server's name for this connection (from the stream's first event). */
    this.connection = null;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this._abort = new AbortController();
    this._queue = [];
    this._posting = false;
    this._closeEvent = null;
    this._read();
  }

  _url(path, extra) {
    const params = new URLSearchParams(this._query);
    for (const [name, value] of Object.entries(extra ?? {})) params.set(name, value);
    const query = params.toString();
    return `${this._base}${path}${query ? `?${query}` : ""}`;
  }

  async _read() {
    let response;
    try {
      response = await this._fetch(this._url(EVENTS_PATH), {
        headers: { Accept: "text/event-stream", ...this._headers },
        cache: "no-store",
        signal: this._abort.signal,
      });
    } catch {
      this._closed(CLOSE_CODES.ABNORMAL, "cannot reach the server");
      return;
    }
    if (!response.ok || !response.body) {
      let reason = `GET ${EVENTS_PATH} answered ${response.status}`;
      try {
        reason = (await response.json()).message ?? reason;
      } catch {
        // not a JSON error body
      }
      this._closed(closeCodeOf(response.status), reason);
      return;
    }
    const parser = new SseParser((event) => this._event(event));
    const decoder = new TextDecoder();
    const reader = response.body.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(decoder.decode(value, { stream: true }));
        if (this.readyState >= READY_STATE.CLOSING) break;
      }
    } catch {
      // dropped, or aborted by close()
    }
    try {
      reader.cancel().catch(() => {});
    } catch {
      // already released
    }
    if (this.readyState === READY_STATE.CLOSING) return; // close() or a failed POST: _terminate reports it
    const close = this._closeEvent;
    this._closed(close?.code ?? CLOSE_CODES.ABNORMAL, close?.reason ?? "the event stream ended");
  }

  _event({ event, data }) {
    if (this.readyState >= READY_STATE.CLOSING) return;
    if (event === "connection") {
      this.connection = JSON.parse(data).connection;
      this.readyState = READY_STATE.OPEN;
      this.onopen?.({ type: "open" });
    } else if (event === "close") {
      this._closeEvent = JSON.parse(data);
    } else if (event === "message") {
      this.onmessage?.({ type: "message", data });
    }
  }

  /** Queue a text frame; it is posted with whatever else waits. */
  send(data) {
    if (this.readyState !== READY_STATE.OPEN) throw new Error("the HTTP transport is not open");
    this._queue.push(String(data));
    if (!this._posting) this._post();
  }

  async _post() {
    this._posting = true;
    try {
      while (this._queue.length && this.readyState === READY_STATE.OPEN) {
        // JSON frames go as one array; anything else (sendRaw of garbage) alone, as is
        let body;
        if (!isJson(this._queue[0])) body = this._queue.shift();
        else {
          const batch = [];
          while (this._queue.length && isJson(this._queue[0])) batch.push(this._queue.shift());
          body = `[${batch.join(",")}]`;
        }
        let response;
        try {
          response = await this._fetch(this._url(SEND_PATH, { connection: this.connection }), {
            method: "POST",
            // text/plain keeps a cross-origin POST a "simple" request (no preflight)
            headers: { "Content-Type": "text/plain;charset=UTF-8", ...this._headers },
            body,
            cache: "no-store",
          });
        } catch {
          this._terminate(CLOSE_CODES.ABNORMAL, "a POST failed");
          return;
        }
        if (response.status === 202) {
          response.body?.cancel?.().catch?.(() => {});
          continue;
        }
        let error = null;
        try {
          error = await response.json();
        } catch {
          // not a JSON error body
        }
        if (response.status === 400 && error?.type === "error") {
          this.onmessage?.({ type: "message", data: JSON.stringify(error) }); // as the socket answers bad_json
          continue;
        }
        this._terminate(closeCodeOf(response.status), error?.message ?? `POST answered ${response.status}`);
        return;
      }
    } finally {
      this._posting = false;
    }
  }

  _closed(code, reason) {
    if (this.readyState === READY_STATE.CLOSED) return;
    this.readyState = READY_STATE.CLOSED;
    this._abort.abort();
    this._queue = [];
    this.onclose?.({ type: "close", code, reason, wasClean: code === CLOSE_CODES.NORMAL });
  }

  _terminate(code, reason) {
    if (this.readyState >= READY_STATE.CLOSING) return;
    this.readyState = READY_STATE.CLOSING;
    this._abort.abort();
    // the close event comes asynchronously, as a WebSocket's does
    Promise.resolve().then(() => this._closed(code, reason));
  }

  /** End the stream (the server detaches the session, as for a closed socket). */
  close(code = CLOSE_CODES.NORMAL, reason = "") {
    this._terminate(code, reason);
  }

  /** Same as close(): there is no closing handshake to skip. */
  terminate() {
    this._terminate(CLOSE_CODES.ABNORMAL, "terminated");
  }
}
