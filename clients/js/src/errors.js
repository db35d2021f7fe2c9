// Typed errors. Every error this client raises is a WsServerError with a
// stable `.code`: the protocol's error code (PROTOCOL.md 7.1) when the
// server refused something, `connection_lost` and `timeout` for the two
// failures the client detects itself, and the stream's error code
// (`provider_error`, `expired`…) for a stream that ended with reason `error`.
//
//     WsServerError              code, message, ref, stream, field, frame
//     ├── RateLimitedError       code "rate_limited"; retryAfterMs
//     ├── ConnectionLostError    code "connection_lost"; closeCode, reason
//     ├── RequestTimeoutError    code "timeout"; the reply did not come in time
//     └── StreamFailedError      a stream ended with reason "error"; result

import { ERROR_CODES } from "./constants.js";

export class WsServerError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {object} [frame] the `error` frame, when the server sent one
   */
  constructor(code, message, frame = undefined) {
    super(message ? `${code}: ${message}` : code);
    this.name = "WsServerError";
    this.code = code;
    /** The server's text (for humans; it may change). */
    this.detail = message ?? "";
    this.frame = frame;
    this.ref = frame?.ref;
    this.stream = frame?.stream;
    this.field = frame?.field;
    this.supported = frame?.supported;
    /** For a subscription the server dropped (forbidden after a resume with narrower rights). */
    this.channel = frame?.channel;
  }
}

export class RateLimitedError extends WsServerError {
  constructor(code, message, frame) {
    super(code, message, frame);
    this.name = "RateLimitedError";
    this.retryAfterMs = frame?.retry_after_ms;
  }
}

export class ConnectionLostError extends WsServerError {
  /**
   * @param {number|null} closeCode the WebSocket close code (1006: the network went away)
   * @param {string} reason
   */
  constructor(closeCode, reason = "") {
    const what = closeCode == null ? "connection lost" : `connection closed (${closeCode})`;
    super(ERROR_CODES.CONNECTION_LOST, reason ? `${what}: ${reason}` : what);
    this.name = "ConnectionLostError";
    this.closeCode = closeCode;
    this.reason = reason;
  }
}

export class RequestTimeoutError extends WsServerError {
  constructor(request, timeoutMs) {
    super(ERROR_CODES.TIMEOUT, `no reply to ${request.type} ${request.id} within ${timeoutMs} ms`);
    this.name = "RequestTimeoutError";
    this.ref = request.id;
  }
}

export class StreamFailedError extends WsServerError {
  /**
   * @param {string} code the stream's `error.code` (provider_error, expired…)
   * @param {string} message
   * @param {object} result the stream's result (text so far, usage…)
   */
  constructor(code, message, result) {
    super(code, message);
    this.name = "StreamFailedError";
    this.result = result;
    this.stream = result?.stream;
  }
}

/** The exception for an `error` frame. */
export function errorFromFrame(frame) {
  const code = typeof frame?.code === "string" ? frame.code : "unknown";
  const message = typeof frame?.message === "string" ? frame.message : "";
  if (code === ERROR_CODES.RATE_LIMITED) return new RateLimitedError(code, message, frame);
  return new WsServerError(code, message, frame);
}
