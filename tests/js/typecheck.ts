// Compiled (never run) by tests/test_ai_sdk_types.py: /static/ai-sdk.d.ts against the real `ai`
// package's types, used as an app would.
import { Chat } from "@ai-sdk/react";
import type { ChatTransport, UIMessage } from "ai";
import { JobstreamChatTransport } from "../../static/ai-sdk.js";

const transport = new JobstreamChatTransport({
  api: "/api/chat",
  gateway: "https://jobs.example.com",
  headers: async () => ({ "X-App": "1" }),
  fetch,
});
const asTransport: ChatTransport<UIMessage> = transport;
const replay: true = transport.resumeStreamIsReplay;
export const chat = new Chat({ id: "c1", transport: asTransport });
export { replay };

// @ts-expect-error `api` is required
new JobstreamChatTransport({ gateway: "https://jobs.example.com" });
