// The demo page: start demo.story jobs and follow them with jobstream.js.
import { followJob, forgetJob } from "/static/jobstream.js";

const $ = (id) => document.getElementById(id);
const RECENT_KEY = "jobstream-demo:recent";
const VIEW_PREFIX = "jobstream-demo:view:";
const KEY_KEY = "jobstream-demo:api-key";
const MAX_RECENT = 10;
const CUT_MS = 2000;

let job = null; // the job on screen: {id, token, links}
let follow = null;
let view = null; // what the page shows of it, kept in sessionStorage so a reload continues it
let cutTimer = null;

// ---- storage

function readJson(storage, key, fallback) {
  try {
    return JSON.parse(storage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

function recentJobs() {
  return readJson(localStorage, RECENT_KEY, []);
}

function remember(entry) {
  const others = recentJobs().filter((item) => item.id !== entry.id);
  localStorage.setItem(RECENT_KEY, JSON.stringify([entry, ...others].slice(0, MAX_RECENT)));
  renderRecent();
}

function saveView() {
  if (job && view) sessionStorage.setItem(VIEW_PREFIX + job.id, JSON.stringify(view));
}

function emptyView() {
  return { text: "", status: "pending", percent: 0, progressText: "", events: 0, error: null };
}

// ---- rendering

function render() {
  $("text").textContent = view.text;
  setStatus(view.status);
  $("progress").value = view.percent;
  $("progress-text").textContent = view.progressText;
  $("event-count").textContent = String(view.events);
  $("job-id").textContent = job ? job.id : "–";
  showMessage(view.error);
}

function setStatus(status) {
  $("status").textContent = status;
  $("status").dataset.status = status;
}

function showMessage(text) {
  $("message").textContent = text || "";
  $("message").hidden = !text;
}

function setFollowing(active) {
  $("text").classList.toggle("streaming", active);
  $("cut").disabled = !active;
  $("cancel").disabled = !job || ["completed", "failed", "cancelled"].includes(view.status);
}

function renderRecent() {
  const list = $("recent");
  list.replaceChildren();
  const jobs = recentJobs();
  $("recent-empty").hidden = jobs.length > 0;
  for (const item of jobs) {
    const row = document.createElement("li");
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = new Date(item.created_at).toLocaleTimeString();
    const label = document.createElement("span");
    label.textContent = `${item.words} words`;
    const id = document.createElement("code");
    id.textContent = item.id.slice(0, 8);
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "Reopen";
    open.setAttribute("aria-label", `Reopen job ${item.id.slice(0, 8)}, ${item.words} words`);
    open.addEventListener("click", () => show(item, { fromStart: true }));
    row.append(when, label, id, open);
    list.append(row);
  }
}

// ---- following

function startFollowing() {
  stopFollowing();
  setFollowing(true);
  follow = followJob(job, {
    transport: $("transport").value,
    onEvent: () => {
      view.events += 1;
      $("event-count").textContent = String(view.events);
      saveView();
    },
    onDelta: (text) => {
      view.text += text;
      $("text").textContent = view.text;
    },
    onProgress: (progress) => {
      view.percent = progress.percent ?? 0;
      view.progressText = progress.message || `${progress.current} of ${progress.total ?? "?"}`;
      $("progress").value = view.percent;
      $("progress-text").textContent = view.progressText;
    },
    onStatus: (status) => {
      view.status = status;
      setStatus(status);
      setFollowing(true);
    },
    onFailure: (failure) => {
      view.error = `The job failed: ${failure.message}`;
      showMessage(view.error);
    },
    onTruncated: () => {
      view.error = "Some early events had expired before this page read them.";
      showMessage(view.error);
    },
    onDone: (status) => {
      view.status = status;
      if (status === "completed") view.percent = 100;
      saveView();
      render();
      setFollowing(false);
    },
    onError: (error) => {
      view.error = error.message;
      if (error.kind === "expired") view.status = "expired";
      saveView();
      render();
      setFollowing(false);
    },
    onRetry: (error, failures) => showMessage(`${error.message} Retrying (attempt ${failures + 1})…`),
    onTransport: (transport, reason) => {
      $("transport-used").textContent = reason && reason !== "asked for" ? `${transport} (${reason})` : transport;
    },
  });
}

function stopFollowing() {
  clearTimeout(cutTimer);
  cutTimer = null;
  if (follow) follow.close();
  follow = null;
}

/** Put a job on screen and follow it: resuming where this tab left it, or replaying from the start. */
function show(entry, { fromStart = false } = {}) {
  stopFollowing();
  job = { id: entry.id, token: entry.token, links: entry.links };
  if (fromStart) {
    forgetJob(job.id);
    sessionStorage.removeItem(VIEW_PREFIX + job.id);
  }
  view = { ...emptyView(), ...readJson(sessionStorage, VIEW_PREFIX + job.id, {}) };
  history.replaceState(null, "", `#job=${job.id}`);
  render();
  startFollowing();
}

// ---- actions

function apiKey() {
  return $("key").value.trim();
}

async function startJob(event) {
  event.preventDefault();
  const words = Number($("words").value);
  const delayMs = Number($("delay").value);
  if (!apiKey()) return showMessage("Enter an API key first.") || $("key").focus();
  sessionStorage.setItem(KEY_KEY, apiKey());
  $("start-button").disabled = true;
  try {
    const response = await fetch("/v1/jobs", {
      method: "POST",
      headers: { Authorization: `Bearer ${apiKey()}`, "Content-Type": "application/json" },
      body: JSON.stringify({ type: "demo.story", input: { words, delay_ms: delayMs } }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const fields = (body.errors || []).map((e) => `${e.loc.join(".")}: ${e.msg}`).join("; ");
      return showMessage(`${body.detail || response.statusText}${fields ? ` (${fields})` : ""}`);
    }
    const entry = { id: body.id, token: body.token, links: body.links, created_at: body.created_at, words };
    remember(entry);
    show(entry, { fromStart: true });
  } catch {
    showMessage("The gateway is unreachable.");
  } finally {
    $("start-button").disabled = false;
  }
}

async function cancelJob() {
  if (!job) return;
  $("cancel").disabled = true;
  const response = await fetch(job.links.cancel, { method: "POST", headers: { Authorization: `Bearer ${apiKey()}` } });
  if (!response.ok && response.status !== 409) {
    const body = await response.json().catch(() => ({}));
    showMessage(body.detail || response.statusText);
    $("cancel").disabled = false;
  }
}

function cutConnection() {
  if (!follow) return;
  stopFollowing();
  setStatus("offline");
  $("transport-used").textContent = "none (cut)";
  setFollowing(false);
  cutTimer = setTimeout(() => {
    setStatus(view.status);
    startFollowing();
  }, CUT_MS);
}

function switchTransport() {
  if (follow) startFollowing(); // resumes after the last event seen, on the new transport
}

async function init() {
  $("start").addEventListener("submit", startJob);
  $("cancel").addEventListener("click", cancelJob);
  $("cut").addEventListener("click", cutConnection);
  $("transport").addEventListener("change", switchTransport);
  $("key").value = sessionStorage.getItem(KEY_KEY) || "";
  renderRecent();
  try {
    const response = await fetch("/dev.json", { cache: "no-store" });
    if (response.ok) {
      $("key").value = (await response.json()).api_key;
      $("key-field").hidden = true; // jobstream dev: its own throwaway key
    }
  } catch {
    // not served: the page asks for a key
  }
  const wanted = new URLSearchParams(location.hash.slice(1)).get("job");
  const entry = wanted && recentJobs().find((item) => item.id === wanted);
  if (entry) {
    show(entry);
  } else {
    view = emptyView();
    view.status = "idle";
    render();
    setFollowing(false);
  }
}

init();
