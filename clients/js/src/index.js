// wsserver browser and Node client: LLM token streaming with resume and
// steering, channels, presence and direct messages. No dependencies.
//
//     import { Client } from "/client/index.js";
//     const client = await new Client("ws://127.0.0.1:8765/").connect();
//     const stream = await client.generate("hi");
//     for await (const text of stream) console.log(text);

export { Client, connect } from "./socket.js";
export { SseSocket, SseParser, httpEndpoint } from "./sse.js";
export { Stream } from "./stream.js";
export { Channel, RemoteStream } from "./channel.js";
export { Push } from "./push.js";
export { Timer, fullJitter, defaultClock } from "./timer.js";
export { Emitter } from "./emitter.js";
export { Tools, contentOf } from "./tools.js";
export {
  WsServerError,
  RateLimitedError,
  ConnectionLostError,
  RequestTimeoutError,
  StreamFailedError,
  errorFromFrame,
} from "./errors.js";
export {
  PROTOCOL_VERSION,
  SUBPROTOCOL,
  CLIENT_MESSAGES,
  SERVER_MESSAGES,
  CLOSE_CODES,
  NO_RECONNECT_CODES,
  ERROR_CODES,
  END_REASONS,
  DELTA_PARTS,
  WAITS,
  ON_BUSY,
  STATES,
  DEFAULTS,
} from "./constants.js";
