// jobstream browser client: follow a job's events, or many jobs' on one connection, over SSE or
// long-polling, resuming without gaps or duplicates. No dependencies; an ES module. Types:
// jobstream.d.ts.
//
//   import { followJob, followJobs } from "/static/jobstream.js";
//   const follow = followJob(job, { onDelta: (text) => ..., onDone: (status) => ... });
//   const many = followJobs({ jobs: [id1, id2], token }, { onDelta: (jobId, text) => ... });
//   follow.close();

const EVENT_TYPES = ["status", "delta", "progress", "result", "failure", "log", "done", "truncated"];
const BACKOFF_S = [2, 4, 8, 16];
const MAX_FAILURES = 5;
const STORAGE_PREFIX = "jobstream:last-event-id:";
const JOBS_STORAGE_PREFIX = "jobstream:cursor:";

/** Stream ids ("<ms>-<seq>") in order; true when a comes after b. */
export function isAfter(a, b) {
  if (!b) return true;
  const [am, as] = a.split("-").map(Number);
  const [bm, bs] = b.split("-").map(Number);
  return am > bm || (am === bm && as > bs);
}

function sessionStore() {
  try {
    return window.sessionStorage;
  } catch {
    return null; // storage disabled (privacy settings, sandboxed frames)
  }
}

function withQuery(url, params) {
  const target = new URL(url, window.location.href);
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") target.searchParams.set(name, String(value));
  }
  return target.toString();
}

function parseData(raw) {
  try {
    return JSON.parse(raw);
  } catch {
    return raw;
  }
}

/** An Error with the HTTP status and problem+json detail of a failed request, if any. */
export class JobStreamError extends Error {
  constructor(kind, message, { status = null, retryAfterS = null } = {}) {
    super(message);
    this.name = "JobStreamError";
    this.kind = kind; // "expired" | "unauthorized" | "forbidden" | "rate_limited" | "bad_request" | "unavailable"
    this.status = status;
    this.retryAfterS = retryAfterS;
  }
}

async function errorFrom(response, expiredMessage) {
  let detail = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.detail) detail = body.detail;
  } catch {
    // not problem+json: keep the status text
  }
  // A request too large for a proxy on the way (414, 431) will not shrink by retrying: final, as 400.
  const kinds = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "expired",
    410: "expired",
    414: "bad_request",
    429: "rate_limited",
    431: "bad_request",
  };
  const kind = kinds[response.status] || "unavailable";
  const retryAfter = Number(response.headers.get("Retry-After"));
  const message = kind === "expired" ? expiredMessage : detail;
  return new JobStreamError(kind, message, {
    status: response.status,
    retryAfterS: Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : null,
  });
}

/** Errors that retrying cannot fix: report them once and stop. */
function isFinal(error) {
  return ["expired", "unauthorized", "forbidden", "bad_request"].includes(error.kind);
}

/** Wait before retry number `failures` (1-based): 2, 4, 8, 16 s, each with up to ±25 % jitter. */
export function backoffMs(failures, retryAfterS = null, scheduleS = BACKOFF_S) {
  const base = scheduleS[Math.min(failures, scheduleS.length) - 1] * 1000;
  const jittered = base * (0.75 + Math.random() * 0.5);
  return Math.max(jittered, (retryAfterS || 0) * 1000);
}

/**
 * Follow a job's events. `job` is the create response, or any object with `id`, `token` and
 * `links` (`events`, `poll`). Returns `{ close(), transport, lastEventId }`.
 */
export function followJob(job, options = {}) {
  const follower = new JobFollower(job, options);
  return started(follower, { lastEventId: () => follower.lastId });
}

/**
 * Follow many jobs on one connection: `{ jobs: [ids] }` or `{ tag }`, with a `token` (a read token
 * covering them, or a job's own for one job) or, for polling only, `headers`. Returns
 * `{ close(), transport, cursor }`.
 */
export function followJobs(selection, options = {}) {
  const follower = new JobsFollower(selection, options);
  return started(follower, { cursor: () => follower.cursor });
}

/** Start a follower; its handle closes it and reads its transport and `getters`. */
function started(follower, getters) {
  follower.start();
  const handle = { close: () => follower.close() };
  for (const [name, get] of Object.entries({ transport: () => follower.transport, ...getters })) {
    Object.defineProperty(handle, name, { get, enumerable: true });
  }
  return handle;
}

/** The typed callback of each event type, and the argument it takes from the event's data. */
const TYPED_CALLBACKS = {
  delta: ["onDelta", (data) => data.text],
  progress: ["onProgress", (data) => data],
  status: ["onStatus", (data) => data.status],
  result: ["onResult", (data) => data],
  failure: ["onFailure", (data) => data],
  truncated: ["onTruncated", (data) => data.first_id],
  done: ["onStatus", (data) => data.status],
};

/**
 * What both followers share: EventSource with its diagnosis and retries, long-polling with
 * backoff, hidden tabs and offline periods. A subclass says where to read from (`sseUrl`,
 * `pollUrl`) and how to take what arrives (`sseMessage`, `takePage`).
 */
class Reader {
  constructor(options, { canUseSse = true, why = null } = {}) {
    this.options = { transport: "auto", pollWaitS: 25, resume: true, backoffS: BACKOFF_S, ...options };
    if (!["auto", "sse", "poll"].includes(this.options.transport)) {
      throw new TypeError(`transport must be "auto", "sse" or "poll", not ${JSON.stringify(this.options.transport)}`);
    }
    this.sseBlocked = canUseSse ? null : why;
    this.storage = this.options.resume ? sessionStore() : null;
    this.headers = undefined;
    this.expiredMessage = "This job does not exist or has expired.";
    this.transport = null;
    this.closed = false;
    this.source = null;
    this.poller = null;
    this.timer = null;
    this.failures = 0;
    this.offline = false;
    this.onVisibility = () => this.visibilityChanged();
    this.onOffline = () => this.wentOffline();
    this.onOnline = () => this.cameBackOnline();
  }

  start() {
    window.addEventListener("offline", this.onOffline);
    window.addEventListener("online", this.onOnline);
    if (this.options.transport === "poll") return this.usePoll("asked for");
    const blocked = typeof window.EventSource === "function" ? this.sseBlocked : "EventSource is not available";
    if (blocked) this.usePoll(blocked);
    else this.useSse();
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    window.removeEventListener("offline", this.onOffline);
    window.removeEventListener("online", this.onOnline);
    this.stopSse();
    this.stopPoll();
  }

  // ---- network changes: a connection opened before the network went away may never say it
  // died, so both transports stop when the browser goes offline and resume from the last id.

  wentOffline() {
    if (this.closed) return;
    this.offline = true;
    this.stopSse();
    this.pausePolling();
  }

  cameBackOnline() {
    if (this.closed || !this.offline) return;
    this.offline = false;
    this.failures = 0;
    this.pausePolling(); // and any pending retry: one connection at a time
    if (this.transport === "sse") this.useSse();
    else this.schedulePoll(0);
  }

  setTransport(name, reason) {
    this.transport = name;
    this.call("onTransport", name, reason);
  }

  call(name, ...args) {
    const callback = this.options[name];
    if (typeof callback !== "function") return;
    try {
      callback(...args);
    } catch (error) {
      // A bug in the page's callback must not stop the stream.
      setTimeout(() => {
        throw error;
      });
    }
  }

  fail(error) {
    this.close();
    this.call("onError", error);
  }

  fetchPoll(url, signal) {
    return fetch(url, { cache: "no-store", signal, headers: this.headers });
  }

  // ---- server-sent events

  useSse() {
    this.stopSse();
    if (this.transport !== "sse") this.setTransport("sse");
    const source = new EventSource(this.sseUrl());
    this.source = source;
    this.sseDelivered = 0;
    for (const type of EVENT_TYPES) {
      source.addEventListener(type, (message) => {
        this.sseDelivered += 1;
        this.failures = 0;
        if (!this.closed) this.sseMessage(type, message);
      });
    }
    source.addEventListener("error", () => this.sseError(source));
  }

  stopSse() {
    if (this.source) {
      this.source.close();
      this.source = null;
    }
  }

  sseError(source) {
    if (this.closed || this.offline || source !== this.source) return;
    if (source.readyState === EventSource.CONNECTING && this.sseDelivered > 0) {
      return; // EventSource reconnects by itself, sending Last-Event-ID
    }
    // Closed by an HTTP error (EventSource cannot tell which), or failing before any event: a proxy
    // may be buffering or blocking it. Ask the poll endpoint what is wrong.
    this.stopSse();
    this.diagnose();
  }

  async diagnose() {
    let response;
    let body = null;
    try {
      response = await this.fetchPoll(this.pollUrl());
      if (response.ok) body = await response.json();
    } catch {
      response = null; // the network is down: retry below
    }
    if (this.closed) return;
    if (response && !response.ok) {
      const error = await errorFrom(response, this.expiredMessage);
      if (isFinal(error)) return this.fail(error);
      return this.retrySse(error);
    }
    if (body && this.takePage(body)) return; // it had ended (a 204 to EventSource, say)
    if (body && this.options.transport === "auto" && this.sseDelivered === 0) {
      return this.usePoll("server-sent events failed before any event arrived");
    }
    this.retrySse(body ? null : new JobStreamError("unavailable", "The network is unreachable."));
  }

  retrySse(error) {
    this.failures += 1;
    if (this.failures >= MAX_FAILURES) {
      return this.fail(error || new JobStreamError("unavailable", "The event stream keeps failing."));
    }
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.closed && !this.offline) this.useSse();
    }, backoffMs(this.failures, error && error.retryAfterS, this.options.backoffS));
  }

  // ---- long-polling

  usePoll(reason) {
    this.setTransport("poll", reason);
    this.failures = 0;
    document.addEventListener("visibilitychange", this.onVisibility);
    this.schedulePoll(0);
  }

  stopPoll() {
    document.removeEventListener("visibilitychange", this.onVisibility);
    this.pausePolling();
  }

  /** Drop the in-flight poll and any pending one: nothing is lost, the resume point resumes it. */
  pausePolling() {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    if (this.poller) {
      this.poller.abort();
      this.poller = null;
    }
  }

  visibilityChanged() {
    if (this.closed || this.transport !== "poll") return;
    if (document.visibilityState === "hidden") {
      this.pausePolling(); // a hidden tab does not poll
    } else if (!this.poller && !this.timer) {
      this.schedulePoll(0);
    }
  }

  schedulePoll(delayMs) {
    if (this.closed || this.offline || document.visibilityState === "hidden") return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.pollOnce();
    }, delayMs);
  }

  async pollOnce() {
    const controller = new AbortController();
    this.poller = controller;
    let error = null;
    try {
      const response = await this.fetchPoll(this.pollUrl(this.options.pollWaitS), controller.signal);
      if (response.ok) {
        const body = await response.json();
        if (this.poller !== controller) return;
        this.poller = null;
        this.failures = 0;
        if (!this.takePage(body)) this.schedulePoll(0);
        return;
      }
      error = await errorFrom(response, this.expiredMessage);
    } catch (caught) {
      if (controller.signal.aborted) return; // paused or closed
      error = new JobStreamError("unavailable", "The network is unreachable.");
    }
    if (this.poller !== controller) return;
    this.poller = null;
    if (isFinal(error)) return this.fail(error);
    this.failures += 1;
    if (this.failures >= MAX_FAILURES) return this.fail(error);
    this.call("onRetry", error, this.failures);
    this.schedulePoll(backoffMs(this.failures, error.retryAfterS, this.options.backoffS));
  }
}

/** One job: its resume point is the last event id seen, kept per job. */
class JobFollower extends Reader {
  constructor(job, options) {
    if (!job || !job.id) throw new TypeError("followJob needs a job with an id");
    super(options);
    const links = job.links || {};
    this.job = job;
    this.eventsUrl = links.events || `/v1/jobs/${job.id}/events`;
    this.pollBase = links.poll || `/v1/jobs/${job.id}/poll`;
    this.storageKey = STORAGE_PREFIX + job.id;
    this.lastId = this.options.after || (this.storage && this.storage.getItem(this.storageKey)) || null;
  }

  sseUrl() {
    return withQuery(this.eventsUrl, { token: this.job.token, last_event_id: this.lastId });
  }

  pollUrl(waitS) {
    return withQuery(this.pollBase, { token: this.job.token, after: this.lastId, wait: waitS });
  }

  sseMessage(type, message) {
    this.deliver({ id: message.lastEventId, type, data: parseData(message.data) });
  }

  // ---- delivery: the one place events reach the page, in order and once each

  deliver(event) {
    if (this.closed) return;
    if (event.type !== "truncated") {
      if (!event.id || !isAfter(event.id, this.lastId)) return; // seen already (resume overlap)
    }
    const typed = TYPED_CALLBACKS[event.type];
    if (typed) this.call(typed[0], typed[1](event.data), event);
    // After the typed callback, so that a page saving its state here has this event applied.
    this.call("onEvent", event);
    if (event.id) {
      this.lastId = event.id;
      if (this.storage) this.storage.setItem(this.storageKey, event.id);
    }
    if (event.type === "done") {
      this.close();
      this.call("onDone", event.data.status, event);
    }
  }

  /** Deliver one poll answer; true once the job has ended. */
  takePage(body) {
    if (body.truncated) this.deliver({ id: null, type: "truncated", data: body.truncated });
    for (const event of body.events) this.deliver(event);
    if (!this.closed && body.done) {
      // `done` was delivered before this follow began (a reload after the end): close all the same.
      this.close();
      this.call("onDone", body.status, null);
    }
    return this.closed;
  }
}

/**
 * Many jobs on one connection (`/v1/events`, `/v1/poll`): the resume point is the gateway's
 * opaque cursor, kept per selection, with each job's last event id beside it so that nothing is
 * delivered twice even when a poll answer was cut short by `close()`.
 */
class JobsFollower extends Reader {
  constructor(selection, options) {
    const { jobs, tag, token, headers } = selection || {};
    if ((jobs === undefined || jobs === null) === (tag === undefined || tag === null)) {
      throw new TypeError("followJobs needs either jobs (a list of job ids) or a tag");
    }
    if (jobs && (!Array.isArray(jobs) || jobs.length === 0)) throw new TypeError("jobs must be a non-empty list of ids");
    if (!token && !headers) throw new TypeError("followJobs needs a token, or headers with an Authorization to poll");
    super(options, { canUseSse: Boolean(token), why: "no token: EventSource cannot send an Authorization header" });
    if (!token && this.options.transport === "sse") {
      throw new TypeError("server-sent events need a token: EventSource cannot send an Authorization header");
    }
    this.jobIds = jobs ? [...new Set(jobs)] : null;
    this.tag = this.jobIds ? null : tag;
    this.token = token;
    this.headers = headers;
    this.expiredMessage = "One of these jobs does not exist or has expired.";
    this.selected = this.jobIds ? { jobs: this.jobIds.join(",") } : { tag };
    this.storageKey = selectionKey(this.jobIds, this.tag);
    const saved = this.options.cursor ? {} : this.restore();
    this.cursor = this.options.cursor || saved.cursor || null;
    this.lastIds = new Map(Object.entries(saved.last || {}));
    this.ended = new Set(saved.ended || []);
  }

  restore() {
    try {
      const saved = this.storage && JSON.parse(this.storage.getItem(this.storageKey));
      return saved && typeof saved === "object" ? saved : {};
    } catch {
      return {}; // not ours, or damaged: start from the beginning
    }
  }

  save() {
    if (!this.storage) return;
    const state = { cursor: this.cursor, last: Object.fromEntries(this.lastIds), ended: [...this.ended] };
    this.storage.setItem(this.storageKey, JSON.stringify(state));
  }

  sseUrl() {
    return withQuery("/v1/events", { ...this.selected, token: this.token, last_event_id: this.cursor });
  }

  pollUrl(waitS) {
    return withQuery("/v1/poll", { ...this.selected, token: this.token, cursor: this.cursor, wait: waitS });
  }

  /** Each frame is one job's event wrapped as {job_id, id, data}, its SSE id the whole cursor. */
  sseMessage(type, message) {
    const wrapped = parseData(message.data);
    if (type === "truncated") {
      // An unnamed frame: its lastEventId is an earlier event's, so it moves no cursor.
      return this.deliver(wrapped.job_id, { id: null, type, data: { first_id: wrapped.first_id } });
    }
    this.deliver(wrapped.job_id, { id: wrapped.id, type, data: wrapped.data });
    this.commit(message.lastEventId);
    if (!this.closed && this.allEnded()) this.finish();
  }

  /** Deliver one poll answer; true once every listed job has ended. */
  takePage(body) {
    // Jobs whose resume point was trimmed away: told before their events, as on the stream.
    for (const trimmed of body.truncated || []) {
      this.deliver(trimmed.job_id, { id: null, type: "truncated", data: { first_id: trimmed.first_id } });
    }
    let delivered = 0;
    for (const item of body.events) {
      if (this.closed) break; // closed by a callback: the cursor stays before this answer
      this.deliver(item.job_id, { id: item.id, type: item.type, data: item.data });
      delivered += 1;
    }
    if (delivered === body.events.length) this.commit(body.cursor);
    else this.save(); // the old cursor, with the last ids of what was delivered
    if (!this.closed && (body.done || this.allEnded())) this.finish();
    return this.closed;
  }

  // ---- delivery: the one place events reach the page, in order and once each per job

  deliver(jobId, event) {
    if (this.closed) return;
    if (event.type !== "truncated" && !isAfter(event.id, this.lastIds.get(jobId) || null)) return;
    const typed = TYPED_CALLBACKS[event.type];
    if (typed) this.call(typed[0], jobId, typed[1](event.data), event);
    this.call("onEvent", jobId, event);
    if (event.type === "truncated") return;
    this.lastIds.set(jobId, event.id);
    if (event.type === "done") {
      this.ended.add(jobId);
      this.call("onJobDone", jobId, event.data.status, event);
    }
  }

  /** Store the cursor the gateway gave after the events just delivered. */
  commit(cursor) {
    if (!cursor) return;
    this.cursor = cursor;
    if (this.tag !== null) this.forgetEnded();
    this.save();
  }

  /** With a tag nothing ever ends the follow, so ended jobs are dropped once the cursor has their
   * `done` (the gateway sends them no more): the stored state stays as small as the cursor. */
  forgetEnded() {
    for (const jobId of this.ended) this.lastIds.delete(jobId);
    this.ended.clear();
  }

  allEnded() {
    return this.jobIds !== null && this.jobIds.every((jobId) => this.ended.has(jobId));
  }

  finish() {
    this.close();
    this.call("onDone");
  }
}

function selectionKey(jobIds, tag) {
  return JOBS_STORAGE_PREFIX + (jobIds ? `jobs:${[...jobIds].sort().join(",")}` : `tag:${tag}`);
}

/** Forget a job's resume point (say, once the page has shown its end). */
export function forgetJob(jobId) {
  const storage = sessionStore();
  if (storage) storage.removeItem(STORAGE_PREFIX + jobId);
}

/** Forget the resume point of a `followJobs` selection ({ jobs } or { tag }). */
export function forgetJobs({ jobs, tag } = {}) {
  const storage = sessionStore();
  if (storage) storage.removeItem(selectionKey(jobs ? [...new Set(jobs)] : null, tag));
}
