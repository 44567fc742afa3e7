// The demo page's "all my running jobs" view: many jobs on one connection with followJobs. What it
// shows is kept in sessionStorage, beside followJobs' own cursor, so a reload continues it.
import { followJobs, forgetJobs } from "/static/jobstream.js";
import { $, DEMO_TAG, api, badge, problemText, readJson } from "/static/demo-shared.js";

const STATE_KEY = "jobstream-demo:all";
const MAX_JOBS = 100; // what one read token and one connection cover
const ENDED = ["completed", "failed", "cancelled"];

let follow = null;
// {selection, token, label, order: [ids], jobs: {id: {text, status, error}}, active, ended}
let state = null;
let page = null; // {transport(), changed()}: the page's transport choice, and a hook for job endings

/** Wire the view's buttons and resume what this tab was following. */
export function setUpAllJobs(hooks) {
  page = hooks;
  $("follow-running").addEventListener("click", () => guarded(followRunning));
  $("follow-tag").addEventListener("click", () => guarded(followTag));
  $("follow-stop").addEventListener("click", stop);
  state = readJson(sessionStorage, STATE_KEY, null);
  if (state) {
    renderAll();
    if (state.active) start();
  }
  return { restart: () => follow && start() }; // a new transport, from the same cursor
}

async function guarded(action) {
  note("");
  try {
    await action();
  } catch {
    note("The gateway is unreachable.");
  }
}

async function followRunning() {
  const listed = await api(`/v1/jobs?status=pending,running&limit=${MAX_JOBS}`);
  if (!listed.ok) return note(problemText(listed));
  const jobs = listed.body.jobs;
  if (!jobs.length) return note("None of your jobs is pending or running: start a story first.");
  const ids = jobs.map((item) => item.id);
  const issued = await api("/v1/read-tokens", { method: "POST", body: { jobs: ids } });
  if (!issued.ok) return note(problemText(issued));
  begin({ jobs: ids }, issued.body.token, `${ids.length} running jobs`, jobs);
}

async function followTag() {
  const issued = await api("/v1/read-tokens", { method: "POST", body: { tag: DEMO_TAG } });
  if (!issued.ok) return note(problemText(issued));
  begin({ tag: DEMO_TAG }, issued.body.token, `tag ${DEMO_TAG} (new jobs join)`, []);
}

/** A fresh view of `selection`: every job shown from its first event. */
function begin(selection, token, label, jobs) {
  stop();
  forgetJobs(selection);
  state = { selection, token, label, order: [], jobs: {}, active: true, ended: false };
  for (const item of jobs) jobView(item.id).status = item.status;
  save();
  renderAll();
  start();
}

function start() {
  if (follow) follow.close();
  state.active = true;
  save();
  setButtons();
  follow = followJobs({ ...state.selection, token: state.token }, {
    transport: page.transport(),
    onDelta: (jobId, text) => {
      jobView(jobId).text += text;
      renderJob(jobId);
    },
    onStatus: (jobId, status) => {
      jobView(jobId).status = status;
      renderJob(jobId);
    },
    onFailure: (jobId, failure) => {
      jobView(jobId).error = `The job failed: ${failure.message}`;
      renderJob(jobId);
    },
    onTruncated: (jobId) => {
      jobView(jobId).error = "Some early events had expired before this page read them.";
      renderJob(jobId);
    },
    onEvent: save, // after each event is applied, before followJobs stores its cursor
    onJobDone: () => page.changed(),
    onDone: () => finish(`all ${state.order.length} jobs ended`),
    onError: (error) => finish("stopped", error.message),
    onRetry: (error, failures) => note(`${error.message} Retrying (attempt ${failures + 1})…`),
    onTransport: (transport, reason) => {
      $("all-transport").textContent = reason && reason !== "asked for" ? `${transport} (${reason})` : transport;
    },
  });
  renderAll();
}

function stop() {
  if (follow) follow.close();
  follow = null;
  if (state && state.active) finish("stopped");
}

function finish(outcome, message = "") {
  follow = null;
  state.active = false;
  state.ended = outcome;
  save();
  renderAll();
  note(message);
}

function save() {
  sessionStorage.setItem(STATE_KEY, JSON.stringify(state));
}

function jobView(jobId) {
  if (!state.jobs[jobId]) {
    state.jobs[jobId] = { text: "", status: "pending", error: null };
    state.order.push(jobId);
  }
  return state.jobs[jobId];
}

// ---- rendering

function note(text) {
  $("all-message").textContent = text || "";
  $("all-message").hidden = !text;
}

function setButtons() {
  $("follow-stop").disabled = !state || !state.active;
}

function renderAll() {
  $("all-jobs").replaceChildren(...state.order.map((jobId) => jobRow(jobId)));
  $("all-count").textContent = String(state.order.length);
  $("all-state").textContent = state.active ? `${state.label}, on one connection` : `${state.label}: ${state.ended}`;
  setButtons();
}

function renderJob(jobId) {
  const existing = $("all-jobs").querySelector(`li[data-job="${jobId}"]`);
  const row = jobRow(jobId);
  if (existing) existing.replaceWith(row);
  else $("all-jobs").append(row);
  $("all-count").textContent = String(state.order.length);
}

function jobRow(jobId) {
  const item = state.jobs[jobId];
  const row = document.createElement("li");
  row.dataset.job = jobId;
  const head = document.createElement("div");
  head.className = "job-head";
  const id = document.createElement("code");
  id.textContent = jobId.slice(0, 8);
  head.append(id, badge(item.status));
  const text = document.createElement("div");
  text.className = "text compact";
  text.classList.toggle("streaming", state.active && !ENDED.includes(item.status));
  text.textContent = item.text;
  row.append(head, text);
  if (item.error) {
    const failure = document.createElement("p");
    failure.className = "failure";
    failure.textContent = item.error;
    row.append(failure);
  }
  return row;
}
