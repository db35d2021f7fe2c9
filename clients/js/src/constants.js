// Wire names, close codes and error codes of protocol v1, in one place.
// The normative text is protocol/PROTOCOL.md in the wsserver repository.

/** The protocol version this client speaks (`hello.protocol`). */
export const PROTOCOL_VERSION = 1;

/** The WebSocket subprotocol offered in the handshake. */
export const SUBPROTOCOL = "wsserver.v1";

/** Message `type`s, client to server. */
export const CLIENT_MESSAGES = Object.freeze({
  HELLO: "hello",
  GENERATE: "generate",
  CANCEL: "cancel",
  INTERRUPT: "interrupt",
  ACK: "ack",
  PING: "ping",
  SUBSCRIBE: "subscribe",
  UNSUBSCRIBE: "unsubscribe",
  PUBLISH: "publish",
  SEND: "send",
  TOOL_RESULT: "tool_result",
  APPROVE: "approve",
});

/** Message `type`s, server to client. */
export const SERVER_MESSAGES = Object.freeze({
  WELCOME: "welcome",
  STREAM_START: "stream.start",
  STREAM_DELTA: "stream.delta",
  STREAM_TOOL_CALL: "stream.tool_call",
  STREAM_END: "stream.end",
  STREAM_SNAPSHOT: "stream.snapshot",
  STREAM_WAITING: "stream.waiting",
  STREAM_TOOL_RESULT: "stream.tool_result",
  STREAM_STEP: "stream.step",
  TOOL_CALL: "tool_call",
  MESSAGE: "message",
  SUBSCRIBED: "subscribed",
  PRESENCE: "presence",
  OK: "ok",
  PONG: "pong",
  ERROR: "error",
  SHUTDOWN: "shutdown",
});

/** WebSocket close codes (PROTOCOL.md 7.2), plus the two the client uses itself. */
export const CLOSE_CODES = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  SERVICE_RESTART: 1012, // the node serving the session was lost: reconnect and resume
  TRY_AGAIN_LATER: 1013,
  SESSION_TAKEN_OVER: 4000,
  UNSUPPORTED_PROTOCOL: 4001,
  HELLO_TIMEOUT: 4008,
  PROTOCOL_VIOLATION: 4400,
  UNAUTHORIZED: 4401,
  FORBIDDEN: 4403,
  // Sent by this client when it gives a connection up (the server sees them,
  // if the connection still carries anything at all).
  CLIENT_HEARTBEAT_TIMEOUT: 4990,
  CLIENT_CONNECT_TIMEOUT: 4991,
  CLIENT_RECONNECT: 4992,
});

/**
 * Close codes after which reconnecting would be pointless or harmful:
 * 4000 (the session was taken over by another connection: two tabs would
 * take it from each other forever), 4001, 4400, 4401, 4403 and 1008.
 */
export const NO_RECONNECT_CODES = Object.freeze(
  new Set([
    CLOSE_CODES.SESSION_TAKEN_OVER,
    CLOSE_CODES.UNSUPPORTED_PROTOCOL,
    CLOSE_CODES.PROTOCOL_VIOLATION,
    CLOSE_CODES.UNAUTHORIZED,
    CLOSE_CODES.FORBIDDEN,
    CLOSE_CODES.POLICY,
  ]),
);

/** Stable `error.code` values (PROTOCOL.md 7.1) and `stream.end.error.code` values. */
export const ERROR_CODES = Object.freeze({
  BAD_JSON: "bad_json",
  BAD_MESSAGE: "bad_message",
  UNKNOWN_TYPE: "unknown_type",
  BINARY_FRAME: "binary_frame",
  NOT_HELLO: "not_hello",
  DUPLICATE_HELLO: "duplicate_hello",
  UNSUPPORTED_PROTOCOL: "unsupported_protocol",
  NOT_IMPLEMENTED: "not_implemented",
  DUPLICATE_REQUEST: "duplicate_request",
  TOO_MANY_STREAMS: "too_many_streams",
  STREAM_EXISTS: "stream_exists",
  UNKNOWN_STREAM: "unknown_stream",
  PROVIDER_UNAVAILABLE: "provider_unavailable",
  CONVERSATION_TOO_LARGE: "conversation_too_large",
  // a generate's conversation and tools
  BAD_TOOL_SCHEMA: "bad_tool_schema",
  DUPLICATE_TOOL: "duplicate_tool",
  UNKNOWN_TOOL: "unknown_tool",
  UNKNOWN_TOOL_CALL: "unknown_tool_call",
  MISPLACED_CONTENT: "misplaced_content",
  BAD_IMAGE: "bad_image",
  // agent runs: tool results, approvals, threads
  NOT_WAITING: "not_waiting",
  UNKNOWN_CALL: "unknown_call",
  CALL_ANSWERED: "call_answered",
  CALL_FORBIDDEN: "call_forbidden",
  APPROVAL_REQUIRED: "approval_required",
  BUSY: "busy",
  RESUME_FAILED: "resume_failed",
  RATE_LIMITED: "rate_limited",
  UNAUTHORIZED: "unauthorized",
  FORBIDDEN: "forbidden",
  BAD_NAME: "bad_name",
  AGENT_NAME_TAKEN: "agent_name_taken",
  UNKNOWN_AGENT: "unknown_agent",
  INBOX_FULL: "inbox_full",
  TOO_MANY_SUBSCRIPTIONS: "too_many_subscriptions",
  MESSAGE_TOO_LARGE: "message_too_large",
  BACKPLANE_UNAVAILABLE: "backplane_unavailable",
  // the HTTP transport's refused requests (JSON error bodies)
  UNKNOWN_CONNECTION: "unknown_connection",
  BAD_REQUEST: "bad_request",
  UNAVAILABLE: "unavailable",
  // stream.end.error.code
  PROVIDER_ERROR: "provider_error",
  PROVIDER_TIMEOUT: "provider_timeout",
  EXPIRED: "expired",
  SHUTDOWN: "shutdown",
  NODE_LOST: "node_lost",
  INTERNAL: "internal",
  // raised by this client, never sent by a server
  CONNECTION_LOST: "connection_lost",
  TIMEOUT: "timeout",
});

/** `stream.end.reason` values. */
export const END_REASONS = Object.freeze({
  COMPLETE: "complete",
  LENGTH: "length",
  CANCELLED: "cancelled",
  INTERRUPTED: "interrupted",
  TOOL_CALLS: "tool_calls",
  ERROR: "error",
});

/** What a call of a waiting run waits for (`stream.waiting.calls[].wait`). */
export const WAITS = Object.freeze({
  APPROVAL: "approval",
  CLIENT: "client",
  AGENT: "agent",
});

/** `generate.on_busy`: what a generate does when a stream of its thread has not ended. */
export const ON_BUSY = Object.freeze({
  PARALLEL: "parallel",
  QUEUE: "queue",
  INTERRUPT: "interrupt",
  REJECT: "reject",
});

/** `stream.delta.part` values (absent: answer text). */
export const DELTA_PARTS = Object.freeze({
  REASONING: "reasoning",
  TOOL_CALL: "tool_call",
});

/** The client's connection states (`client.state`, and the event of that name). */
export const STATES = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  RESUMED: "resumed",
  CLOSED: "closed",
});

/** WebSocket `readyState` values (the same in browsers and in the `ws` package). */
export const READY_STATE = Object.freeze({ CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 });

/** Client defaults (milliseconds unless named otherwise). */
export const DEFAULTS = Object.freeze({
  requestTimeoutMs: 30_000,
  connectTimeoutMs: 10_000,
  heartbeatIntervalMs: 15_000,
  heartbeatTimeoutMs: 10_000,
  ackEvery: 256,
  reconnectBaseMs: 250,
  reconnectCapMs: 10_000,
  giveUpAfterMs: null,
});

/** Longest request id the protocol accepts. */
export const MAX_ID_LENGTH = 64;
