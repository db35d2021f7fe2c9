// A channel subscription: messages and presence, in offset order, exactly once.
//
//     const channel = await client.subscribe("team:planning");
//     channel.onMessage(({ channel, offset, from, data }) => …);
//     for await (const message of channel) …;
//     channel.members;            // Set of agent names present
//     await channel.publish({ step: 3 });
//     await channel.unsubscribe();
//
// Channel traffic carries a per-channel `offset` instead of a `seq`. The
// channel remembers the last offset it delivered and, after every
// reconnect, the client subscribes again with `{since: offset, epoch}`: the
// server sends what was missed, then live traffic. Traffic that arrives
// while such a recovery is under way is held back and delivered in offset
// order, so nothing is skipped or repeated. When the server cannot recover
// (another epoch, or history that no longer reaches back) the channel
// emits "gap" and carries on from the current position.
//
// Events: "message" ({channel, offset, from, data}), "presence"
// ({channel, offset, joined?, left?, members}), "subscribed" ({epoch,
// offset, recovered, members}) after every (re)subscription, "gap", "stream"
// (a RemoteStream: a generation someone publishes to the channel with
// `generate({channel})`), "closed".
//
// Messages that arrive before anyone listens (onMessage or an iterator) are
// kept, up to `maxBacklog`, and handed to the first consumer.

import { DELTA_PARTS, SERVER_MESSAGES } from "./constants.js";
import { Emitter } from "./emitter.js";

/** A generation that another agent publishes to a channel, followed token by token. */
export class RemoteStream extends Emitter {
  constructor(channel, from, id) {
    super();
    this.channel = channel;
    this.from = from;
    this.id = id;
    this.provider = null;
    this.model = null;
    this.steeredFrom = null;
    this.text = "";
    /** Its reasoning text so far. */
    this.reasoning = "";
    /** Its tool calls so far: call id -> {id, name, arguments (JSON text)}. */
    this.calls = new Map();
    this.nextIndex = 0;
    /** The stream.end data ({reason, usage, ttft_ms, duration_ms, …}) once it ended. */
    this.result = null;
  }

  get done() {
    return this.result !== null;
  }

  _frame(data) {
    switch (data.type) {
      case SERVER_MESSAGES.STREAM_START:
        this.provider = data.provider ?? null;
        this.model = data.model ?? null;
        this.steeredFrom = data.steered_from ?? null;
        this.emit("start", data);
        break;
      case SERVER_MESSAGES.STREAM_DELTA:
      case SERVER_MESSAGES.STREAM_TOOL_CALL:
        if (typeof data.index === "number") {
          if (data.index < this.nextIndex) return;
          this.nextIndex = data.index + 1;
        }
        if (data.type === SERVER_MESSAGES.STREAM_TOOL_CALL) {
          if (typeof data.call === "string" && !this.calls.has(data.call)) {
            this.calls.set(data.call, { id: data.call, name: data.name ?? "", arguments: "" });
            this.emit("tool_call", { call: data.call, name: data.name ?? "", index: data.index });
          }
        } else if (typeof data.text !== "string") {
          // nothing to add
        } else if (data.part === DELTA_PARTS.REASONING) {
          this.reasoning += data.text;
          this.emit("reasoning", { text: data.text, index: data.index });
        } else if (data.part === DELTA_PARTS.TOOL_CALL) {
          const call = this.calls.get(data.call);
          if (call) call.arguments += data.text;
          this.emit("tool_call_delta", { call: data.call, text: data.text, index: data.index });
        } else if (data.part == null) {
          this.text += data.text;
          this.emit("delta", { text: data.text, index: data.index });
        }
        break;
      case SERVER_MESSAGES.STREAM_SNAPSHOT:
        if (typeof data.text === "string" && data.text.startsWith(this.text)) {
          const rest = data.text.slice(this.text.length);
          this.text = data.text;
          if (rest) this.emit("delta", { text: rest, index: null });
        }
        if (typeof data.index === "number") this.nextIndex = Math.max(this.nextIndex, data.index);
        break;
      case SERVER_MESSAGES.STREAM_END:
        this.result = data;
        this.emit("end", data);
        break;
      default:
        break;
    }
  }
}

export class Channel extends Emitter {
  /**
   * @param {import("./socket.js").Client} client
   * @param {string} name
   * @param {{since?: number, epoch?: string, maxBacklog?: number}} [options]
   */
  constructor(client, name, { since = null, epoch = null, maxBacklog = 1000 } = {}) {
    super();
    this._client = client;
    this.name = name;
    /** The channel's epoch (changes when its history starts afresh). */
    this.epoch = epoch;
    /** The last offset delivered (null before the first). */
    this.offset = since;
    /** Agent names present in the channel. */
    this.members = new Set();
    /** Whether the last (re)subscription recovered everything since `offset`. */
    this.recovered = null;
    this.subscribed = false;
    this.closed = false;
    /** Frames dropped because they had been delivered before. */
    this.duplicates = 0;
    this.maxBacklog = maxBacklog;
    this._askedSince = null;
    this._syncing = false;
    this._recoverTo = null;
    this._subscribedSeq = null;
    this._held = new Map();
    this._backlog = [];
    this._queues = new Set();
    this._remote = new Map();
  }

  /** Call `listener({channel, offset, from, data})` for every message; returns a function that stops it. */
  onMessage(listener) {
    const first = !this._hasConsumer();
    const off = this.on("message", listener);
    if (first) {
      const backlog = this._backlog;
      this._backlog = [];
      for (const message of backlog) listener(message);
    }
    return off;
  }

  /** Call `listener({channel, offset, joined?, left?, members})` on every presence change. */
  onPresence(listener) {
    return this.on("presence", listener);
  }

  /** Publish `data` (any JSON) here; resolves with the message's offset. */
  publish(data, options) {
    return this._client.publish(this.name, data, options);
  }

  /** Leave the channel. */
  unsubscribe(options) {
    return this._client._unsubscribe(this, options);
  }

  /** Generations published to this channel that are still running. */
  get streams() {
    return [...this._remote.values()];
  }

  [Symbol.asyncIterator]() {
    const queue = { items: [], wake: null, error: null, done: false };
    if (!this._hasConsumer()) {
      queue.items = this._backlog;
      this._backlog = [];
    }
    if (this.closed) queue.done = true;
    this._queues.add(queue);
    const channel = this;
    return {
      async next() {
        for (;;) {
          if (queue.items.length) return { value: queue.items.shift(), done: false };
          if (queue.error) {
            const error = queue.error;
            queue.error = null;
            queue.done = true;
            throw error;
          }
          if (queue.done) {
            channel._queues.delete(queue);
            return { value: undefined, done: true };
          }
          await new Promise((resolve) => (queue.wake = resolve));
        }
      },
      async return() {
        queue.done = true;
        channel._queues.delete(queue);
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  // ------------------------------------------------------- called by the client

  _hasConsumer() {
    return this.listenerCount("message") > 0 || this._queues.size > 0;
  }

  /** The subscribe request, asking for what came after the last delivered offset. */
  _subscribeMessage() {
    const message = { type: "subscribe", channel: this.name };
    if (this.offset !== null) message.since = this.offset;
    if (this.epoch !== null && this.offset !== null) message.epoch = this.epoch;
    this._askedSince = this.offset;
    this._syncing = true;
    this._recoverTo = null;
    this._subscribedSeq = null;
    return message;
  }

  _subscribed(frame) {
    const previousEpoch = this.epoch;
    this.subscribed = true;
    this.epoch = typeof frame.epoch === "string" ? frame.epoch : this.epoch;
    this.recovered = frame.recovered === true;
    if (Array.isArray(frame.members)) this.members = new Set(frame.members);
    this._subscribedSeq = typeof frame.seq === "number" ? frame.seq : null;
    const position = typeof frame.offset === "number" ? frame.offset : 0;
    if (this._askedSince === null) {
      // A first subscription: traffic after the current position is ours.
      this.offset = position;
      this._finishSync();
    } else if (this.recovered) {
      // The missed messages (since, position] follow.
      this._recoverTo = position;
      this._drain();
    } else {
      this.emit("gap", { since: this._askedSince, epoch: this.epoch, offset: position });
      // Same epoch: what we had is still valid, the history fell short. A new
      // epoch: the old offsets mean nothing, everything held is new.
      if (previousEpoch !== null && previousEpoch !== this.epoch) this.offset = null;
      this._finishSync();
      this.offset = Math.max(this.offset ?? position, position);
    }
    this.emit("subscribed", {
      channel: this.name,
      epoch: this.epoch,
      offset: position,
      recovered: this.recovered,
      members: [...this.members],
    });
  }

  /** A later session frame (seq > the subscribed frame's, or a pong) proves the recovery complete. */
  _settle(seq) {
    if (this._recoverTo === null) return;
    if (seq === undefined || this._subscribedSeq === null || seq > this._subscribedSeq) this._finishSync();
  }

  _traffic(frame) {
    const offset = frame.offset;
    if (typeof offset !== "number") {
      this._deliver(frame);
      return;
    }
    if (this._syncing) {
      // (Re)subscribing: hold everything until `subscribed` says where we are
      // (after an epoch change even a lower offset can be new).
      if (!this._held.has(offset)) this._held.set(offset, frame);
      if (this._recoverTo !== null) this._drain();
      return;
    }
    if (this.offset !== null && offset <= this.offset) {
      this.duplicates += 1;
      return;
    }
    if (this.offset !== null && offset > this.offset + 1) {
      this.emit("gap", { from: this.offset + 1, to: offset - 1 });
    }
    this._deliver(frame);
  }

  _drain() {
    this._dropSeen();
    if (this.offset !== null) {
      while (this._held.has(this.offset + 1)) {
        const frame = this._held.get(this.offset + 1);
        this._held.delete(this.offset + 1);
        this._deliver(frame);
      }
    }
    if (this._recoverTo !== null && this.offset !== null && this.offset >= this._recoverTo) this._finishSync();
  }

  _dropSeen() {
    if (this.offset === null) return;
    for (const offset of [...this._held.keys()]) {
      if (offset <= this.offset) {
        this._held.delete(offset);
        this.duplicates += 1;
      }
    }
  }

  _finishSync() {
    this._syncing = false;
    this._recoverTo = null;
    this._dropSeen();
    const rest = [...this._held.values()].sort((a, b) => a.offset - b.offset);
    this._held.clear();
    for (const frame of rest) {
      if (this.offset !== null && frame.offset > this.offset + 1) {
        this.emit("gap", { from: this.offset + 1, to: frame.offset - 1 });
      }
      this._deliver(frame);
    }
  }

  _deliver(frame) {
    if (typeof frame.offset === "number") this.offset = Math.max(this.offset ?? frame.offset, frame.offset);
    if (frame.type === SERVER_MESSAGES.PRESENCE) {
      if (typeof frame.joined === "string") this.members.add(frame.joined);
      if (typeof frame.left === "string") this.members.delete(frame.left);
      const event = { channel: this.name, offset: frame.offset, members: [...this.members] };
      if (frame.joined !== undefined) event.joined = frame.joined;
      if (frame.left !== undefined) event.left = frame.left;
      this.emit("presence", event);
      return;
    }
    const message = { channel: this.name, offset: frame.offset, from: frame.from, data: frame.data };
    this._remoteFrame(message);
    if (!this._hasConsumer()) {
      this._backlog.push(message);
      if (this._backlog.length > this.maxBacklog) this._backlog.shift();
    }
    this.emit("message", message);
    for (const queue of this._queues) {
      queue.items.push(message);
      queue.wake?.();
      queue.wake = null;
    }
  }

  _remoteFrame(message) {
    const data = message.data;
    if (!data || typeof data !== "object" || typeof data.type !== "string") return;
    if (!data.type.startsWith("stream.") || typeof data.stream !== "string") return;
    const key = `${message.from}\n${data.stream}`;
    let remote = this._remote.get(key);
    if (!remote) {
      if (data.type === SERVER_MESSAGES.STREAM_END) return; // ended before we saw it
      remote = new RemoteStream(this.name, message.from, data.stream);
      this._remote.set(key, remote);
      this.emit("stream", remote);
    }
    remote._frame(data);
    if (remote.done) this._remote.delete(key);
  }

  _close(error = null) {
    if (this.closed) return;
    this.closed = true;
    for (const queue of this._queues) {
      if (error) queue.error = error;
      queue.done = true;
      queue.wake?.();
      queue.wake = null;
    }
    this.emit("closed", error);
  }
}
