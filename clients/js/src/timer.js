// When to retry, apart from what to retry (after phoenix.js's Timer).

/**
 * The clock every timer of the client goes through. The globals are looked
 * up on each call, so fake timers installed later (node:test's mock.timers,
 * sinon) take effect; a test may also pass its own clock to the Client.
 */
export const defaultClock = Object.freeze({
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle),
  now: () => Date.now(),
});

/**
 * Full-jitter exponential backoff: retry number `tries` (1, 2, 3…) waits
 * uniform(0, min(capMs, baseMs * 2 ** (tries - 1))) milliseconds. The first
 * retry is jittered too, so that a server restart is not met by every
 * client at the same instant.
 *
 * @param {{baseMs?: number, capMs?: number, random?: () => number}} [options]
 * @returns {(tries: number) => number}
 */
export function fullJitter({ baseMs = 250, capMs = 10_000, random = Math.random } = {}) {
  return (tries) => {
    const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, tries - 1));
    return Math.floor(random() * ceiling);
  };
}

/**
 * Calls `callback` after `timerCalc(tries)` milliseconds, where `tries`
 * counts the calls since the last `reset()`.
 *
 *     const t = new Timer(() => reconnect(), fullJitter());
 *     t.scheduleTimeout();   // after a failure
 *     t.reset();             // after a success
 */
export class Timer {
  /**
   * @param {() => void} callback
   * @param {(tries: number) => number} timerCalc
   * @param {{setTimeout: Function, clearTimeout: Function}} [clock]
   */
  constructor(callback, timerCalc, clock = defaultClock) {
    this.callback = callback;
    this.timerCalc = timerCalc;
    this.clock = clock;
    this.timer = null;
    this.tries = 0;
  }

  /** Stop a scheduled call and start counting again. */
  reset() {
    this.tries = 0;
    this.clear();
  }

  /** Stop a scheduled call (the count of tries stays). */
  clear() {
    if (this.timer !== null) this.clock.clearTimeout(this.timer);
    this.timer = null;
  }

  get scheduled() {
    return this.timer !== null;
  }

  /**
   * Schedule the next call, replacing one that is scheduled.
   * @param {number} [delayMs] this delay instead of `timerCalc(tries + 1)`
   * @returns {number} the delay used
   */
  scheduleTimeout(delayMs) {
    this.clear();
    const delay = delayMs ?? this.timerCalc(this.tries + 1);
    this.timer = this.clock.setTimeout(() => {
      this.timer = null;
      this.tries += 1;
      this.callback();
    }, delay);
    return delay;
  }
}
