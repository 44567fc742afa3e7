"""The worker: takes jobs from the queue, runs their handlers, records how each one ended.

A job is leased while it runs: the worker renews its queue entry every third of the lease. An entry
whose worker died stops being renewed and another worker reclaims it (XAUTOCLAIM), then retries the
job if its handler is idempotent or fails it with "worker lost".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from jobstream import metrics, observability, sentry
from jobstream.connection import RedisClient
from jobstream.errors import JobEnded, JobNotFound, ValidationFailed
from jobstream.models import JobStatus, to_json
from jobstream.observability import job_transition
from jobstream.producer import JobContext, JobFailed, result_data
from jobstream.queue import QueueEntry, WorkQueue
from jobstream.registry import HandlerSpec, Registry
from jobstream.settings import Settings
from jobstream.store import JobRecord, JobStore, OutgoingEvent, done_event

logger = logging.getLogger("jobstream.worker")

WORKER_LOST = "worker lost"
CANCEL_CHECK_S = 0.25


@dataclass
class _Running:
    entry: QueueEntry
    task: asyncio.Task[None]
    handler_task: asyncio.Task[Any] | None = None
    stop_requested: bool = False


@dataclass
class _Counters:
    complete: int = 0
    failed: int = 0
    cancelled: int = 0
    reclaimed: int = 0
    retried: int = 0

    def __str__(self) -> str:
        return " ".join(f"j_{name}={value}" for name, value in vars(self).items())


def failure_events(message: str) -> list[OutgoingEvent]:
    return [OutgoingEvent("failure", to_json({"message": message})), done_event(JobStatus.failed)]


@dataclass
class Worker:
    settings: Settings
    registry: Registry
    client: RedisClient
    concurrency: int = 10
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    def __post_init__(self) -> None:
        self.store = JobStore(self.client, self.settings)
        self.queue = WorkQueue(self.client, self.name)
        self._running: dict[str, _Running] = {}
        self._counters = _Counters()
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()

    def __repr__(self) -> str:
        return f"Worker(name={self.name!r}, running={len(self._running)}, {self._counters})"

    @property
    def completed(self) -> int:
        """Jobs this worker ran to `completed`."""
        return self._counters.complete

    def stop(self) -> None:
        """Stop taking jobs; `run` then waits for running ones up to the shutdown grace."""
        self._stopping.set()

    async def run(self, *, handle_signals: bool = False) -> None:
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        await self.queue.ensure_group()
        logger.info("worker %s started: concurrency=%d types=%s", self.name, self.concurrency, self.registry.names())
        maintenance = asyncio.create_task(self._maintain())
        try:
            await self._take_loop()
        finally:
            await self._drain()
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            logger.info("worker %s stopped: %s", self.name, self._counters)

    async def _take_loop(self) -> None:
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._slot_free.clear()
                await _wait_any(self._slot_free, self._stopping, timeout_s=1.0)
                continue
            try:
                entries = await self.queue.take(free, block_ms=500)
            except RedisError as exc:
                logger.warning("worker %s cannot read the queue: %s", self.name, exc)
                await _wait_any(self._stopping, timeout_s=1.0)
                continue
            for entry in entries:
                self._start(entry)

    def _start(self, entry: QueueEntry) -> None:
        task = asyncio.create_task(self._run_guarded(entry), name=f"job-{entry.job_id}")
        self._running[entry.entry_id] = _Running(entry, task)
        task.add_done_callback(lambda _: self._finished(entry.entry_id))

    def _finished(self, entry_id: str) -> None:
        self._running.pop(entry_id, None)
        self._slot_free.set()

    async def _drain(self) -> None:
        """Give running jobs the shutdown grace, then hand the rest back, marked as lapsed so that the
        next reclaim by any worker takes them."""
        tasks = [running.task for running in self._running.values()]
        if not tasks:
            return
        logger.info("worker %s waiting up to %.0fs for %d jobs", self.name, self.settings.shutdown_grace_s, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
        handed_back = [entry_id for entry_id, running in self._running.items() if running.task in pending]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if handed_back:
            with contextlib.suppress(RedisError):
                await self.queue.hand_back(handed_back, self.settings.worker_lease_s * 1000)
            logger.info("worker %s handed back %d jobs", self.name, len(handed_back))

    async def _maintain(self) -> None:
        """Renew leases, stop cancelled jobs and reclaim jobs of dead workers, on their own periods."""
        lease_s = self.settings.worker_lease_s
        loop = asyncio.get_running_loop()
        next_renew = next_reclaim = loop.time()
        while True:
            try:
                await self._stop_cancelled()
                if loop.time() >= next_renew:
                    await self.queue.renew([r.entry.entry_id for r in self._running.values()])
                    next_renew = loop.time() + lease_s / 3
                if loop.time() >= next_reclaim and not self._stopping.is_set():
                    await self._reclaim()
                    next_reclaim = loop.time() + lease_s / 2
            except RedisError as exc:
                metrics.redis_errors.labels("worker").inc()
                logger.warning("worker %s maintenance failed: %s", self.name, exc)
            await asyncio.sleep(CANCEL_CHECK_S)

    async def _stop_cancelled(self) -> None:
        for running in self._running.values():
            if running.stop_requested and running.handler_task is not None and not running.handler_task.done():
                # Again: a cancellation that lands inside a redis-py call can be swallowed there.
                running.handler_task.cancel()
        active = {r.entry.job_id: r for r in self._running.values() if r.handler_task and not r.stop_requested}
        if not active:
            return
        for job_id in await self.store.should_stop(list(active)):
            running = active[job_id]
            running.stop_requested = True
            if running.handler_task is not None:
                running.handler_task.cancel()

    async def _reclaim(self) -> None:
        free = self.concurrency - len(self._running)
        if free <= 0:
            return
        for entry in await self.queue.reclaim(self.settings.worker_lease_s * 1000, count=free):
            if entry.entry_id in self._running:
                continue
            self._counters.reclaimed += 1
            metrics.jobs_reclaimed.inc()
            logger.warning("worker %s reclaimed job %s from a lost or stopped worker", self.name, entry.job_id)
            self._start(entry)

    async def _run_guarded(self, entry: QueueEntry) -> None:
        try:
            await self._run_entry(entry)
        except RedisError as exc:
            # The entry stays leased to this worker; once the lease lapses the job is reclaimed.
            metrics.redis_errors.labels("worker").inc()
            logger.warning("worker %s lost redis while running job %s: %s", self.name, entry.job_id, exc)

    async def _run_entry(self, entry: QueueEntry) -> None:
        outcome, attempt = await self.store.start_attempt(entry.job_id)
        job = await self.store.get(entry.job_id) if outcome == "ok" else None
        if outcome == "cancelled":
            await self._record(entry.job_id, [done_event(JobStatus.cancelled)])
        elif job is not None:
            await self._run_job(entry, job, attempt)
        await self.queue.finish(entry.entry_id)

    async def _run_job(self, entry: QueueEntry, job: JobRecord, attempt: int) -> None:
        spec = self.registry.get(job.type)
        if spec is None:
            metrics.jobs_finished.labels(job.type, JobStatus.failed.value).inc()
            await self._record(job.id, failure_events(f"No handler for job type '{job.type}' on this worker."))
            return
        if attempt > 1:
            if not spec.idempotent or attempt > self.settings.max_attempts:
                self._counters.failed += 1
                metrics.jobs_finished.labels(job.type, JobStatus.failed.value).inc()
                await self._record(job.id, failure_events(WORKER_LOST))
                return
            self._counters.retried += 1
        ctx = JobContext(
            self.store,
            job.id,
            job.type,
            attempt=attempt,
            flush_ms=self.settings.delta_flush_ms,
            flush_bytes=self.settings.delta_flush_bytes,
        )
        try:
            observability.job_id.set(job.id)  # this task's log lines belong to the job
            with sentry.job_run(job.id, job.type, attempt, job.fields):
                if attempt > 1:
                    job_transition("reclaimed", job.id, job_type=job.type, attempt=attempt)
                await self._execute(entry, spec, ctx, job)
        finally:
            await ctx.close()

    async def _execute(self, entry: QueueEntry, spec: HandlerSpec, ctx: JobContext, job: JobRecord) -> None:
        try:
            if ctx.attempt == 1:
                await ctx.emit("status", {"status": JobStatus.running.value})
            else:
                await ctx.log("retrying after its worker was lost", attempt=ctx.attempt)
        except (JobNotFound, JobEnded):
            return
        job_transition("started", job.id, job_type=job.type, attempt=ctx.attempt)
        started = time.monotonic()
        running = self._running[entry.entry_id]
        running.handler_task = asyncio.create_task(_call(spec, ctx, job.input))
        try:
            result = await asyncio.shield(running.handler_task)
        except asyncio.CancelledError:
            if running.stop_requested:
                self._counters.cancelled += 1
                _ended(job, JobStatus.cancelled, started)
                await self._record(job.id, [done_event(JobStatus.cancelled)], ctx)
                return
            # The worker itself is shutting down: stop the handler and leave the job to be reclaimed.
            running.handler_task.cancel()
            raise
        except (JobNotFound, JobEnded):
            return
        except Exception as exc:
            self._counters.failed += 1
            message = _failure_message(spec, exc, job.id)
            _ended(job, JobStatus.failed, started, reason=message)
            await self._record(job.id, failure_events(message), ctx)
            return
        self._counters.complete += 1
        _ended(job, JobStatus.completed, started)
        events = [] if result is None else [OutgoingEvent("result", to_json(result_data(result)))]
        await self._record(job.id, [*events, done_event(JobStatus.completed)], ctx)

    async def _record(self, job_id: str, events: list[OutgoingEvent], ctx: JobContext | None = None) -> None:
        """Write a job's ending; shielded so that cancellation cannot leave it running."""
        replicas = self.settings.durable_end_replicas
        writer = (
            ctx.append(events, replicas=replicas)
            if ctx is not None
            else self.store.append(job_id, events, replicas=replicas)
        )
        try:
            await asyncio.shield(writer)
        except (JobNotFound, JobEnded):
            pass


def _ended(job: JobRecord, status: JobStatus, started: float, **fields: str) -> None:
    """A run that ended: counted, timed, logged, and a breadcrumb."""
    duration_s = time.monotonic() - started
    metrics.jobs_finished.labels(job.type, status.value).inc()
    metrics.job_duration.labels(job.type).observe(duration_s)
    job_transition(status.value, job.id, job_type=job.type, duration_s=round(duration_s, 3), **fields)


async def _call(spec: HandlerSpec, ctx: JobContext, raw_input: dict[str, Any]) -> Any:
    if spec.timeout_s is None:
        return await spec.run(ctx, raw_input)
    async with asyncio.timeout(spec.timeout_s):
        return await spec.run(ctx, raw_input)


def _failure_message(spec: HandlerSpec, exc: Exception, job_id: str) -> str:
    """What readers see of a failure: the handler's own JobFailed message, never internals."""
    if isinstance(exc, JobFailed):
        return exc.message
    if isinstance(exc, TimeoutError):
        return f"The job timed out after {spec.timeout_s:g} s."
    if isinstance(exc, ValidationFailed):
        return "The job's input is not valid for this handler."
    logger.error("job %s (%s) raised", job_id, spec.name, exc_info=exc)
    sentry.capture(exc)
    return "The job failed with an internal error."


async def _wait_any(*events: asyncio.Event, timeout_s: float) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
