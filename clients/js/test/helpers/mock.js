// A scriptable stand-in for WebSocket and a fake clock, for unit tests.

/**
 * A WebSocket class whose instances the test drives from the "server" side:
 * `ws.open()`, `ws.receive(frame)`, `ws.drop(code)`. What the client sent
 * is in `ws.sent` (parsed JSON).
 */
export function mockWebSocketClass() {
  class MockWebSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;
    static instances = [];

    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      MockWebSocket.instances.push(this);
    }

    static get last() {
      return MockWebSocket.instances[MockWebSocket.instances.length - 1];
    }

    // --- the client's side
    send(data) {
      if (this.readyState !== 1) throw new Error(`send in readyState ${this.readyState}`);
      this.sent.push(JSON.parse(data));
    }

    close(code = 1000, reason = "") {
      if (this.readyState >= 2) return;
      this.closedWith = { code, reason };
      this.readyState = 2;
      // the server answers the close handshake a moment later
      setImmediate(() => {
        if (this.readyState === 2) this.finishClose();
      });
    }

    // --- the test's (server's) side
    open() {
      this.readyState = 1;
      this.onopen?.({ type: "open" });
    }

    receive(frame) {
      this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    }

    /** The connection ends (1006: the network went away). */
    drop(code = 1006, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }

    /** Complete a close the client started. */
    finishClose() {
      if (this.readyState === 3) return;
      const { code, reason } = this.closedWith ?? { code: 1005, reason: "" };
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: true });
    }

    sentOfType(type) {
      return this.sent.filter((m) => m.type === type);
    }
  }
  return MockWebSocket;
}

/** A clock whose time moves only when the test says so. */
export class FakeClock {
  constructor() {
    this.time = 0;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = this.setTimeout.bind(this);
    this.clearTimeout = this.clearTimeout.bind(this);
    this.now = this.now.bind(this);
  }

  now() {
    return this.time;
  }

  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.timers.set(id, { at: this.time + Math.max(0, ms ?? 0), fn, ms });
    return id;
  }

  clearTimeout(id) {
    this.timers.delete(id);
  }

  /** Delays (from now) of the timers that are set. */
  pending() {
    return [...this.timers.values()].map((t) => t.at - this.time).sort((a, b) => a - b);
  }

  /** Move time on by `ms`, running the timers that fall due, in order. */
  advance(ms) {
    const target = this.time + ms;
    for (;;) {
      let next = null;
      for (const [id, t] of this.timers) if (t.at <= target && (!next || t.at < next[1].at)) next = [id, t];
      if (!next) break;
      this.timers.delete(next[0]);
      this.time = next[1].at;
      next[1].fn();
    }
    this.time = target;
  }
}

/** Let pending promise callbacks run. */
export async function flush() {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

export const WELCOME = {
  type: "welcome",
  protocol: 1,
  session: "S1",
  resumed: false,
  heartbeat_ms: 0,
  limits: { max_streams: 8, max_message_bytes: 1048576, max_id_length: 64 },
  server: "wsserver/test",
};

/**
 * A Client on a MockWebSocket and a FakeClock, connected (welcome received)
 * unless `connect: false`.
 */
export async function connectedClient(ClientClass, options = {}, { connect = true, welcome = {} } = {}) {
  const MockWebSocket = mockWebSocketClass();
  const clock = new FakeClock();
  const client = new ClientClass("ws://test/", {
    WebSocket: MockWebSocket,
    clock,
    random: () => 0.5,
    heartbeatIntervalMs: 0,
    idPrefix: "t",
    ...options,
  });
  const states = [];
  client.on("state", (state) => states.push(state));
  const errors = [];
  client.on("error", (error) => errors.push(error));
  let connected = null;
  if (connect) {
    connected = client.connect();
    const ws = MockWebSocket.last;
    ws.open();
    ws.receive({ ...WELCOME, ...welcome });
    await connected;
  }
  return { client, MockWebSocket, clock, states, errors, ws: () => MockWebSocket.last };
}
