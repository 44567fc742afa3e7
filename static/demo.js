// The demo page: start demo.story jobs and follow one with followJob, list the caller's jobs from
// the gateway, follow all running ones on one connection (demo-all.js), and chat (demo-chat.js).
import { followJob, forgetJob } from "/static/jobstream.js";
import { setUpAllJobs } from "/static/demo-all.js";
import { setUpChat } from "/static/demo-chat.js";
import { $, DEMO_TAG, api, apiKey, badge, problemText, readJson } from "/static/demo-shared.js";

const VIEW_PREFIX = "jobstream-demo:view:";
const HANDLE_PREFIX = "jobstream-demo:job:";
const KEY_KEY = "jobstream-demo:api-key";
const RECENT_LIMIT = 10;
const CUT_MS = 2000;
const ENDED = ["completed", "failed", "cancelled", "expired"];
const EXPIRED = "This job does not exist or has expired.";

let job = null; // the job on screen: {id, token, links}
let follow = null;
let view = null; // what the page shows of it, kept in sessionStorage so a reload continues it
let cutTimer = null;
let recentAsked = 0; // the newest listing asked for: an older answer arriving late is dropped
let allJobs = null;

// ---- storage

function saveView() {
  if (job && view) sessionStorage.setItem(VIEW_PREFIX + job.id, JSON.stringify(view));
}

function emptyView() {
  return { text: "", status: "pending", percent: 0, progressText: "", events: 0, error: null };
}

/** The handle followJob needs: the one this tab has, or a fresh read token for the job. */
async function handleFor(jobId) {
  const kept = readJson(sessionStorage, HANDLE_PREFIX + jobId, null);
  if (kept) return kept;
  const answer = await api("/v1/read-tokens", { method: "POST", body: { jobs: [jobId] } });
  if (answer.status === 404) throw new Error(EXPIRED);
  if (!answer.ok) throw new Error(problemText(answer));
  return { id: jobId, token: answer.body.token };
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
  $("cancel").disabled = !job || ENDED.includes(view.status);
}

// ---- recent jobs, as the gateway lists them

async function refreshRecent() {
  if (!apiKey()) return noteRecent("Enter an API key to list your jobs.");
  const asked = ++recentAsked;
  let answer;
  try {
    answer = await api(`/v1/jobs?limit=${RECENT_LIMIT}`);
  } catch {
    answer = null;
  }
  if (asked !== recentAsked) return;
  if (!answer) return noteRecent("The gateway is unreachable.");
  if (!answer.ok) return noteRecent(problemText(answer));
  renderRecent(answer.body.jobs);
}

function noteRecent(text) {
  $("recent-note").textContent = text || "";
  $("recent-note").hidden = !text;
}

function renderRecent(jobs) {
  noteRecent(jobs.length ? "" : "No jobs yet: start a story above.");
  $("recent").replaceChildren(...jobs.map(recentRow));
}

function recentRow(item) {
  const row = document.createElement("li");
  row.dataset.job = item.id;
  const when = document.createElement("span");
  when.className = "when";
  when.textContent = new Date(item.created_at).toLocaleTimeString();
  const label = document.createElement("span");
  label.className = "label";
  const words = item.metadata && item.metadata.words;
  label.textContent = words ? `${words} words` : item.type;
  const id = document.createElement("code");
  id.textContent = item.id.slice(0, 8);
  const open = document.createElement("button");
  open.type = "button";
  open.textContent = "Reopen";
  open.setAttribute("aria-label", `Reopen job ${item.id.slice(0, 8)}, ${label.textContent}`);
  open.addEventListener("click", () => openJob(item.id, { fromStart: true }));
  row.append(when, label, badge(item.status), id, open);
  return row;
}

// ---- following one job

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
      refreshRecent();
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
    onError: (error) => showUnreadable(error.kind === "expired" ? "expired" : view.status, error.message),
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

function showUnreadable(status, message) {
  view.status = status;
  view.error = message;
  saveView();
  render();
  setFollowing(false);
}

/** Put a job on screen and follow it: resuming where this tab left it, or replaying from the start. */
function show(handle, { fromStart = false } = {}) {
  stopFollowing();
  job = { id: handle.id, token: handle.token, links: handle.links };
  sessionStorage.setItem(HANDLE_PREFIX + job.id, JSON.stringify(job));
  if (fromStart) {
    forgetJob(job.id);
    sessionStorage.removeItem(VIEW_PREFIX + job.id);
  }
  view = { ...emptyView(), ...readJson(sessionStorage, VIEW_PREFIX + job.id, {}) };
  history.replaceState(null, "", `#job=${job.id}`);
  render();
  startFollowing();
}

/** Show a job this tab may have no token for (a listed one, a link): one is asked for first. */
async function openJob(jobId, options) {
  try {
    show(await handleFor(jobId), options);
  } catch (error) {
    stopFollowing();
    job = { id: jobId };
    view = emptyView();
    const expired = error.message === EXPIRED;
    showUnreadable(expired ? "expired" : "idle", error instanceof TypeError ? "The gateway is unreachable." : error.message);
  }
}

// ---- actions

async function startJob(event) {
  event.preventDefault();
  const words = Number($("words").value);
  const delayMs = Number($("delay").value);
  if (!apiKey()) return showMessage("Enter an API key first.") || $("key").focus();
  sessionStorage.setItem(KEY_KEY, apiKey());
  $("start-button").disabled = true;
  try {
    const input = { words, delay_ms: delayMs };
    const body = { type: "demo.story", input, tags: [DEMO_TAG], metadata: { words } };
    const answer = await api("/v1/jobs", { method: "POST", body });
    if (!answer.ok) return showMessage(problemText(answer));
    show(answer.body, { fromStart: true });
    refreshRecent();
  } catch {
    showMessage("The gateway is unreachable.");
  } finally {
    $("start-button").disabled = false;
  }
}

async function cancelJob() {
  if (!job) return;
  $("cancel").disabled = true;
  const url = (job.links && job.links.cancel) || `/v1/jobs/${job.id}/cancel`;
  const answer = await api(url, { method: "POST" }).catch(() => ({ ok: false, status: 0, body: {} }));
  if (!answer.ok && answer.status !== 409) {
    showMessage(answer.status ? problemText(answer) : "The gateway is unreachable.");
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
  allJobs.restart();
}

/** Under `jobstream dev`, its own throwaway key: true when there is one. */
async function useDevKey() {
  try {
    const response = await fetch("/dev.json", { cache: "no-store" });
    if (response.ok) {
      $("key").value = (await response.json()).api_key;
      $("key-field").hidden = true;
      return true;
    }
  } catch {
    // not served: the page asks for a key
  }
  return false;
}

async function init() {
  $("start").addEventListener("submit", startJob);
  $("cancel").addEventListener("click", cancelJob);
  $("cut").addEventListener("click", cutConnection);
  $("transport").addEventListener("change", switchTransport);
  $("recent-refresh").addEventListener("click", refreshRecent);
  $("key").value = sessionStorage.getItem(KEY_KEY) || "";
  const dev = await useDevKey();
  allJobs = setUpAllJobs({ transport: () => $("transport").value, changed: refreshRecent });
  setUpChat({ dev });
  refreshRecent();
  const wanted = new URLSearchParams(location.hash.slice(1)).get("job");
  if (wanted) return openJob(wanted);
  view = emptyView();
  view.status = "idle";
  render();
  setFollowing(false);
}

init();
