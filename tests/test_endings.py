"""How jobs end, on a real Redis: an accepted cancel always wins (the ending script turns a
worker's completed or failed ending into `cancelled`; a cancel after `done` answers 409), and every
way a worker can end a job is written, logged, counted, timed and left as a breadcrumb in one place."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import connect_sse
from prometheus_client import REGISTRY

from jobstream import JobContext, keys
from jobstream.connection import create_client
from jobstream.errors import ValidationFailed
from jobstream.models import JobStatus
from jobstream.producer import EventWriter
from jobstream.registry import Registry, default_registry
from jobstream.settings import Settings
from jobstream.store import JobRecord, JobStore, OutgoingEvent, done_event
from jobstream.worker import Worker
from tests.conftest import ALICE, create_job, make_settings, read_sse

# --- item 5: an accepted cancel ends `cancelled` -----------------------------------------------------


@pytest.mark.on_cluster
def test_cancel_whenRacingShortJobsAtVariedMoments_thenEvery202EndsCancelledAndEvery409HadEnded(
    demo_client: httpx.Client,
) -> None:
    """40 stories. 32 of three words (about 60 ms each), each cancelled 0 to 150 ms after its
    create: many cancels land while the story is running and about to write its result, the race
    that used to answer 202 and still end `completed`. On a loaded machine that spread alone may
    put every cancel before the start or after the end, so the other 8 (every fifth, three slow
    words) are cancelled only once a reader has seen their first delta: those are cancelled mid-run."""
    outcomes: list[tuple[dict[str, Any], httpx.Response, int]] = []
    observed: set[str] = set()
    for index in range(40):
        if index % 5 == 4:
            job = create_job(demo_client, "demo.story", input={"words": 3, "delay_ms": 1000})
            _read_until_delta(demo_client, job)
            observed.add(job["id"])
        else:
            job = create_job(demo_client, "demo.story", input={"words": 3, "delay_ms": 20})
            time.sleep(index * 0.150 / 39)  # the moment of the cancel is what varies
        response = demo_client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
        outcomes.append((job, response, time.time_ns() // 1_000_000))
    raced = 0
    for job, response, answered_ms in outcomes:
        _, events = read_sse(demo_client, job)
        types = [event.event for event in events]
        view = demo_client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()
        assert types[-1] == "done" and types.count("done") == 1
        if job["id"] in observed:  # a second of story left when its cancel was sent
            assert response.status_code == 202 and "delta" in types, (response.text, types)
        if response.status_code == 202:
            assert events[-1].json() == {"status": "cancelled"}, (types, view)
            assert "result" not in types and "failure" not in types, types
            assert view["status"] == "cancelled" and view["result"] is None and view["error"] is None
            raced += "delta" in types
        else:
            assert response.status_code == 409, response.text
            # It had ended before the cancel arrived: `done` was appended before the 409 was read.
            assert int(events[-1].id.split("-")[0]) <= answered_ms
            assert view["status"] == events[-1].json()["status"] == "completed"
            assert f"({view['status']})" in response.json()["detail"]
    # The window that matters was exercised: cancels accepted while the story was writing.
    assert raced >= len(observed) == 8, "no cancel landed while a story was running"


def _read_until_delta(client: httpx.Client, job: dict[str, Any]) -> None:
    """Follow the job's events until its first delta: the story is running."""
    with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", params={"token": job["token"]}) as source:
        if any(event.event == "delta" for event in source.iter_sse()):
            return
    raise AssertionError("the story ended without a delta")


def test_cancel_whenExternalJob_thenEndsAtOnceAndProducerGets409(client: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(client)
    url = f"/v1/jobs/{job['id']}"
    assert client.post(f"{url}/events", json={"type": "delta", "data": {"text": "a"}}, headers=ALICE).status_code == 201
    assert client.post(f"{url}/cancel", headers=ALICE).status_code == 202
    # No worker holds an external job: the cancel itself wrote its end, so no result can follow.
    late = client.post(f"{url}/events", json={"type": "result", "data": {"x": 1}}, headers=ALICE)
    assert late.status_code == 409
    _, events = read_sse(client, job)
    assert [e.event for e in events] == ["status", "delta", "done"] and events[-1].json() == {"status": "cancelled"}
    assert client.get(url, headers=ALICE).json()["result"] is None
    assert client.post(f"{url}/cancel", headers=ALICE).status_code == 409


def test_appendScript_whenCancelFlaggedBeforeEnding_thenEndingTurnsCancelledWithoutResult(
    redis_url: str, rdb: redis.Redis
) -> None:
    """The ending script itself decides: a worker's result (or failure) that reaches Redis after a
    cancel was accepted is dropped, and `done` says cancelled; text written with it is kept."""
    settings = make_settings(redis_url)
    endings = {"job-completed": ("result", '{"x":1}'), "job-failed": ("failure", '{"message":"no"}')}

    async def scenario() -> dict[str, JobStatus]:
        client = create_client(settings)
        store = JobStore(client, settings)
        written = {}
        for job_id, (kind, data) in endings.items():
            await store.create(JobRecord.new(job_id=job_id, owner="alice", job_type="test.echo", input={}, ttl_s=60))
            await store.append(job_id, [OutgoingEvent("status", '{"status":"running"}')])
            rdb.hset(keys.meta_key(job_id), "cancel", "1")  # what an accepted cancel leaves
            status = JobStatus(job_id.removeprefix("job-"))
            ending = [OutgoingEvent("delta", '{"text":"t"}'), OutgoingEvent(kind, data), done_event(status)]
            written[job_id] = (await store.write(job_id, ending)).status
        await client.aclose()
        return written

    assert asyncio.run(scenario()) == dict.fromkeys(endings, JobStatus.cancelled)
    for job_id in endings:
        stream = [(fields["t"], fields["d"]) for _, fields in rdb.xrange(keys.events_key(job_id))]
        assert [kind for kind, _ in stream] == ["status", "delta", "done"], job_id
        assert json.loads(stream[-1][1]) == {"status": "cancelled"}
        meta = rdb.hgetall(keys.meta_key(job_id))
        assert meta["status"] == "cancelled" and "result" not in meta and "error" not in meta


# --- item 6: every ending goes through one place ------------------------------------------------------


#: kind -> (the test handler its job type runs, input, the status it ends with, meta fields set
#: before any worker takes it). Each kind has a job type of its own, ``endings.<kind>``.
_KINDS: dict[str, tuple[str | None, dict[str, Any], str, dict[str, str]]] = {
    "completed": ("test.echo", {"result": {"ok": True}}, "completed", {}),
    "failed": ("test.refuse", {}, "failed", {}),
    "timeout": ("test.timeout", {}, "failed", {}),
    "cancelled": ("test.slow", {"steps": 400, "step_ms": 20}, "cancelled", {}),
    # Its worker died after the cancel was accepted: the next one ends it without running it.
    "cancelled_on_reclaim": ("test.slow", {}, "cancelled", {"status": "running", "attempt": "1", "cancel": "1"}),
    # No worker knows the type.
    "no_handler": (None, {}, "failed", {}),
    # Its worker died mid-run and the handler is not idempotent.
    "worker_lost": ("test.slow", {}, "failed", {"status": "running", "attempt": "1"}),
    # The cancel is accepted after the handler returned, before its ending reached Redis.
    "superseded": (None, {}, "cancelled", {}),
}


def _registry(superseded: Callable[..., Any]) -> Registry:
    registry = Registry()
    for kind, (base, _, _, _) in _KINDS.items():
        spec = default_registry.get(base) if base else None
        if spec is not None:
            registry.register(f"endings.{kind}", spec.func, idempotent=spec.idempotent, timeout_s=spec.timeout_s)
    registry.register("endings.superseded", superseded)
    return registry


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _metrics(kind: str) -> tuple[float, float]:
    """(jobs finished with the kind's status, durations observed) for the kind's job type."""
    job_type, status = f"endings.{kind}", _KINDS[kind][2]
    return (
        _sample("jobstream_jobs_finished_total", type=job_type, status=status),
        _sample("jobstream_job_duration_seconds_count", type=job_type),
    )


def _run_worker(settings: Settings, registry: Registry, rdb: redis.Redis) -> None:
    """Run a worker in this thread until every job has ended, cancelling 'job-cancelled' once it runs."""
    metas = [keys.meta_key(f"job-{kind}") for kind in _KINDS]

    def ended() -> bool:
        return all(rdb.hget(meta, "status") in ("completed", "failed", "cancelled") for meta in metas)

    async def scenario() -> None:
        client = create_client(settings, blocking_reads=True)
        worker = Worker(settings, registry, client, concurrency=len(metas))
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 20
        while not ended():
            assert time.monotonic() < deadline, {meta: rdb.hgetall(meta) for meta in metas}
            if rdb.hget(keys.meta_key("job-cancelled"), "status") == "running":
                rdb.hset(keys.meta_key("job-cancelled"), "cancel", "1")
            await asyncio.sleep(0.05)
        worker.stop()
        await task
        await client.aclose()

    asyncio.run(scenario())


def _create_jobs(settings: Settings) -> None:
    async def create_all() -> None:
        client = create_client(settings)
        store = JobStore(client, settings)
        for kind, (_, job_input, _, preset) in _KINDS.items():
            record = JobRecord.new(
                job_id=f"job-{kind}", owner="alice", job_type=f"endings.{kind}", input=job_input, ttl_s=60
            )
            await store.create(JobRecord({**record.fields, **preset}))
        await client.aclose()

    asyncio.run(create_all())


def _problems(
    kind: str,
    counted: tuple[float, float],
    lines: list[dict[str, Any]],
    crumbs: list[tuple[str, str, dict[str, Any]]],
    rdb: redis.Redis,
) -> list[str]:
    """What is missing from one kind's ending."""
    job_id, status = f"job-{kind}", _KINDS[kind][2]
    problems = []
    if counted != (1, 1):
        problems.append(f"finished/timed {counted}")
    endings = [line for line in lines if line["job_id"] == job_id and line["event"] not in ("job.started",)]
    if [line["event"] for line in endings] != [f"job.{status}"]:
        problems.append(f"log lines {[line['event'] for line in endings]}")
    elif endings[0].get("ending") != ("completed" if kind == "superseded" else kind):
        problems.append(f"ending field {endings[0].get('ending')!r}")
    if not any(crumb[:2] == (status, job_id) for crumb in crumbs):
        problems.append("no breadcrumb")
    done = rdb.xrevrange(keys.events_key(job_id), count=1)[0][1]
    if json.loads(done["d"]) != {"status": status}:
        problems.append(f"done {done['d']}")
    return problems


def test_endings_whenEveryKind_thenEachWrittenLoggedCountedTimedAndBreadcrumbed(
    redis_url: str, rdb: redis.Redis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(redis_url)

    async def superseded(ctx: JobContext, input: dict[str, Any]) -> dict[str, int]:
        rdb.hset(keys.meta_key(ctx.job_id), "cancel", "1")  # no await after it: the handler returns first
        return {"value": 1}

    crumbs: list[tuple[str, str, dict[str, Any]]] = []
    monkeypatch.setattr(
        "jobstream.sentry.job_breadcrumb", lambda transition, job, **data: crumbs.append((transition, job, data))
    )
    caplog.set_level(logging.INFO, logger="jobstream.jobs")
    before = {kind: _metrics(kind) for kind in _KINDS}
    _create_jobs(settings)
    _run_worker(settings, _registry(superseded), rdb)

    lines = [dict(r.__dict__) for r in caplog.records if r.name == "jobstream.jobs" and hasattr(r, "event")]
    counted = {kind: tuple(a - b for a, b in zip(_metrics(kind), before[kind], strict=True)) for kind in _KINDS}
    problems = {kind: _problems(kind, counted[kind], lines, crumbs, rdb) for kind in _KINDS}
    assert {kind: found for kind, found in problems.items() if found} == {}
    by_job = {line["job_id"]: line for line in lines if line["event"] != "job.started"}
    assert by_job["job-superseded"]["superseded"] == "completed"
    assert by_job["job-worker_lost"]["reason"] == "worker lost"
    assert "No handler" in by_job["job-no_handler"]["reason"]
    assert by_job["job-timeout"]["duration_s"] >= 0.3


def test_jobContext_whenHandlerAuthorsLook_thenOnlyTheirApiWithDocstrings() -> None:
    public = {name for name in dir(JobContext) if not name.startswith("_")}
    assert public == {
        "job_id",
        "job_type",
        "attempt",
        "delta",
        "reasoning",
        "tool_call",
        "tool_result",
        "progress",
        "log",
        "emit",
        "flush",
    }
    for name in public:
        assert getattr(JobContext, name).__doc__, name
    for name in ("delta", "reasoning", "tool_call", "tool_result", "progress", "log", "emit"):
        assert ":param" in (getattr(JobContext, name).__doc__ or ""), name
    # A handler ends its job by returning or raising: `done` is the worker's to write.
    ctx = JobContext(EventWriter(None, "job-x"), "test.echo")  # type: ignore[arg-type]
    with pytest.raises(ValidationFailed):
        asyncio.run(ctx.emit("done", {"status": "completed"}))
