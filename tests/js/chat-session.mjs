// One chat session with the real AI SDK `Chat` (@ai-sdk/react) over jobstream's transport, in
// Node: `node chat-session.mjs <scenario> <api> <gateway> <chatId> <text>`. Prints the chat's
// messages (and what the scenario saw) as JSON. Scenarios:
//   send    send <text> and wait for the reply
//   stop    send <text>, stop() once some of the reply has come
//   resume  resume the chat's reply in progress (a new page would)
//   drop    send <text>, with the reply's first connection cut after its first chunks
//   drop-late  the same, read again only 4 s later (by when a job's oldest events may be trimmed)
import { Chat } from "@ai-sdk/react";
import { JobstreamChatTransport } from "../../static/ai-sdk.js";

const [scenario, api, gateway, chatId, text] = process.argv.slice(2);

let cut = false;
const cutting = async (url, init) => {
  if (cut && scenario === "drop-late") return late(url, init);
  const response = await fetch(url, init);
  if (!scenario.startsWith("drop") || !String(url).includes("format=ui-message-stream")) return response;
  if (cut) return response;
  cut = true;
  // Hand on the first 3 events, then fail as a dropped connection does.
  const reader = response.body.getReader();
  let events = 0;
  const body = new ReadableStream({
    async pull(controller) {
      const { value, done } = await reader.read();
      if (done) return controller.close();
      controller.enqueue(value);
      events += new TextDecoder().decode(value).split("\n\n").length - 1;
      if (events >= 3) {
        reader.cancel();
        controller.error(new TypeError("network connection lost"));
      }
    },
  });
  return new Response(body, { status: response.status, headers: response.headers });
};

const late = async (url, init) => {
  if (!init.headers["Last-Event-ID"]) await new Promise((resolve) => setTimeout(resolve, 4000));
  return fetch(url, init);
};
const transport = new JobstreamChatTransport({ api, gateway, fetch: cutting });
let finished = null;
const chat = new Chat({
  id: chatId,
  transport,
  onFinish: ({ isAbort, isError, isDisconnect, finishReason }) => (finished = { isAbort, isError, isDisconnect, finishReason }),
});
const replyText = () =>
  chat.messages
    .filter((message) => message.role === "assistant")
    .map((message) => message.parts.filter((part) => part.type === "text").map((part) => part.text).join(""))
    .join("|");

if (scenario === "resume") {
  await chat.resumeStream();
} else if (scenario === "stop") {
  const sending = chat.sendMessage({ text });
  const deadline = Date.now() + 20000;
  while (!replyText() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
  await chat.stop();
  await sending;
} else {
  await chat.sendMessage({ text });
}
console.log(JSON.stringify({ status: chat.status, error: chat.error?.message ?? null, reply: replyText(), finished, messages: chat.messages }));
