// Tool handlers: calls answered as they come (agent runs, PROTOCOL.md 4.4).
//
//     client.tools.register("lookup", async (args) => ({ summary: "…" }));
//
// A registered handler answers, by itself and once per call:
// * the calls of this client's own runs that wait for the client
//   (`stream.waiting`, `wait: "client"`): `tool_result {stream, call, content}`;
// * the calls routed to this client's agent (`tool_call` frames):
//   `tool_result {call, content}`.
// What a handler returns becomes the content: a string as it is, anything
// else as JSON; a handler that throws answers {"error": "tool_failed",
// "message"} (the model reads it and reacts). A routed call with no handler
// is emitted by the client as "tool_call" ({call, name, arguments, from}):
// answer it with client.toolResult(call, content).

/** A result as `tool_result.content`: a string or a list of parts as it is, else JSON text. */
export function contentOf(result) {
  if (typeof result === "string" || Array.isArray(result)) return result;
  return JSON.stringify(result === undefined ? null : result);
}

export class Tools {
  /** @param {import("./socket.js").Client} client */
  constructor(client) {
    this._client = client;
    this._handlers = new Map();
    this._taken = new Set(); // "stream\0call" answered by a handler
  }

  /** Answer calls of tool `name` with `handler(arguments)` (its value, or a promise of it). */
  register(name, handler) {
    if (typeof handler !== "function") throw new TypeError("a tool handler is a function");
    this._handlers.set(name, handler);
    return handler;
  }

  unregister(name) {
    this._handlers.delete(name);
  }

  handles(name) {
    return this._handlers.has(name);
  }

  /** Run the handler of `name` for `call` (once) and send its result; false: no handler. */
  answer(stream, call, name, args) {
    const handler = this._handlers.get(name);
    if (!handler) return false;
    const key = `${stream ?? ""}\0${call}`;
    if (this._taken.has(key)) return true;
    this._taken.add(key);
    Promise.resolve()
      .then(() => handler(args ?? {}))
      .then(contentOf, (error) => contentOf({ error: "tool_failed", message: String(error?.message ?? error) }))
      .then((content) => this._client.toolResult(call, content, stream == null ? {} : { stream }))
      .catch((error) => this._client.emit("error", error)); // e.g. the run ended meanwhile
    return true;
  }

  /** A `tool_call` frame: a handler answers it, else the client emits "tool_call". */
  _routed(frame) {
    const request = { call: frame.call, name: frame.name, arguments: frame.arguments ?? {}, from: frame.from };
    if (!this.answer(null, request.call, request.name, request.arguments)) this._client.emit("tool_call", request);
  }
}
