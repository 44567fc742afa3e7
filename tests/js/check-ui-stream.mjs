// Reads a UI message stream (the SSE body a gateway answered) on stdin; checks every chunk against
// the `ai` package's own schema and rebuilds the message with its readUIMessageStream.
// Prints {"chunks": [...], "message": <the final UIMessage>} as JSON; exits 1 on any invalid chunk.
import { asSchema, readUIMessageStream, uiMessageChunkSchema } from "ai";

const body = await new Promise((resolve) => {
  let text = "";
  process.stdin.setEncoding("utf8");
  process.stdin.on("data", (part) => (text += part));
  process.stdin.on("end", () => resolve(text));
});

const chunks = [];
let done = false;
for (const frame of body.split("\n\n")) {
  const data = frame
    .split("\n")
    .filter((line) => line.startsWith("data: "))
    .map((line) => line.slice("data: ".length));
  if (data.length === 0) continue;
  if (done) throw new Error(`data after [DONE]: ${data}`);
  if (data[0] === "[DONE]") {
    done = true;
    continue;
  }
  chunks.push(JSON.parse(data.join("\n")));
}

const schema = asSchema(uiMessageChunkSchema);
for (const chunk of chunks) {
  const checked = await schema.validate(chunk);
  if (!checked.success) {
    console.error(`invalid chunk ${JSON.stringify(chunk)}: ${checked.error}`);
    process.exit(1);
  }
}

const stream = new ReadableStream({
  start(controller) {
    for (const chunk of chunks) controller.enqueue(chunk);
    controller.close();
  },
});
let message = null;
try {
  for await (const snapshot of readUIMessageStream({ stream, terminateOnError: true })) message = snapshot;
} catch (error) {
  // An `error` chunk ends the message with its text: reported, not a failure of the stream.
  message = { error: String(error?.message ?? error), ...(message ?? {}) };
}
console.log(JSON.stringify({ chunks, done, message }));
