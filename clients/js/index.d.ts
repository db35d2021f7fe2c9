// Types of the wsserver JS client (src/index.js). Protocol: protocol/PROTOCOL.md.

export declare const PROTOCOL_VERSION: 1;
export declare const SUBPROTOCOL: "wsserver.v1";

export declare const CLIENT_MESSAGES: Readonly<{
  HELLO: "hello"; GENERATE: "generate"; CANCEL: "cancel"; INTERRUPT: "interrupt"; ACK: "ack";
  PING: "ping"; SUBSCRIBE: "subscribe"; UNSUBSCRIBE: "unsubscribe"; PUBLISH: "publish"; SEND: "send";
  TOOL_RESULT: "tool_result"; APPROVE: "approve";
}>;
export declare const SERVER_MESSAGES: Readonly<{
  WELCOME: "welcome"; STREAM_START: "stream.start"; STREAM_DELTA: "stream.delta"; STREAM_TOOL_CALL: "stream.tool_call";
  STREAM_END: "stream.end";
  STREAM_SNAPSHOT: "stream.snapshot"; STREAM_WAITING: "stream.waiting"; STREAM_TOOL_RESULT: "stream.tool_result";
  STREAM_STEP: "stream.step"; TOOL_CALL: "tool_call"; MESSAGE: "message"; SUBSCRIBED: "subscribed"; PRESENCE: "presence";
  OK: "ok"; PONG: "pong"; ERROR: "error"; SHUTDOWN: "shutdown";
}>;
export declare const CLOSE_CODES: Readonly<{
  NORMAL: 1000; GOING_AWAY: 1001; ABNORMAL: 1006; POLICY: 1008; TOO_BIG: 1009; INTERNAL: 1011; SERVICE_RESTART: 1012;
  TRY_AGAIN_LATER: 1013; SESSION_TAKEN_OVER: 4000; UNSUPPORTED_PROTOCOL: 4001; HELLO_TIMEOUT: 4008;
  PROTOCOL_VIOLATION: 4400; UNAUTHORIZED: 4401; FORBIDDEN: 4403;
  CLIENT_HEARTBEAT_TIMEOUT: 4990; CLIENT_CONNECT_TIMEOUT: 4991; CLIENT_RECONNECT: 4992;
}>;
/** Close codes after which the client does not reconnect. */
export declare const NO_RECONNECT_CODES: ReadonlySet<number>;

export type ErrorCode =
  | "bad_json" | "bad_message" | "unknown_type" | "binary_frame" | "not_hello" | "duplicate_hello"
  | "unsupported_protocol" | "not_implemented" | "duplicate_request" | "too_many_streams"
  | "stream_exists" | "unknown_stream" | "provider_unavailable" | "conversation_too_large"
  | "bad_tool_schema" | "duplicate_tool" | "unknown_tool" | "unknown_tool_call" | "misplaced_content" | "bad_image"
  | "not_waiting" | "unknown_call" | "call_answered" | "call_forbidden" | "approval_required" | "busy"
  | "resume_failed" | "rate_limited"
  | "unauthorized" | "forbidden" | "bad_name" | "agent_name_taken" | "unknown_agent" | "inbox_full"
  | "too_many_subscriptions" | "message_too_large" | "backplane_unavailable"
  | "provider_error" | "provider_timeout" | "expired" | "shutdown" | "node_lost" | "internal"
  | "connection_lost" | "timeout";
export declare const ERROR_CODES: Readonly<Record<string, ErrorCode>>;

export type EndReason = "complete" | "length" | "cancelled" | "interrupted" | "tool_calls" | "error";
export declare const END_REASONS: Readonly<{
  COMPLETE: "complete"; LENGTH: "length"; CANCELLED: "cancelled"; INTERRUPTED: "interrupted"; TOOL_CALLS: "tool_calls";
  ERROR: "error";
}>;
/** `stream.delta.part` values (absent: answer text). */
export declare const DELTA_PARTS: Readonly<{ REASONING: "reasoning"; TOOL_CALL: "tool_call" }>;
/** What a call of a waiting run waits for. */
export type Wait = "approval" | "client" | "agent";
export declare const WAITS: Readonly<{ APPROVAL: "approval"; CLIENT: "client"; AGENT: "agent" }>;
/** `generate.on_busy`: what a generate does while a stream of its thread has not ended. */
export type OnBusy = "parallel" | "queue" | "interrupt" | "reject";
export declare const ON_BUSY: Readonly<{ PARALLEL: "parallel"; QUEUE: "queue"; INTERRUPT: "interrupt"; REJECT: "reject" }>;

export type ConnectionState = "connecting" | "open" | "reconnecting" | "resumed" | "closed";
export declare const STATES: Readonly<{
  CONNECTING: "connecting"; OPEN: "open"; RECONNECTING: "reconnecting"; RESUMED: "resumed"; CLOSED: "closed";
}>;
export declare const DEFAULTS: Readonly<{
  requestTimeoutMs: number; connectTimeoutMs: number; heartbeatIntervalMs: number; heartbeatTimeoutMs: number;
  ackEvery: number; reconnectBaseMs: number; reconnectCapMs: number; giveUpAfterMs: number | null;
}>;

// ------------------------------------------------------------------ errors

/** Every error the client raises; `code` is stable (the protocol's error code, or connection_lost / timeout). */
export declare class WsServerError extends Error {
  constructor(code: string, message: string, frame?: ServerFrame);
  readonly code: ErrorCode | string;
  /** The server's text (for humans). */
  readonly detail: string;
  readonly frame?: ServerFrame;
  readonly ref?: string;
  readonly stream?: string;
  /** For bad_message: the dotted path of the offending field. */
  readonly field?: string;
  /** For unsupported_protocol. */
  readonly supported?: number[];
  /** For a subscription the server dropped (forbidden after a resume with narrower rights). */
  readonly channel?: string;
}
export declare class RateLimitedError extends WsServerError {
  readonly retryAfterMs?: number;
}
/** The connection closed (for good, or the session was lost) before an answer came. */
export declare class ConnectionLostError extends WsServerError {
  constructor(closeCode: number | null, reason?: string);
  readonly code: "connection_lost";
  readonly closeCode: number | null;
  readonly reason: string;
}
export declare class RequestTimeoutError extends WsServerError {
  readonly code: "timeout";
}
/** A stream ended with reason "error"; `code` is its error code (provider_error, expired…). */
export declare class StreamFailedError extends WsServerError {
  readonly result: StreamResult;
}
export declare function errorFromFrame(frame: ServerFrame): WsServerError;

// ------------------------------------------------------------------ frames

export interface TextPart {
  type: "text";
  text: string;
}
/** An image by http(s) URL or `data:image/…;base64,…` URL. */
export interface ImagePart {
  type: "image";
  url: string;
}
/** The model's reasoning (assistant messages only); `signature` / `redacted` go back as they came. */
export interface ReasoningPart {
  type: "reasoning";
  text?: string;
  signature?: string;
  redacted?: string;
}
export type ContentPart = TextPart | ImagePart | ReasoningPart;
/** A call the model made (in an assistant message), arguments parsed. */
export interface ToolCall {
  id: string;
  name: string;
  arguments: Record<string, unknown>;
}
export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool";
  content: string | ContentPart[];
  /** Assistant messages: the calls the model made. */
  tool_calls?: ToolCall[];
  /** Tool messages: the call this is the result of. */
  tool_call_id?: string;
}
/** A tool the model may call; `parameters` is a JSON Schema of an object. */
export interface Tool {
  name: string;
  description?: string;
  parameters?: Record<string, unknown>;
  /** Agent runs only: route its calls to the session holding this agent name. */
  agent?: string;
  /** Agent runs only: each call waits for `stream.approve()` first. */
  approval?: boolean;
  /** Agent runs only: how long a call waits for its result (default for an agent's tool: 60 s). */
  timeout_ms?: number;
}
export type ToolChoice = "auto" | "none" | "required" | { name: string };
/** Any frame the server sends (unknown fields are kept as they are). */
export interface ServerFrame {
  type: string;
  seq?: number;
  ref?: string;
  [field: string]: unknown;
}
export interface Welcome extends ServerFrame {
  type: "welcome";
  protocol: number;
  session: string;
  resumed: boolean;
  heartbeat_ms: number;
  limits: { max_streams: number; max_message_bytes: number; max_id_length: number; [limit: string]: number };
  server: string;
}
export interface GenerateParams {
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  stop?: string[];
  response_format?:
    | { type: "json_schema"; name: string; schema: Record<string, unknown>; strict?: boolean }
    | { type: "json_object" };
  reasoning?: { effort?: "minimal" | "low" | "medium" | "high"; budget_tokens?: number };
  /** Merged into the upstream request as is. */
  provider_options?: Record<string, unknown>;
  /** simulated provider */
  tokens_per_s?: number;
  ttft_ms?: number;
  reply_tokens?: number;
  [param: string]: unknown;
}

// ------------------------------------------------------------------ events

export type Listener<T extends unknown[]> = (...args: T) => void;

export declare class Emitter<Events extends Record<string, unknown[]> = Record<string, unknown[]>> {
  /** Returns a function that removes the listener. */
  on<E extends keyof Events & string>(event: E, listener: Listener<Events[E]>): () => void;
  once<E extends keyof Events & string>(event: E, listener: Listener<Events[E]>): () => void;
  off<E extends keyof Events & string>(event: E, listener: Listener<Events[E]>): void;
  emit<E extends keyof Events & string>(event: E, ...args: Events[E]): boolean;
  listenerCount(event: keyof Events & string): number;
}

// ------------------------------------------------------------------ timer

export interface Clock {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  now(): number;
}
export declare const defaultClock: Clock;
/** uniform(0, min(capMs, baseMs * 2 ** (tries - 1))): retry 1 is jittered too. */
export declare function fullJitter(options?: { baseMs?: number; capMs?: number; random?: () => number }): (tries: number) => number;
export declare class Timer {
  constructor(callback: () => void, timerCalc: (tries: number) => number, clock?: Clock);
  tries: number;
  readonly scheduled: boolean;
  reset(): void;
  clear(): void;
  /** Returns the delay used. */
  scheduleTimeout(delayMs?: number): number;
}

// ------------------------------------------------------------------ push

export declare class Push {
  constructor(message: { id: string; type: string; [field: string]: unknown }, options?: {
    timeoutMs?: number | null; volatile?: boolean; idempotent?: boolean; clock?: Clock; onTimeout?: (push: Push) => void;
  });
  readonly id: string;
  readonly message: { id: string; type: string; [field: string]: unknown };
  readonly reply: Promise<ServerFrame>;
  readonly settled: boolean;
  readonly resent: boolean;
}

// ------------------------------------------------------------------ streams

export interface Usage {
  inputTokens: number;
  outputTokens: number;
  /** True when the provider reported no count and the server estimated it. */
  estimated: boolean;
}
export interface StreamResult {
  stream: string | null;
  reason: EndReason;
  usage: Usage;
  /** Acceptance to first delta; null if no delta came. */
  ttftMs: number | null;
  durationMs: number;
  text: string;
  /** The reasoning text received. */
  reasoning: string;
  /** The assistant message as it goes back into `messages` (stream.end.message). */
  message: ChatMessage | null;
  /** Its tool calls (reason tool_calls). */
  toolCalls: ToolCall[];
  /** An agent run: everything it added to the conversation (null for a plain stream). */
  messages: ChatMessage[] | null;
  /** An agent run: its steps. */
  steps: number | null;
  error?: { code: string; message: string };
}
export interface Delta {
  text: string;
  /** The delta's index; null for text that came in a snapshot. */
  index: number | null;
}
export interface ToolCallOpened {
  call: string;
  name: string;
  index: number | null;
}
export interface ToolCallFragment {
  call: string;
  /** A fragment of the arguments' JSON text. */
  text: string;
  index: number | null;
}
/** A tool call as far as it has streamed. */
export interface PendingCall {
  id: string;
  name: string;
  /** The arguments' JSON text so far. */
  arguments: string;
}
/** A call an agent run waits on (stream.waiting). */
export interface WaitingCall {
  id: string;
  name: string;
  arguments: Record<string, unknown>;
  /** approval: call stream.approve(); client: stream.toolResult(); agent: the agent `agent` answers. */
  wait: Wait;
  agent: string | null;
}
export interface Waiting {
  calls: WaitingCall[];
  step: number;
}
/** A call of a run got its result (stream.tool_result). */
export interface ToolResultEvent {
  call: string;
  name: string;
  content: string | ContentPart[];
  /** Set when the server made the result: denied, unknown_agent, timeout, backplane_unavailable. */
  error: string | null;
  /** The agent that answered. */
  from: string | null;
}
/** One event of `stream.events()`, in the order they came. */
export type StreamEvent =
  | ({ type: "text" } & Delta)
  | ({ type: "reasoning" } & Delta)
  | ({ type: "tool_call" } & ToolCallOpened)
  | ({ type: "tool_call_delta" } & ToolCallFragment)
  | ({ type: "waiting" } & Waiting)
  | ({ type: "tool_result" } & ToolResultEvent)
  | { type: "step"; step: number };
export type StreamEvents = {
  start: [frame: ServerFrame];
  delta: [delta: Delta];
  reasoning: [delta: Delta];
  tool_call: [call: ToolCallOpened];
  tool_call_delta: [fragment: ToolCallFragment];
  waiting: [waiting: Waiting];
  tool_result: [result: ToolResultEvent];
  step: [step: { step: number }];
  snapshot: [snapshot: { text: string; index: number; reasoning: string; calls: PendingCall[] }];
  end: [result: StreamResult];
  steered: [stream: Stream];
  error: [error: StreamFailedError | ConnectionLostError];
};

/** One generation: an async iterator of text pieces (every iterator starts at the first piece). */
export declare class Stream extends Emitter<StreamEvents> implements AsyncIterable<string> {
  /** The stream id (null until started). */
  readonly id: string | null;
  /** The id of the request that started it (null for a stream adopted after a snapshot resume). */
  readonly ref: string | null;
  readonly provider: string | null;
  readonly model: string | null;
  readonly steeredFrom: string | null;
  /** Everything received so far. */
  readonly text: string;
  /** The reasoning text received so far. */
  readonly reasoning: string;
  /** Tool calls as far as they have streamed, by call id. */
  readonly calls: Map<string, PendingCall>;
  /** The index the next delta-like frame must carry. */
  readonly nextIndex: number;
  readonly result: StreamResult | null;
  /** The assistant message to put back into `messages` (null until ended). */
  readonly message: ChatMessage | null;
  /** The calls the model made, arguments parsed ([] until ended). */
  readonly toolCalls: ToolCall[];
  /** An agent run: what it added to the conversation (null until ended). */
  readonly messages: ChatMessage[] | null;
  /** An agent run: the step it is at. */
  readonly step: number;
  /** An agent run: the calls it waits on, by id. */
  readonly waiting: Map<string, WaitingCall>;
  readonly thread: string | null;
  /** Queued (onBusy "queue"): the stream of its thread it starts after. */
  readonly queuedAfter: string | null;
  /** Resolves when the run waits on calls that need this client (an approval, a result no handler gives), with every call it waits on; [] once ended. */
  waitForTools(): Promise<WaitingCall[]>;
  /** Send the result of a call of this run (a string, parts, or anything JSON). */
  toolResult(call: string, content: unknown, options?: { timeoutMs?: number }): Promise<void>;
  /** Approve (or deny, with a reason for the model) a call that waits for an approval. */
  approve(call: string, approved?: boolean, options?: { reason?: string; timeoutMs?: number }): Promise<void>;
  readonly failure: StreamFailedError | ConnectionLostError | null;
  readonly done: boolean;
  /** Resolves with the result; rejects with StreamFailedError or ConnectionLostError. */
  readonly finished: Promise<StreamResult>;
  wait(): Promise<StreamResult>;
  /** Every delta, those that came before the call included. */
  onDelta(listener: (delta: Delta) => void): () => void;
  /** Stop the generation; resolves with the result (a no-op once ended). */
  cancel(options?: { timeoutMs?: number }): Promise<StreamResult | null>;
  /** Steer: stop here and continue with `input` in a new stream (returned); without input only stop. */
  interrupt(input: string, options?: { newStream?: string; timeoutMs?: number }): Promise<Stream>;
  interrupt(input?: undefined, options?: { timeoutMs?: number }): Promise<null>;
  /** Every event (text, reasoning, tool calls, argument fragments) from the first on. */
  events(): AsyncIterableIterator<StreamEvent>;
  /** The answer text, piece by piece. */
  [Symbol.asyncIterator](): AsyncIterator<string>;
}

// ------------------------------------------------------------------ channels

export interface ChannelMessage<T = unknown> {
  channel: string;
  offset: number;
  /** The sender's agent name (or public id). */
  from: string;
  data: T;
}
export interface PresenceEvent {
  channel: string;
  offset: number;
  joined?: string;
  left?: string;
  members: string[];
}
export type ChannelEvents = {
  message: [message: ChannelMessage];
  presence: [event: PresenceEvent];
  subscribed: [info: { channel: string; epoch: string | null; offset: number; recovered: boolean; members: string[] }];
  gap: [info: { since?: number | null; epoch?: string | null; offset?: number; from?: number; to?: number }];
  stream: [stream: RemoteStream];
  error: [error: WsServerError];
  closed: [error: WsServerError | null];
};

export declare class Channel extends Emitter<ChannelEvents> implements AsyncIterable<ChannelMessage> {
  readonly name: string;
  readonly epoch: string | null;
  /** The last offset delivered. */
  readonly offset: number | null;
  readonly members: Set<string>;
  readonly recovered: boolean | null;
  readonly subscribed: boolean;
  readonly closed: boolean;
  /** Frames dropped because they had been delivered before. */
  readonly duplicates: number;
  /** Generations published here that are still running. */
  readonly streams: RemoteStream[];
  /** Messages that came before the first consumer are delivered to it first. */
  onMessage(listener: (message: ChannelMessage) => void): () => void;
  onPresence(listener: (event: PresenceEvent) => void): () => void;
  /** Resolves with the message's offset. */
  publish(data: unknown, options?: { timeoutMs?: number }): Promise<number>;
  unsubscribe(options?: { timeoutMs?: number }): Promise<void>;
  [Symbol.asyncIterator](): AsyncIterator<ChannelMessage>;
}

/** A generation that an agent publishes to a channel (`generate({channel})`). */
export declare class RemoteStream extends Emitter<{
  start: [data: unknown];
  delta: [delta: Delta];
  reasoning: [delta: Delta];
  tool_call: [call: ToolCallOpened];
  tool_call_delta: [fragment: ToolCallFragment];
  end: [data: Record<string, unknown>];
}> {
  readonly channel: string;
  readonly from: string;
  readonly id: string;
  readonly provider: string | null;
  readonly model: string | null;
  readonly steeredFrom: string | null;
  readonly text: string;
  readonly reasoning: string;
  readonly calls: Map<string, PendingCall>;
  /** The stream.end data (wire names: reason, usage.output_tokens…). */
  readonly result: Record<string, unknown> | null;
  readonly done: boolean;
}

// ------------------------------------------------------------------ client

export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol?: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[], options?: unknown) => WebSocketLike;

/** The HTTP transport with a WebSocket's face (what the Client uses for transport "sse"). */
export declare class SseSocket implements WebSocketLike {
  constructor(url: string, protocols?: string | string[], options?: { fetch?: typeof fetch; headers?: Record<string, string> });
  readonly url: string;
  readonly readyState: number;
  readonly protocol: string;
  /** The server's connection token (from the stream's first event). */
  readonly connection: string | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  terminate(): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

/** Splits a text stream into SSE events. */
export declare class SseParser {
  constructor(onEvent: (event: { event: string; data: string; id: string | null }) => void);
  feed(text: string): void;
}

/** `ws://h:p/path?q` -> {base: "http://h:p", query: "q"}. */
export declare function httpEndpoint(url: string): { base: string; query: string };

/**
 * "auto" (default): a WebSocket, and the HTTP transport (GET /v1/events + POST
 * /v1/send) by itself when a WebSocket cannot open (or there is no WebSocket
 * implementation); "websocket" or "sse" force one.
 */
export type Transport = "auto" | "websocket" | "sse";

export interface ClientOptions {
  /** Default "auto". */
  transport?: Transport;
  /** The HTTP transport's fetch (default globalThis.fetch). */
  fetch?: typeof fetch;
  /** Headers for the HTTP transport's requests (e.g. Authorization). */
  httpHeaders?: Record<string, string>;
  /** Default: globalThis.WebSocket. In Node before 22: the `ws` package's WebSocket. */
  WebSocket?: WebSocketConstructor;
  /** Third constructor argument for the `ws` package (headers, agent…). */
  webSocketOptions?: unknown;
  /** hello.agent: this connection's agent name. */
  agent?: string;
  /** hello.token */
  token?: string;
  /** More fields for hello. */
  hello?: Record<string, unknown>;
  /** Resume this session (e.g. kept in sessionStorage) … */
  session?: string | null;
  /** … from this seq. */
  lastSeq?: number;
  /** Ask the first hello for snapshots of running streams instead of the history (a reloaded page). */
  snapshot?: boolean;
  /** Default 30000. */
  requestTimeoutMs?: number;
  /** Socket open + welcome, default 10000. */
  connectTimeoutMs?: number;
  /** Application-level ping interval (0: none), default 15000. */
  heartbeatIntervalMs?: number;
  /** No pong within this: the connection is dead, reconnect. Default 10000. */
  heartbeatTimeoutMs?: number;
  /** Ack every N sequenced frames (0: never), default 256. */
  ackEvery?: number;
  /** Reconnect after a loss (default true). */
  reconnect?: boolean;
  /** `(tries) => ms`; default fullJitter({baseMs: reconnectBaseMs, capMs: reconnectCapMs}). */
  reconnectAfterMs?: (tries: number) => number;
  reconnectBaseMs?: number;
  reconnectCapMs?: number;
  /** Close after reconnecting this long (default null: never give up). */
  giveUpAfterMs?: number | null;
  /** Random source for the jitter. */
  random?: () => number;
  /** Timers and time (tests). */
  clock?: Clock;
  /** Prefix of request ids (default: random, so a reloaded page never reuses an id of its session). */
  idPrefix?: string;
}

export interface GenerateOptions {
  stream?: string;
  provider?: string;
  model?: string;
  params?: GenerateParams;
  /** Also publish the stream to this channel. */
  channel?: string;
  /** Tools the model may call. */
  tools?: Tool[];
  toolChoice?: ToolChoice;
  /** An agent run of up to this many model steps (default 1: a plain stream). */
  maxSteps?: number;
  /** The thread this stream belongs to. */
  thread?: string;
  /** With thread: what happens while a stream of it has not ended (default "parallel"). */
  onBusy?: OnBusy;
  /** The request id (default: generated). */
  id?: string;
  timeoutMs?: number;
  /** Aborting cancels the stream. */
  signal?: AbortSignal;
}

export interface SubscribeOptions {
  /** The last offset already had (messages after it are recovered). */
  since?: number;
  epoch?: string;
  onMessage?: (message: ChannelMessage) => void;
  onPresence?: (event: PresenceEvent) => void;
  /** Messages kept for the first consumer (default 1000). */
  maxBacklog?: number;
  timeoutMs?: number;
}

export interface DirectMessage<T = unknown> {
  from: string;
  data: T;
  seq: number;
}

export type StateDetail = {
  resumed?: boolean;
  session?: string | null;
  code?: number | null;
  reason?: string;
  error?: WsServerError;
};

export type ClientEvents = {
  state: [state: ConnectionState, detail: StateDetail];
  connecting: [detail: StateDetail];
  open: [detail: StateDetail];
  reconnecting: [detail: StateDetail];
  resumed: [detail: StateDetail];
  closed: [detail: StateDetail];
  welcome: [frame: Welcome];
  retry: [info: { attempt: number; delayMs: number; code: number; reason: string }];
  resumeFailed: [error: WsServerError];
  sessionLost: [error: ConnectionLostError];
  heartbeat: [info: { rttMs: number }];
  heartbeatTimeout: [info: { timeoutMs: number }];
  shutdown: [frame: ServerFrame];
  /** A stream this client did not start: adopted from a snapshot or a replay. */
  stream: [stream: Stream];
  /** A direct message. */
  message: [message: DirectMessage];
  /** A call routed to this client's agent that no registered handler answers: answer with toolResult(call, …). */
  tool_call: [request: ToolCallRequest];
  /** Every frame after the welcome, duplicates excluded. */
  frame: [frame: ServerFrame];
  /** An error that answers no request of this client. */
  error: [error: WsServerError];
  /** With transport "auto": the transport the next connection attempt uses. */
  transport: [transport: "websocket" | "sse"];
};

/** A call another session's run routed to this client's agent. */
export interface ToolCallRequest {
  call: string;
  name: string;
  arguments: Record<string, unknown>;
  /** The requesting session's agent name (or public id). */
  from: string;
}
/** A tool handler: the call's arguments in, its result (or a promise of it) out. */
export type ToolHandler = (args: Record<string, unknown>) => unknown;
/** Tool handlers: they answer a run's calls that wait for the client, and calls routed to the client's agent, once each. */
export declare class Tools {
  register(name: string, handler: ToolHandler): ToolHandler;
  unregister(name: string): void;
  handles(name: string): boolean;
}
/** A result as tool_result content: a string or parts as they are, anything else as JSON text. */
export declare function contentOf(result: unknown): string | ContentPart[];

export declare class Client extends Emitter<ClientEvents> {
  constructor(url: string, options?: ClientOptions);
  static connect(url: string, options?: ClientOptions): Promise<Client>;
  readonly url: string;
  /** The transport in use. */
  readonly transport: "websocket" | "sse";
  readonly state: ConnectionState;
  readonly connected: boolean;
  /** The session id (keep it to resume). */
  readonly session: string | null;
  /** Highest seq processed (what a resume sends as last_seq). */
  readonly lastSeq: number;
  readonly welcome: Welcome | null;
  readonly agent: string | null;
  readonly rttMs: number | null;
  readonly closeError: WsServerError | null;
  readonly stats: { reconnects: number; resent: number; duplicateFrames: number; duplicateRequests: number };
  readonly streams: Stream[];
  readonly channels: Map<string, Channel>;
  /** Tool handlers (agent runs). */
  readonly tools: Tools;
  /** Resolves at the first welcome; rejects if the client closes before one. */
  connect(): Promise<Client>;
  /** Close for good; resolves once the socket has closed. */
  close(code?: number, reason?: string): Promise<void>;
  /** Drop the connection and reconnect (resume) at once. */
  reconnectNow(): void;
  /** Send a request (an id is added) and resolve with its reply frame. */
  request(message: { type: string; [field: string]: unknown }, options?: { timeoutMs?: number }): Promise<ServerFrame>;
  /** Round trip in ms. */
  ping(options?: { timeoutMs?: number }): Promise<number>;
  /** Resolves with the Stream once the server accepted it. A string is one user message. */
  generate(messages: string | ChatMessage[], options?: GenerateOptions): Promise<Stream>;
  subscribe(channel: string, options?: SubscribeOptions): Promise<Channel>;
  /** Resolves with the message's offset. */
  publish(channel: string, data: unknown, options?: { timeoutMs?: number }): Promise<number>;
  /** A direct message to an agent. */
  send(to: string, data: unknown, options?: { timeoutMs?: number }): Promise<void>;
  onMessage(listener: (message: DirectMessage) => void): () => void;
  /** The result of a call: of this session's run (`stream`), or of a call routed to this client's agent. */
  toolResult(call: string, content: unknown, options?: { stream?: string; timeoutMs?: number }): Promise<void>;
  /** Send a frame as is (tests and tools). */
  sendRaw(data: string | object): void;
}

export declare function connect(url: string, options?: ClientOptions): Promise<Client>;
