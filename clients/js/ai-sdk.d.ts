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
  constructor(options?: { messageId?: string });
  readonly done: boolean;
  push(frame: Record<string, unknown>): UIMessageChunk[];
}
