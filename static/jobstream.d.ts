// Types of the jobstream browser client (jobstream.js).

export type JobStatus = "pending" | "running" | "completed" | "failed" | "cancelled";
export type TerminalStatus = "completed" | "failed" | "cancelled";
export type Transport = "sse" | "poll";

/** The create response of `POST /v1/jobs`, or the parts of it that reading needs. */
export interface JobHandle {
  id: string;
  token: string;
  links?: { events?: string; poll?: string; self?: string; cancel?: string };
}

export interface Progress {
  current: number;
  total: number | null;
  message: string | null;
  percent: number | null;
}

/** One event as the gateway sent it; `id` is the Redis stream id ("<ms>-<seq>"), null for `truncated`. */
export interface JobEvent<T = unknown> {
  id: string | null;
  type: "status" | "delta" | "progress" | "result" | "failure" | "log" | "done" | "truncated" | string;
  data: T;
}

export type ErrorKind = "expired" | "unauthorized" | "forbidden" | "rate_limited" | "bad_request" | "unavailable";

export class JobStreamError extends Error {
  readonly kind: ErrorKind;
  /** The HTTP status, when the gateway answered. */
  readonly status: number | null;
  readonly retryAfterS: number | null;
}

export interface FollowOptions {
  /** "auto" (default): EventSource, falling back to long-polling when it is missing or fails
   * before delivering any event. */
  transport?: "auto" | Transport;
  /** Seconds each long-poll may wait on the server (default 25, at most the server's maximum). */
  pollWaitS?: number;
  /** Seconds to wait before each retry after an error (default [2, 4, 8, 16]; the last repeats),
   * each with ±25 % jitter; after 5 failures in a row `onError` ends the follow. */
  backoffS?: number[];
  /** Keep the last seen id in sessionStorage and resume from it after a reload (default true). */
  resume?: boolean;
  /** Start after this event id instead of the stored one (or the start). */
  after?: string;
  /** Every event, once, in order; called after the event's typed callback (onDelta, ...), and
   * before the client stores its id as the resume point. */
  onEvent?(event: JobEvent): void;
  onDelta?(text: string, event: JobEvent<{ text: string }>): void;
  onProgress?(progress: Progress, event: JobEvent<Progress>): void;
  onStatus?(status: JobStatus, event: JobEvent<{ status: JobStatus }>): void;
  onResult?(result: unknown, event: JobEvent): void;
  onFailure?(failure: { message: string }, event: JobEvent<{ message: string }>): void;
  /** Events older than `firstId` were trimmed away before this reader got them. */
  onTruncated?(firstId: string, event: JobEvent<{ first_id: string }>): void;
  /** The job ended; the follow is closed. `event` is null when `done` had been seen before. */
  onDone?(status: TerminalStatus, event: JobEvent<{ status: TerminalStatus }> | null): void;
  /** Following stopped for good: the job expired (404), access was refused, or 5 retries failed. */
  onError?(error: JobStreamError): void;
  /** A poll failed and is retried after a backoff (2, 4, 8, 16 s with jitter). */
  onRetry?(error: JobStreamError, failures: number): void;
  /** The transport in use, and why it was chosen when it is a fallback. */
  onTransport?(transport: Transport, reason?: string): void;
}

export interface Follow {
  close(): void;
  readonly transport: Transport | null;
  readonly lastEventId: string | null;
}

/**
 * The jobs `followJobs` follows on one connection: listed jobs (1..100; the follow ends once each
 * has ended) or every job of the caller with a tag (present ones, and those created while it
 * follows; it never ends by itself).
 *
 * Credential: `token`, a read token from `POST /v1/read-tokens` covering the jobs or the tag (or a
 * job's own token, for that one job), sent as `?token=` since EventSource cannot send headers.
 * Without a token, `headers` (say `{ Authorization: "Bearer <user JWT>" }`) are sent with each
 * poll, and the follow polls: "auto" picks polling, "sse" is refused. Keep API keys out of
 * browsers: the gateway accepts them only in a header, and a read token reads nothing else.
 */
export type JobsSelection =
  | { jobs: string[]; tag?: undefined; token?: string; headers?: Record<string, string> }
  | { tag: string; jobs?: undefined; token?: string; headers?: Record<string, string> };

/**
 * Options of `followJobs`: the same transport, backoff, resume, visibility and offline rules as
 * `followJob`'s, and the same callbacks, each told which job the event belongs to. `event` is
 * the event in that job's own terms: `id` is the job's stream id, `data` the event's data.
 */
export interface FollowJobsOptions
  extends Pick<FollowOptions, "transport" | "pollWaitS" | "backoffS" | "onError" | "onRetry" | "onTransport"> {
  /** Keep the gateway's cursor (and each job's last id) in sessionStorage, keyed by the selection,
   * and resume from it after a reload (default true). */
  resume?: boolean;
  /** Start from this cursor (an SSE id or a poll's `cursor` of the same selection) instead of the
   * stored one (or every job's start). */
  cursor?: string;
  /** Every event, once per job, in each job's order; called after its typed callback and before
   * the client stores the cursor that covers it. */
  onEvent?(jobId: string, event: JobEvent): void;
  onDelta?(jobId: string, text: string, event: JobEvent<{ text: string }>): void;
  onProgress?(jobId: string, progress: Progress, event: JobEvent<Progress>): void;
  /** Status changes, the ending included (as with `followJob`). */
  onStatus?(jobId: string, status: JobStatus, event: JobEvent<{ status: JobStatus }>): void;
  onResult?(jobId: string, result: unknown, event: JobEvent): void;
  onFailure?(jobId: string, failure: { message: string }, event: JobEvent<{ message: string }>): void;
  /** That job's events older than `firstId` were trimmed away before this reader got them. */
  onTruncated?(jobId: string, firstId: string, event: JobEvent<{ first_id: string }>): void;
  /** One job ended (its `done` event). A job deleted or expiring while followed just drops out. */
  onJobDone?(jobId: string, status: TerminalStatus, event: JobEvent<{ status: TerminalStatus }>): void;
  /** Listed jobs only: every one of them has ended (or dropped out); the follow is closed. */
  onDone?(): void;
}

export interface FollowJobs {
  close(): void;
  readonly transport: Transport | null;
  /** The gateway's opaque cursor after the last event delivered (null before any). */
  readonly cursor: string | null;
}

export function followJob(job: JobHandle, options?: FollowOptions): Follow;
/** Follow many jobs on one connection (`GET /v1/events`, or `GET /v1/poll` when polling). */
export function followJobs(selection: JobsSelection, options?: FollowJobsOptions): FollowJobs;
/** Forget a job's stored resume point. */
export function forgetJob(jobId: string): void;
/** Forget the stored resume point of a `followJobs` selection. */
export function forgetJobs(selection: { jobs?: string[]; tag?: string }): void;
/** True when stream id `a` comes after `b` (or `b` is null). */
export function isAfter(a: string, b: string | null): boolean;
/** Milliseconds to wait before retry number `failures`, honouring a Retry-After. */
export function backoffMs(failures: number, retryAfterS?: number | null, scheduleS?: number[]): number;
