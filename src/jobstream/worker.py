"""The worker: takes jobs from the queue, runs their handlers, records how each one ended.

A job is leased while it runs: the worker renews its queue entry every third of the lease. An entry
whose worker died stops being renewed and another worker reclaims it (XAUTOCLAIM), then retries the
job if its handler is idempotent or fails it with "worker lost". With a cap on the jobs a user may
have running, a job is admitted first (fairness.py): it holds one of its owner's slots while it
runs, or waits, parked off the queue.
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
from jobstream.archive import open_archive
from jobstream.archiver import Archiver
from jobstream.connection import RedisClient
from jobstream.errors import JobEnded, JobNotFound, ValidationFailed
from jobstream.fairness import SWEEP_EVERY_S, UserSlots
from jobstream.models import JobStatus, to_json
from jobstream.observability import job_transition
from jobstream.producer import EventWriter, JobContext, JobFailed, result_data
from jobstream.queue import QueueEntry, WorkQueue
from jobstream.registry import HandlerSpec, Registry
from jobstream.settings import Settings
from jobstream.store import JobRecord, JobStore, OutgoingEvent, done_event
from jobstream.webhooks import WebhookSender

logger = logging.getLogger("jobstream.worker")

WORKER_LOST = "worker lost"
RESULT_NOT_JSON = "The job's result is not JSON."
CANCEL_CHECK_S = 0.25
#: On shutdown, how long endings still being written when the grace is over (a slow or failing-over
#: Redis) may take to land before the worker gives up on them.
ENDING_DRAIN_S = 5.0


@dataclass
class _Running:
    entry: QueueEntry
    task: asyncio.Task[None]
    handler_task: asyncio.Task[Any] | None = None
    stop_requested: bool = False
    #: The write of the job's ending, once started: a shutdown lets it land rather than hand the job back.
    ending: asyncio.Task[None] | None = None


@dataclass
class _Counters:
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    reclaimed: int = 0
    retried: int = 0
    parked: int = 0

    def __str__(self) -> str:
        return " ".join(f"j_{name}={value}" for name, value in vars(self).items())

    def ended(self, status: JobStatus) -> None:
        setattr(self, status.value, getattr(self, status.value) + 1)


@dataclass(frozen=True)
class Ending:
    """How a worker ends a run of a job: the status it asks for, the events before its `done`, and
    its kind, for the log (completed, failed, timeout, cancelled, cancelled_on_reclaim,
    no_handler, worker_lost). ``reason`` is the failure message readers get."""

    status: JobStatus
    kind: str
    events: tuple[OutgoingEvent, ...] = ()
    reason: str | None = None

    @classmethod
    def completed(cls, result: Any) -> Ending:
        events = () if result is None else (OutgoingEvent("result", to_json(result_data(result))),)
        return cls(JobStatus.completed, "completed", events)

    @classmethod
    def failed(cls, message: str, kind: str = "failed") -> Ending:
        return cls(JobStatus.failed, kind, (OutgoingEvent("failure", to_json({"message": message})),), message)

    @classmethod
    def cancelled(cls, kind: str = "cancelled") -> Ending:
        return cls(JobStatus.cancelled, kind)

    def outgoing(self) -> list[OutgoingEvent]:
        return [*self.events, done_event(self.status)]


@dataclass
class _JobRun:
    """One run of a job by this worker, from taking its queue entry to its ending."""

    entry: QueueEntry
    job: JobRecord
    attempt: int
    writer: EventWriter
    started: float


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
        self.slots = UserSlots(self.client, self.queue, self.settings)
        self._running: dict[str, _Running] = {}
        self._counters = _Counters()
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()

    def __repr__(self) -> str:
        return f"Worker(name={self.name!r}, running={len(self._running)}, {self._counters})"

    @property
    def completed(self) -> int:
        """Jobs this worker ran to `completed`."""
        return self._counters.completed

    @property
    def parked(self) -> int:
        """Jobs this worker held back because their owner had the most jobs running allowed."""
        return self._counters.parked

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
        # Webhook deliveries and archiving go on beside the jobs; on stop, those under way end first (bounded).
        beside = [asyncio.create_task(WebhookSender(self.client, self.settings).run(self._stopping))]
        archive = open_archive(self.settings.archive_url) if self.settings.archive_url else None
        if archive is not None:
            beside.append(asyncio.create_task(Archiver(self.client, self.settings, archive).run(self._stopping)))
        try:
            await self._take_loop()
        finally:
            self._stopping.set()  # also when the take loop failed: the sender stops with it
            await self._drain()
            await asyncio.gather(*beside, return_exceptions=True)
            if archive is not None:
                await archive.close()
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
        """Give running jobs the shutdown grace, then stop the handlers still running and hand their
        jobs back, marked as lapsed so that the next reclaim by any worker takes them. A job whose
        ending is being written when the grace is over is not handed back (another worker would
        run it again, or fail it `worker lost`, though its handler is done): its ending gets up to
        ENDING_DRAIN_S more to land, and the job then leaves the queue as usual."""
        runs = list(self._running.values())
        if not runs:
            return
        grace_s = self.settings.shutdown_grace_s
        logger.info("worker %s waiting up to %.0fs for %d jobs", self.name, grace_s, len(runs))
        await asyncio.wait([run.task for run in runs], timeout=grace_s)
        late = [run for run in runs if not run.task.done()]
        if late:
            await self._stop_late(late)

    async def _stop_late(self, late: list[_Running]) -> None:
        """Stop the runs still going after the grace: cancel the handlers, wait (bounded) for the
        endings under way, hand back the jobs that have none."""
        writing = sum(run.ending is not None for run in late)
        for run in late:
            if run.ending is None:
                run.task.cancel()  # its handler stops; a cancel of the job accepted just now may still end it
        if writing:
            logger.info(
                "worker %s waiting up to %.0fs for %d endings being written", self.name, ENDING_DRAIN_S, writing
            )
        await asyncio.wait([run.task for run in late], timeout=ENDING_DRAIN_S)
        unwritten = [run for run in late if run.ending is not None and not run.ending.done()]
        endings = [run.ending for run in late if run.ending is not None]
        for task in [run.task for run in late] + endings:
            task.cancel()
        await asyncio.gather(*(run.task for run in late), *endings, return_exceptions=True)
        if unwritten:
            # Left leased to this worker: reclaimed once the lease lapses, by when Redis may be back.
            logger.warning("worker %s stopped with %d job endings not written", self.name, len(unwritten))
        handed_back = [run.entry.entry_id for run in late if run.ending is None]
        if handed_back:
            with contextlib.suppress(RedisError):
                await self.queue.hand_back(handed_back, self.settings.worker_lease_s * 1000)
            logger.info("worker %s handed back %d jobs", self.name, len(handed_back))

    async def _maintain(self) -> None:
        """Renew leases, stop cancelled jobs, reclaim jobs of dead workers and put back parked jobs
        whose owner's slots freed, on their own periods."""
        lease_s = self.settings.worker_lease_s
        loop = asyncio.get_running_loop()
        next_renew = next_reclaim = next_sweep = loop.time()
        while True:
            try:
                await self._stop_cancelled()
                if loop.time() >= next_renew:
                    await self.queue.renew([r.entry.entry_id for r in self._running.values()])
                    await self.slots.renew()
                    next_renew = loop.time() + lease_s / 3
                if loop.time() >= next_reclaim and not self._stopping.is_set():
                    await self._reclaim()
                    next_reclaim = loop.time() + lease_s / 2
                if loop.time() >= next_sweep and not self._stopping.is_set():
                    await self.slots.sweep()
                    next_sweep = loop.time() + SWEEP_EVERY_S
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
        started = time.monotonic()
        admission = await self.slots.admit(entry)
        if admission.parked:  # its owner has the most jobs running allowed: it waits, off the queue
            self._counters.parked += 1
            return
        try:
            outcome = await self._start_and_run(entry, started)
            # A duplicate is run by the entry that started the job, which holds its slot.
            if outcome != "duplicate":
                await self.slots.release(admission)
        finally:
            # A run cut short (shutdown, Redis lost) keeps its slot for the worker that reclaims it.
            self.slots.forget(admission)
        await self.queue.finish(entry.entry_id)

    async def _start_and_run(self, entry: QueueEntry, started: float) -> str:
        """Run the job of ``entry`` unless it is gone, ended or started by another entry; returns
        how its start went (see ``JobStore.start_attempt``)."""
        outcome, attempt = await self.store.start_attempt(entry.job_id, entry.entry_id)
        job = await self.store.get(entry.job_id) if outcome in ("ok", "cancelled") else None
        if job is not None:
            observability.job_id.set(job.id)  # this task's log lines belong to the job
            run = _JobRun(entry, job, attempt, self._writer(job.id, attempt), started)
            with sentry.job_run(job.id, job.type, attempt, job.fields):
                try:
                    await self._run_job(entry, run, cancelled=outcome == "cancelled")
                finally:
                    await run.writer.close()
        return outcome

    def _writer(self, job_id: str, attempt: int) -> EventWriter:
        flush_ms, flush_bytes = self.settings.delta_flush_ms, self.settings.delta_flush_bytes
        return EventWriter(self.store, job_id, attempt=attempt, flush_ms=flush_ms, flush_bytes=flush_bytes)

    async def _run_job(self, entry: QueueEntry, run: _JobRun, *, cancelled: bool) -> None:
        spec = self.registry.get(run.job.type)
        refusal = self._refusal(run, spec, cancelled)
        if refusal is not None:
            await self._finish(run, refusal)
            return
        assert spec is not None  # refused above otherwise
        if run.attempt > 1:
            self._counters.retried += 1
            job_transition("reclaimed", run.job.id, job_type=run.job.type, attempt=run.attempt)
        await self._execute(entry, spec, run)

    def _refusal(self, run: _JobRun, spec: HandlerSpec | None, cancelled: bool) -> Ending | None:
        """An ending decided before the handler runs: a cancel accepted for a job this worker
        reclaimed (its worker was lost or stopped after it started the job: a job cancelled while
        pending never reaches a worker, its cancel ends it at once), no handler on this worker, or
        lost with its worker and not safe (or no longer allowed) to retry."""
        if cancelled:
            return Ending.cancelled("cancelled_on_reclaim")
        if spec is None:
            return Ending.failed(f"No handler for job type '{run.job.type}' on this worker.", "no_handler")
        if run.attempt > 1 and (not spec.idempotent or run.attempt > self.settings.max_attempts):
            return Ending.failed(WORKER_LOST, "worker_lost")
        return None

    async def _execute(self, entry: QueueEntry, spec: HandlerSpec, run: _JobRun) -> None:
        ctx = JobContext(run.writer, run.job.type)
        if not await _announce(ctx):
            return
        job_transition("started", run.job.id, job_type=run.job.type, attempt=run.attempt)
        running = self._running[entry.entry_id]
        running.handler_task = asyncio.create_task(_call(spec, ctx, run.job.input))
        ending = await self._handler_ending(running, spec, run.job.id)
        if ending is not None:
            await self._finish(run, ending)

    async def _handler_ending(self, running: _Running, spec: HandlerSpec, job_id: str) -> Ending | None:
        """How the handler's run ended; None when the job ended elsewhere (deleted, say) meanwhile."""
        assert running.handler_task is not None
        try:
            result = await asyncio.shield(running.handler_task)
        except asyncio.CancelledError:
            if running.stop_requested:
                return Ending.cancelled()
            # The worker itself is shutting down: stop the handler and leave the job to be reclaimed.
            running.handler_task.cancel()
            raise
        except (JobNotFound, JobEnded):
            return None
        except Exception as exc:
            return _failure(spec, exc, job_id)
        try:
            return Ending.completed(result)
        except (TypeError, ValueError) as exc:  # json.dumps refuses it (a set, an object, a cycle, NaN...)
            logger.error("job %s (%s) returned a result that is not JSON", job_id, spec.name, exc_info=exc)
            sentry.capture(exc)
            return Ending.failed(RESULT_NOT_JSON)

    async def _finish(self, run: _JobRun, ending: Ending) -> None:
        """Every ending of a job goes through here (as arq's ``finish_job``): its final events are
        written, shielded so that cancellation cannot leave the job running, and durable on
        ``durable_end_replicas`` replicas when so configured; then it is logged, counted, timed and
        left as a Sentry breadcrumb, with the status Redis recorded (a cancel accepted before the
        write makes any ending `cancelled`). A shutdown waits for the write (see ``_drain``)."""
        task = asyncio.create_task(self._write_ending(run, ending), name=f"ending-{run.job.id}")
        running = self._running.get(run.entry.entry_id)
        if running is not None:
            running.ending = task
        await asyncio.shield(task)

    async def _write_ending(self, run: _JobRun, ending: Ending) -> None:
        replicas = self.settings.durable_end_replicas
        try:
            status = await run.writer.end(ending.outgoing(), replicas=replicas)
        except (JobNotFound, JobEnded):
            logger.info("job %s ended or was deleted elsewhere; its %s ending was not written", run.job.id, ending.kind)
            return
        self._counters.ended(status)
        _account(run, ending, status)


def _account(run: _JobRun, ending: Ending, status: JobStatus) -> None:
    """A job this worker ended: counted, timed, logged, and a breadcrumb (``metrics.job_ended``)."""
    fields: dict[str, Any] = {"ending": ending.kind, "attempt": run.attempt}
    if ending.reason is not None:
        fields["reason"] = ending.reason
    if status is not ending.status:
        fields["superseded"] = ending.status.value  # a cancel accepted before the ending was written
    metrics.job_ended(run.job.type, run.job.id, status.value, time.monotonic() - run.started, **fields)


async def _announce(ctx: JobContext) -> bool:
    """The run's first event: `running`, or a log line on a retry. False if the job ended meanwhile
    (cancelled while pending, or deleted)."""
    try:
        if ctx.attempt == 1:
            await ctx.emit("status", {"status": JobStatus.running.value})
        else:
            await ctx.log("retrying after its worker was lost", attempt=ctx.attempt)
    except (JobNotFound, JobEnded):
        return False
    return True


async def _call(spec: HandlerSpec, ctx: JobContext, raw_input: dict[str, Any]) -> Any:
    if spec.timeout_s is None:
        return await spec.run(ctx, raw_input)
    async with asyncio.timeout(spec.timeout_s):
        return await spec.run(ctx, raw_input)


def _failure(spec: HandlerSpec, exc: Exception, job_id: str) -> Ending:
    """What readers see of a failure: the handler's own JobFailed message, never internals."""
    if isinstance(exc, JobFailed):
        return Ending.failed(exc.message)
    if isinstance(exc, TimeoutError):
        return Ending.failed(f"The job timed out after {spec.timeout_s:g} s.", "timeout")
    if isinstance(exc, ValidationFailed):
        return Ending.failed("The job's input is not valid for this handler.")
    logger.error("job %s (%s) raised", job_id, spec.name, exc_info=exc)
    sentry.capture(exc)
    return Ending.failed("The job failed with an internal error.")


async def _wait_any(*events: asyncio.Event, timeout_s: float) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
