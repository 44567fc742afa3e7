"""How jobs end, continued, on a real Redis: an ending whose reply was lost is recognised when it is
retried, a shutdown lets an ending being written land, a result that is not JSON fails the job, a
failed background flush does not stop the ending, and endings written by the gateway (cancels of
pending and external jobs, an external job's result) are counted like a worker's."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import redis.exceptions
from prometheus_client import REGISTRY

from jobstream import JobContext, keys
from jobstream.connection import create_client
from jobstream.errors import JobEnded
from jobstream.models import JobStatus
from jobstream.registry import Registry
from jobstream.settings import Settings
from jobstream.store import Appended, JobRecord, JobStore, OutgoingEvent, done_event
from jobstream.worker import Worker
from tests.conftest import ALICE, LiveStack, append, create_job, make_settings, read_sse
from tests.helpers import wait_until_async

TERMINAL = ("completed", "failed", "cancelled")
WriteFn = Callable[..., Awaitable[Appended]]


def _finished(job_type: str, status: str) -> float:
    return REGISTRY.get_sample_value("jobstream_jobs_finished_total", {"type": job_type, "status": status}) or 0.0


def _timed(job_type: str) -> float:
    return REGISTRY.get_sample_value("jobstream_job_duration_seconds_count", {"type": job_type}) or 0.0


@contextmanager
def _counted(job_type: str, status: str) -> Iterator[Callable[[], tuple[float, float]]]:
    """Yields a function giving (endings counted, durations observed) for the type since entering."""
    before = (_finished(job_type, status), _timed(job_type))
    yield lambda: (_finished(job_type, status) - before[0], _timed(job_type) - before[1])


def _lines(caplog: pytest.LogCaptureFixture, job_id: str) -> list[logging.LogRecord]:
    """The job's transition lines after it started: its ending(s)."""
    return [
        r
        for r in caplog.records
        if r.name == "jobstream.jobs" and getattr(r, "job_id", None) == job_id and r.__dict__["event"] != "job.started"
    ]


def _record(job_id: str, job_type: str, input: dict[str, Any] | None = None) -> JobRecord:
    return JobRecord.new(job_id=job_id, owner="alice", job_type=job_type, input=input or {}, ttl_s=60)


async def _run_worker(
    settings: Settings,
    registry: Registry,
    job: JobRecord,
    *,
    patch_write: Callable[[WriteFn], WriteFn] | None = None,
    until: Callable[[Worker], Awaitable[None]] | None = None,
) -> Worker:
    """Create ``job``, run a worker (its store's write wrapped by ``patch_write``) until ``until``
    returns (by default: until the job has ended), then stop it and wait for it to stop."""
    client = create_client(settings, blocking_reads=True)
    worker = Worker(settings, registry, client, concurrency=2)
    if patch_write is not None:
        worker.store.write = patch_write(worker.store.write)  # type: ignore[method-assign]
    await worker.store.create(job)

    async def ended(_: Worker) -> None:
        async def status() -> bool:
            return await client.hget(keys.meta_key(job.id), "status") in TERMINAL

        await wait_until_async(status, timeout_s=5, message=f"job {job.id} never ended")

    task = asyncio.create_task(worker.run())
    try:
        await (until or ended)(worker)
    finally:
        worker.stop()
        await task
        await client.aclose()
    return worker


# --- 1. a retried ending is a repeat, not "ended elsewhere" ---------------------------------------


def test_appendScript_whenEndingBatchSentTwice_thenSecondIsARepeatWithHowTheJobEnded(
    redis_url: str, rdb: redis.Redis
) -> None:
    """What redis-py's Retry and EventWriter do after a lost reply: send the same batch again."""
    settings = make_settings(redis_url)

    async def scenario() -> list[Appended | str]:
        client = create_client(settings)
        store = JobStore(client, settings)
        await store.create(_record("job-r", "test.echo"))
        await store.write("job-r", [OutgoingEvent("status", '{"status":"running"}')], batch="1.1")
        ending = [OutgoingEvent("result", '{"x":1}'), done_event(JobStatus.completed)]
        replies: list[Appended | str] = [await store.write("job-r", ending, batch="1.2") for _ in range(2)]
        try:  # another batch after the ending is still refused
            await store.write("job-r", [OutgoingEvent("log", '{"message":"late"}')], batch="1.3")
        except JobEnded as exc:
            replies.append(str(exc))
        await client.aclose()
        return replies

    first, second, late = asyncio.run(scenario())
    assert isinstance(first, Appended) and first.status is JobStatus.completed and len(first.ids) == 2
    assert second == Appended([], JobStatus.completed)
    assert late == "The job has already ended (completed)."
    assert [fields["t"] for _, fields in rdb.xrange(keys.events_key("job-r"))] == ["status", "result", "done"]


def test_worker_whenEndingReplyLost_thenItsRetryCountsAndLogsTheEndingOnce(
    redis_url: str, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The ending reaches Redis but its reply is lost (a timeout): the retry is a repeat, and the
    ending is counted, timed and logged as the worker's, once."""
    settings = make_settings(redis_url)
    registry = Registry()

    async def quick(ctx: JobContext, input: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    registry.register("more.lost_reply", quick)
    lost: list[str] = []

    def lose_ending_reply(write: WriteFn) -> WriteFn:
        async def lossy(job_id: str, events: Sequence[OutgoingEvent], **kwargs: Any) -> Appended:
            appended = await write(job_id, events, **kwargs)
            if events[-1].type == "done" and not lost:
                lost.append(kwargs["batch"])
                raise redis.exceptions.TimeoutError("Timeout reading from socket")
            return appended

        return lossy

    caplog.set_level(logging.INFO, logger="jobstream")
    with _counted("more.lost_reply", "completed") as counted:
        asyncio.run(
            _run_worker(settings, registry, _record("job-lost", "more.lost_reply"), patch_write=lose_ending_reply)
        )
        assert lost, "the ending was never written"
        assert counted() == (1, 1)
    assert [r.__dict__["event"] for r in _lines(caplog, "job-lost")] == ["job.completed"]
    assert not [r for r in caplog.records if "ended or was deleted elsewhere" in r.getMessage()]
    assert rdb.hget(keys.meta_key("job-lost"), "status") == "completed"


# --- 2. a shutdown lets an ending being written land --------------------------------------------


def test_worker_whenStoppedWhileAnEndingIsBeingWritten_thenItLandsAndTheJobIsNotHandedBack(
    redis_url: str, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler has returned; its ending's write is slow (Redis failing over, say) and still
    under way when the shutdown grace is over. The worker waits for it instead of handing the job
    back to be run again or failed `worker lost`."""
    grace_s = 0.2
    settings = make_settings(redis_url, shutdown_grace_s=grace_s)
    registry = Registry()

    async def quick(ctx: JobContext, input: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    registry.register("more.slow_ending", quick)
    ending_started = asyncio.Event()

    def drain_started() -> bool:
        return any("waiting up to" in r.getMessage() for r in caplog.records if r.name == "jobstream.worker")

    def slow_ending(write: WriteFn) -> WriteFn:
        async def slow(job_id: str, events: Sequence[OutgoingEvent], **kwargs: Any) -> Appended:
            if events[-1].type == "done":
                ending_started.set()
                await wait_until_async(drain_started, message="the worker never began its shutdown")
                await asyncio.sleep(grace_s + 0.3)  # the write outlasts the grace: what this test is about
            return await write(job_id, events, **kwargs)

        return slow

    async def stop_during_ending(worker: Worker) -> None:
        await asyncio.wait_for(ending_started.wait(), timeout=5)

    caplog.set_level(logging.INFO, logger="jobstream")
    with _counted("more.slow_ending", "completed") as counted:
        asyncio.run(
            _run_worker(
                settings,
                registry,
                _record("job-slow-ending", "more.slow_ending"),
                patch_write=slow_ending,
                until=stop_during_ending,
            )
        )
        # By the time `run` returned: written, counted, and off the queue (not handed back, not leased).
        assert rdb.hget(keys.meta_key("job-slow-ending"), "status") == "completed"
        assert counted() == (1, 1)
    assert rdb.xpending(keys.queue_key, keys.queue_group)["pending"] == 0
    assert rdb.xlen(keys.queue_key) == 0
    assert not [r for r in caplog.records if "handed back" in r.getMessage()]


def test_worker_whenStoppedWhileAHandlerStillRuns_thenItsJobIsHandedBackAsLapsed(
    redis_url: str, rdb: redis.Redis
) -> None:
    """The other side of the above: a handler still running when the grace is over is stopped and
    its job handed back, ready for the next reclaim, without an ending."""
    settings = make_settings(redis_url, shutdown_grace_s=0.2)
    registry = Registry()
    started = asyncio.Event()

    async def endless(ctx: JobContext, input: dict[str, Any]) -> None:
        started.set()
        await asyncio.Event().wait()

    registry.register("more.endless", endless)

    async def stop_while_running(worker: Worker) -> None:
        await asyncio.wait_for(started.wait(), timeout=5)

    with _counted("more.endless", "failed") as counted:
        asyncio.run(_run_worker(settings, registry, _record("job-endless", "more.endless"), until=stop_while_running))
        assert counted() == (0, 0)
    assert rdb.hget(keys.meta_key("job-endless"), "status") == "running"
    [entry] = rdb.xpending_range(keys.queue_key, keys.queue_group, min="-", max="+", count=10)
    assert entry["time_since_delivered"] >= settings.worker_lease_s * 1000


# --- 3. a result that is not JSON fails the job ---------------------------------------------------


def test_worker_whenResultIsNotJson_thenTheJobFailsWithAClearMessageAndTheErrorIsLogged(
    redis_url: str, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(redis_url)
    registry = Registry()

    async def returns_a_set(ctx: JobContext, input: dict[str, Any]) -> dict[str, Any]:
        await ctx.delta("some text")
        return {"tags": {"a", "b"}}

    registry.register("more.not_json", returns_a_set)
    caplog.set_level(logging.INFO, logger="jobstream")
    with _counted("more.not_json", "failed") as counted:
        asyncio.run(_run_worker(settings, registry, _record("job-not-json", "more.not_json")))
        assert counted() == (1, 1)
    stream = [(fields["t"], json.loads(fields["d"])) for _, fields in rdb.xrange(keys.events_key("job-not-json"))]
    assert stream[-3:] == [
        ("delta", {"text": "some text"}),
        ("failure", {"message": "The job's result is not JSON."}),
        ("done", {"status": "failed"}),
    ]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "job-not-json" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info and isinstance(errors[0].exc_info[1], TypeError)
    [ending] = _lines(caplog, "job-not-json")
    assert ending.__dict__["event"] == "job.failed" and ending.__dict__["reason"] == "The job's result is not JSON."


# --- 4. endings written by the gateway are counted like a worker's ----------------------------------


def test_gatewayEndings_whenCancelOfPendingOrExternalJobOrExternalResult_thenCountedTimedAndLogged(
    make_stack: Callable[..., LiveStack], caplog: pytest.LogCaptureFixture
) -> None:
    stack = make_stack(with_worker=False, demo=True)  # nothing takes demo.story: it stays pending
    caplog.set_level(logging.INFO, logger="jobstream.jobs")
    with (
        stack.client() as client,
        _counted("demo.story", "cancelled") as pending_cancelled,
        _counted("external", "cancelled") as external_cancelled,
        _counted("external", "completed") as external_completed,
    ):
        pending = create_job(client, "demo.story", input={"words": 3})
        cancelled = create_job(client)
        append(client, cancelled, {"type": "delta", "data": {"text": "a"}})
        finished = create_job(client)
        append(client, finished, {"type": "delta", "data": {"text": "a"}})
        for job in (pending, cancelled):
            assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE).status_code == 202
        append(client, finished, {"type": "result", "data": {"n": 1}})
        for job, status in ((pending, "cancelled"), (cancelled, "cancelled"), (finished, "completed")):
            _, events = read_sse(client, job)
            assert events[-1].json() == {"status": status}
        # (counted with the status, durations of the type): the two external jobs share the type's histogram.
        assert (pending_cancelled(), external_cancelled(), external_completed()) == ((1, 1), (1, 2), (1, 2))
        # Ended once: a second cancel (409) or a late append (409) counts nothing more.
        assert client.post(f"/v1/jobs/{pending['id']}/cancel", headers=ALICE).status_code == 409
        late = client.post(f"/v1/jobs/{finished['id']}/events", json={"type": "log", "data": {}}, headers=ALICE)
        assert late.status_code == 409
        assert (pending_cancelled(), external_cancelled(), external_completed()) == ((1, 1), (1, 2), (1, 2))
    lines = {job["id"]: _lines(caplog, job["id"]) for job in (pending, cancelled, finished)}
    assert {job_id: [r.__dict__["event"] for r in found] for job_id, found in lines.items()} == {
        pending["id"]: ["job.created", "job.queued", "job.cancelled"],
        cancelled["id"]: ["job.created", "job.cancelled"],
        finished["id"]: ["job.created", "job.completed"],
    }
    endings = {job_id: found[-1].__dict__ for job_id, found in lines.items()}
    assert endings[pending["id"]]["ending"] == endings[cancelled["id"]]["ending"] == "cancelled_by_gateway"
    assert endings[finished["id"]]["ending"] == "external"
    assert endings[pending["id"]]["duration_s"] == 0  # it never started
    assert all(ending["duration_s"] >= 0 for ending in endings.values())


# --- 5. a failed background flush does not stop the ending ------------------------------------------


def test_worker_whenABackgroundFlushFailedJustBeforeTheHandlerReturns_thenTheEndingIsStillWritten(
    redis_url: str, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The flush timer's write fails for good (an outage longer than the producer rides out, made
    instant here); the handler returns before it calls the writer again. Its ending is written at
    once, not left to the lease to fail the job `worker lost`."""
    monkeypatch.setattr("jobstream.producer.OUTAGE_S", 0.0)  # the failing flush gives up at once
    settings = make_settings(redis_url, delta_flush_ms=20)
    registry = Registry()
    flush_failed = asyncio.Event()

    async def returns_after_failed_flush(ctx: JobContext, input: dict[str, Any]) -> dict[str, Any]:
        await ctx.delta("lost with its batch")
        await asyncio.wait_for(flush_failed.wait(), timeout=5)  # the timer's flush has run, and failed
        return {"ok": True}

    registry.register("more.failed_flush", returns_after_failed_flush)

    def fail_the_delta_batch(write: WriteFn) -> WriteFn:
        async def failing(job_id: str, events: Sequence[OutgoingEvent], **kwargs: Any) -> Appended:
            if all(event.type == "delta" for event in events) and not flush_failed.is_set():
                flush_failed.set()
                raise redis.exceptions.ConnectionError("Connection refused")
            return await write(job_id, events, **kwargs)

        return failing

    caplog.set_level(logging.INFO, logger="jobstream")
    with _counted("more.failed_flush", "completed") as counted:
        asyncio.run(
            _run_worker(
                settings, registry, _record("job-failed-flush", "more.failed_flush"), patch_write=fail_the_delta_batch
            )
        )
        assert counted() == (1, 1)
    stream = [(fields["t"], fields["d"]) for _, fields in rdb.xrange(keys.events_key("job-failed-flush"))]
    assert [kind for kind, _ in stream] == ["status", "result", "done"]
    assert any("could not be written" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
