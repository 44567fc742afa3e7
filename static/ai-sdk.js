// jobstream's ChatTransport for the AI SDK's `useChat`: replies are jobstream jobs, so they run
// on when the page goes away, resume after a reload, and stop (the job is cancelled) on stop().
// An ES module with no dependencies, for browsers and Node 18+; it reads with `fetch`.
//
//   import { JobstreamChatTransport } from "/static/ai-sdk.js";
//   const { messages, sendMessage, stop } = useChat({
//     id: chatId, resume: true, transport: new JobstreamChatTransport({ api: "/api/chat" }),
//   });
//
// The app's own endpoint `api` holds the API key (the browser never does):
//   POST {api}                   {id: chatId, messages, trigger, messageId} -> jobstream's create answer
//   GET  {api}/{chatId}/job      -> {id, token, links} of the chat's latest job, or 204
//   POST {api}/{chatId}/cancel   -> cancels the chat's latest job
// The reply is read from the gateway (`gateway`, default: the page's origin) with the job's read
// token, as `GET /v1/jobs/{id}/events?format=ui-message-stream`.

const ENDED = new Set(["completed", "failed", "cancelled"]);
// A lost connection is read again after these waits (ms), then the stream fails.
const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000, 8000, 8000];

export class JobstreamChatTransport {
  /**
   * @param {{api: string, gateway?: string, headers?: HeadersInit | (() => HeadersInit | Promise<HeadersInit>),
   *          fetch?: typeof fetch}} options
   */
  constructor({ api, gateway, headers, fetch: fetchImpl } = {}) {
    if (!api) throw new TypeError("JobstreamChatTransport needs `api`: the app's chat endpoint");
    this.api = api.replace(/\/+$/, "");
    const origin = typeof location !== "undefined" ? location.origin : "";
    this.gateway = (gateway ?? origin).replace(/\/+$/, "");
    this.headers = headers;
    this.fetch = fetchImpl ?? ((...args) => globalThis.fetch(...args));
    // A resumed stream is the reply from its start: the AI SDK rebuilds the message from it.
    this.resumeStreamIsReplay = true;
  }

  async sendMessages({ chatId, messages, abortSignal, trigger, messageId, headers, body }) {
    // Not aborted by stop(): the app may have started the job already, and only once it has
    // answered can the job be cancelled (the stream below does so when stop() came first).
    const response = await this.fetch(this.api, {
      method: "POST",
      headers: await this.#headers(headers, { "Content-Type": "application/json" }),
      body: JSON.stringify({ ...body, id: chatId, messages, trigger, messageId }),
    });
    if (!response.ok) throw new Error(await failure(response, "could not start the reply"));
    const job = await response.json();
    return this.#follow(chatId, job, abortSignal, headers);
  }

  async reconnectToStream({ chatId, abortSignal, headers }) {
    const response = await this.fetch(`${this.api}/${encodeURIComponent(chatId)}/job`, {
      headers: await this.#headers(headers),
      signal: abortSignal,
    });
    if (response.status === 204) return null;
    if (!response.ok) throw new Error(await failure(response, "could not find the chat's reply"));
    const job = await response.json();
    const status = await this.#status(job, abortSignal);
    // Only a reply still being written is resumed; an ended one is in the app's messages already.
    if (status === null || ENDED.has(status)) return null;
    return this.#follow(chatId, job, abortSignal, headers);
  }

  async #status(job, signal) {
    const response = await this.fetch(`${this.gateway}/v1/jobs/${encodeURIComponent(job.id)}`, {
      headers: { Authorization: `Bearer ${job.token}` },
      signal,
    });
    if (response.status === 404) return null;
    if (!response.ok) throw new Error(await failure(response, "could not read the reply's status"));
    return (await response.json()).status;
  }

  async #headers(extra, base = {}) {
    const merged = new Headers(base);
    for (const source of [await resolve(this.headers), await resolve(extra)]) {
      if (source) new Headers(source).forEach((value, name) => merged.set(name, value));
    }
    return merged;
  }

  // The job's reply as a stream of UI message chunks. A dropped connection is read again from
  // the start (the rendering of a job's events is the same every time) and what was already
  // handed on is skipped, so the reader sees each chunk once. stop() cancels the job.
  #follow(chatId, job, abortSignal, headers) {
    const url = `${this.gateway}/v1/jobs/${encodeURIComponent(job.id)}/events?format=ui-message-stream`;
    const transport = this;
    let forwarded = 0;
    let stopped = false;
    let connection = null;

    const cancelJob = async () => {
      try {
        await transport.fetch(`${transport.api}/${encodeURIComponent(chatId)}/cancel`, {
          method: "POST",
          headers: await transport.#headers(headers),
          keepalive: true,
        });
      } catch {
        // The page may be going away; the job then runs to its end.
      }
    };

    return new ReadableStream({
      start(controller) {
        const finish = (chunk) => {
          if (stopped) return;
          stopped = true;
          connection?.abort();
          try {
            if (chunk) controller.enqueue(chunk);
            controller.close();
          } catch {
            // the reader is gone
          }
        };
        if (abortSignal) {
          const onAbort = () => {
            cancelJob();
            finish({ type: "abort" });
          };
          if (abortSignal.aborted) return onAbort();
          abortSignal.addEventListener("abort", onAbort, { once: true });
        }
        (async () => {
          for (let attempt = 0; !stopped; attempt += 1) {
            connection = new AbortController();
            let seen = 0;
            try {
              const response = await transport.fetch(url, {
                headers: { Accept: "text/event-stream", Authorization: `Bearer ${job.token}` },
                signal: connection.signal,
              });
              if (response.status === 204) return finish();
              if (!response.ok && response.status !== 429 && response.status < 500) {
                throw Object.assign(new Error(await failure(response, "could not read the reply")), { final: true });
              }
              if (response.ok) {
                for await (const data of eventData(response.body)) {
                  if (stopped) return;
                  if (data === "[DONE]") return finish();
                  seen += 1;
                  if (seen <= forwarded) continue; // handed on before the connection dropped
                  controller.enqueue(JSON.parse(data));
                  forwarded += 1;
                  attempt = 0;
                }
              }
            } catch (error) {
              if (stopped) return;
              if (error?.final) {
                stopped = true;
                return controller.error(error);
              }
            }
            if (attempt >= BACKOFF_MS.length) {
              stopped = true;
              return controller.error(new Error("lost the reply's stream"));
            }
            await new Promise((resolve) => setTimeout(resolve, BACKOFF_MS[attempt]));
          }
        })();
      },
      cancel() {
        stopped = true;
        connection?.abort();
      },
    });
  }
}

async function resolve(value) {
  return typeof value === "function" ? await value() : value;
}

async function failure(response, what) {
  let detail = "";
  try {
    const text = await response.text();
    try {
      detail = JSON.parse(text).detail ?? text;
    } catch {
      detail = text;
    }
  } catch {
    // no body
  }
  return `${what}: ${response.status}${detail ? ` ${detail}` : ""}`;
}

// The data of each event of a text/event-stream body, as the events arrive.
async function* eventData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
        if (data.length) yield data.join("\n");
      }
    }
  } finally {
    reader.releaseLock?.();
  }
}
