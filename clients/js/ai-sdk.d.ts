// Types of `wsserver-client/ai-sdk` (src/ai-sdk.js). The chunk and transport
// types are the `ai` package's own: install `ai` to use them.
import type { ChatTransport, UIMessage, UIMessageChunk } from "ai";
import type { Client, ClientOptions, GenerateParams } from "./index.js";

export interface WsServerChatTransportOptions {
  /** A wsserver Client (connected on first use if it is not)… */
  client?: Client;
  /** …or the server's URL, for a Client made by the transport. */
  url?: string;
  clientOptions?: ClientOptions;
  provider?: string;
  model?: string;
  params?: GenerateParams;
  /** Last word on the generate request: gets the wire messages, returns `{messages?, ...generate options}`. */
  prepareGenerate?: (
    messages: Record<string, unknown>[],
    options: { chatId: string; body?: object },
  ) => ({ messages?: Record<string, unknown>[] } & Record<string, unknown>) | undefined;
}

export declare class WsServerChatTransport<UI_MESSAGE extends UIMessage = UIMessage> implements ChatTransport<UI_MESSAGE> {
  constructor(options: WsServerChatTransportOptions);
  readonly client: Client;
  /** true: reconnectToStream gives a running stream from its beginning. */
  readonly resumeStreamIsReplay: boolean;
  sendMessages: ChatTransport<UI_MESSAGE>["sendMessages"];
  reconnectToStream: ChatTransport<UI_MESSAGE>["reconnectToStream"];
}

/** UI messages -> the generate request's messages (DESIGN v2 vocabulary). */
export declare function toWireMessages(messages: UIMessage[]): Record<string, unknown>[];

/** One stream's frames -> UI message chunks. */
export declare class FrameMapper {
  constructor(options?: {
    messageId?: string;
    /** Whether a call an agent run waits on needs the page (default: approvals and the client's results). */
    needsPage?: (call: { id: string; name: string; wait: "approval" | "client" | "agent"; agent?: string }) => boolean;
  });
  readonly done: boolean;
  /** The last push ended the response for the page to answer the run (the run goes on after). */
  readonly paused: boolean;
  /** An agent run that waits: call id -> what it waits for. */
  readonly waiting: Map<string, "approval" | "client" | "agent">;
  push(frame: Record<string, unknown>): UIMessageChunk[];
}

/** What the last UI message answers of a run that waits: `tool_result` and `approve` requests (without `stream`). */
export declare function answersFor(
  messages: UIMessage[],
  waiting: Map<string, string>,
): ({ type: "tool_result"; call: string; content: string } | { type: "approve"; call: string; approved: boolean; reason?: string })[];
