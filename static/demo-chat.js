// The demo page's chat: /static/ai-sdk.js's JobstreamChatTransport (the AI SDK's useChat
// transport) without a framework. The page keeps the messages (in sessionStorage, so a reload
// continues the chat), sends them with sendMessages and renders the UI message chunks itself.
// Its app side is the gateway's /dev/chat, which only `jobstream dev` serves.
import { JobstreamChatTransport } from "/static/ai-sdk.js";
import { $, apiKey, readJson } from "/static/demo-shared.js";

const STATE_KEY = "jobstream-demo:chat";

let transport = null;
let state = null; // {chatId, messages: [UI message, with `status`, `error` for the page]}
let reading = null; // the AbortController of the reply being read: abort() is Stop

/** Wire the chat's form and buttons; under `jobstream dev` (`dev`), resume a reply left running. */
export function setUpChat({ dev }) {
  transport = new JobstreamChatTransport({
    api: "/dev/chat",
    headers: () => ({ Authorization: `Bearer ${apiKey()}` }),
  });
  state = readJson(sessionStorage, STATE_KEY, null) ?? fresh();
  $("chat-form").addEventListener("submit", send);
  $("chat-stop").addEventListener("click", () => reading?.abort());
  $("chat-new").addEventListener("click", () => {
    reading?.abort();
    state = fresh();
    save();
    render();
  });
  render();
  if (!dev) return disable("The chat's app routes (/dev/chat) come with `jobstream dev`.");
  const last = state.messages.at(-1);
  if (last?.role === "assistant" && last.status === "streaming") resume(last);
}

function fresh() {
  return { chatId: randomId(), messages: [] };
}

function randomId() {
  const digits = "abcdefghijklmnopqrstuvwxyz0123456789";
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (byte) => digits[byte % digits.length]).join("");
}

function textOf(message) {
  return message.parts.map((part) => (part.type === "text" ? part.text : "")).join("");
}

// ---- sending and reading

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || reading) return;
  $("chat-input").value = "";
  note("");
  state.messages.push({ id: randomId(), role: "user", parts: [{ type: "text", text }] });
  const reply = { id: randomId(), role: "assistant", parts: [{ type: "text", text: "" }], status: "streaming" };
  const sent = state.messages.map(({ id, role, parts }) => ({ id, role, parts }));
  state.messages.push(reply);
  save();
  render();
  await read(reply, false, (abortSignal) =>
    transport.sendMessages({ chatId: state.chatId, messages: sent, abortSignal, trigger: "submit-message" }),
  );
}

/** The reply the page was reading when it went away, read again from its start. */
async function resume(reply) {
  await read(reply, true, (abortSignal) => transport.reconnectToStream({ chatId: state.chatId, abortSignal }));
}

async function read(reply, replay, open) {
  reading = new AbortController();
  setBusy(true);
  try {
    const stream = await open(reading.signal);
    if (stream === null) {
      // Nothing running to resume: the reply ended while the page was away.
      reply.status = "ended";
      reply.error = reply.error ?? "The reply ended while this page was away.";
    } else {
      const reader = stream.getReader();
      for (let chunk; !(chunk = await reader.read()).done; ) {
        apply(reply, chunk.value, replay);
        save();
        renderMessage(reply);
      }
      if (reply.status === "streaming") reply.status = "ended";
    }
  } catch (error) {
    reply.status = "ended";
    reply.error = error.message;
  } finally {
    reading = null;
    save();
    render();
    setBusy(false);
  }
}

/** One UI message chunk applied to the reply on the page. */
function apply(reply, chunk, replay) {
  switch (chunk.type) {
    case "start":
      if (replay) reply.parts = [{ type: "text", text: "" }]; // a resumed reply comes again from its start
      break;
    case "text-delta":
      reply.parts[0].text += chunk.delta;
      break;
    case "error":
      reply.error = chunk.errorText;
      break;
    case "abort":
      reply.status = "stopped";
      break;
    case "finish":
      if (reply.status === "streaming") reply.status = "ended";
      break;
    default:
      break; // text-start, text-end, data-*: nothing to show
  }
}

// ---- rendering

function save() {
  sessionStorage.setItem(STATE_KEY, JSON.stringify(state));
}

function note(text) {
  $("chat-note").textContent = text || "";
  $("chat-note").hidden = !text;
}

function disable(text) {
  note(text);
  for (const id of ["chat-input", "chat-send", "chat-stop", "chat-new"]) $(id).disabled = true;
}

function setBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

function render() {
  $("chat-log").replaceChildren(...state.messages.map(messageRow));
  $("chat-id").textContent = state.chatId;
}

function renderMessage(message) {
  const existing = $("chat-log").querySelector(`li[data-message="${message.id}"]`);
  if (existing) existing.replaceWith(messageRow(message));
  else $("chat-log").append(messageRow(message));
}

function messageRow(message) {
  const row = document.createElement("li");
  row.className = "chat-message";
  row.dataset.message = message.id;
  row.dataset.role = message.role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = message.role === "user" ? "You" : "Reply";
  const text = document.createElement("div");
  text.className = "chat-text";
  text.classList.toggle("streaming", message.status === "streaming");
  text.textContent = textOf(message);
  row.append(who, text);
  const after = message.error ?? (message.status === "stopped" ? "stopped" : null);
  if (after) {
    const end = document.createElement("p");
    end.className = message.error ? "chat-end failure" : "chat-end";
    end.textContent = after;
    row.append(end);
  }
  return row;
}
