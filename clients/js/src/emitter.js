// A small event emitter that works the same in browsers and Node.
//
// `on` returns a function that removes the listener. A listener that throws
// does not break the client: the error is reported (reportError in browsers,
// console.error elsewhere) and the other listeners still run.

export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
  }

  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  once(event, listener) {
    const off = this.on(event, (...args) => {
      off();
      listener(...args);
    });
    return off;
  }

  off(event, listener) {
    const set = this._listeners.get(event);
    if (set) {
      set.delete(listener);
      if (set.size === 0) this._listeners.delete(event);
    }
  }

  listenerCount(event) {
    return this._listeners.get(event)?.size ?? 0;
  }

  emit(event, ...args) {
    const set = this._listeners.get(event);
    if (!set) return false;
    for (const listener of [...set]) {
      try {
        listener(...args);
      } catch (error) {
        report(error);
      }
    }
    return true;
  }
}

export function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else if (typeof console !== "undefined") console.error(error);
}
