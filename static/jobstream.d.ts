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

export function followJob(job: JobHandle, options?: FollowOptions): Follow;
/** Forget a job's stored resume point. */
export function forgetJob(jobId: string): void;
/** True when stream id `a` comes after `b` (or `b` is null). */
export function isAfter(a: string, b: string | null): boolean;
/** Milliseconds to wait before retry number `failures`, honouring a Retry-After. */
export function backoffMs(failures: number, retryAfterS?: number | null, scheduleS?: number[]): number;
