// Types of /static/ai-sdk.js: jobstream's ChatTransport for the AI SDK's useChat.
import type { ChatTransport, UIMessage, UIMessageChunk } from "ai";

export interface JobstreamChatTransportOptions {
  /** The app's chat endpoint (it holds the API key): POST {api}, GET {api}/{chatId}/job, POST {api}/{chatId}/cancel. */
  api: string;
  /** Where the gateway answers (default: the page's origin). */
  gateway?: string;
  /** Headers for the app's endpoint (not sent to the gateway, which gets the job's read token). */
  headers?: HeadersInit | (() => HeadersInit | Promise<HeadersInit>);
  /** A fetch of your own (default: the global one). */
  fetch?: typeof fetch;
}

export declare class JobstreamChatTransport<UI_MESSAGE extends UIMessage = UIMessage>
  implements ChatTransport<UI_MESSAGE>
{
  constructor(options: JobstreamChatTransportOptions);
  readonly api: string;
  readonly gateway: string;
  /** A resumed reply is streamed from its start, and replaces what the page had of it. */
  readonly resumeStreamIsReplay: true;
  sendMessages(
    options: Parameters<ChatTransport<UI_MESSAGE>["sendMessages"]>[0],
  ): Promise<ReadableStream<UIMessageChunk>>;
  reconnectToStream(
    options: Parameters<ChatTransport<UI_MESSAGE>["reconnectToStream"]>[0],
  ): Promise<ReadableStream<UIMessageChunk> | null>;
}
