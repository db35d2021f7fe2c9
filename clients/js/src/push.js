// One request: it owns its id, its timeout and its reply (after phoenix.js's Push).
//
// The Client sends it when the connection is up and keeps it until its one
// terminal reply (the frame whose `ref` is the id) arrives. While the
// connection is down it waits, and after a resume it is sent again with the
// SAME id: the server never acts twice on an id.

import { RequestTimeoutError, errorFromFrame } from "./errors.js";

export class Push {
  /**
   * @param {object} message the request, with its `id` set
   * @param {object} options
   * @param {number|null} [options.timeoutMs] reject with RequestTimeoutError after this long
   * @param {boolean} [options.volatile] fail, rather than re-send, when the connection drops (ping)
   * @param {boolean} [options.idempotent] may be sent again in a NEW session (subscribe)
   * @param {object} [options.clock]
   * @param {(push: Push) => void} [options.onTimeout]
   */
  constructor(message, { timeoutMs = null, volatile = false, idempotent = false, clock, onTimeout } = {}) {
    this.id = message.id;
    this.message = message;
    this.payload = JSON.stringify(message);
    this.volatile = volatile;
    this.idempotent = idempotent;
    /** Number of the connection it was last written to (null: not yet). */
    this.sentOn = null;
    /** Whether it was sent again after a resume. */
    this.resent = false;
    this.settled = false;
    this.createdAt = clock?.now() ?? Date.now();
    this._clock = clock;
    this._timer = null;
    this.reply = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // The caller awaits `reply`; this keeps an un-awaited failure from being
    // reported as an unhandled rejection.
    this.reply.catch(() => {});
    if (timeoutMs != null && timeoutMs > 0 && clock) {
      this._timer = clock.setTimeout(() => {
        this._timer = null;
        if (this.settled) return;
        this.fail(new RequestTimeoutError(message, timeoutMs));
        onTimeout?.(this);
      }, timeoutMs);
    }
  }

  /** The reply frame arrived: resolve with it, or reject for an `error`. */
  receive(frame) {
    if (this.settled) return;
    if (frame.type === "error") this.fail(errorFromFrame(frame));
    else this._settle(() => this._resolve(frame));
  }

  fail(error) {
    this._settle(() => this._reject(error));
  }

  _settle(fn) {
    if (this.settled) return;
    this.settled = true;
    if (this._timer !== null) this._clock.clearTimeout(this._timer);
    this._timer = null;
    fn();
  }
}
