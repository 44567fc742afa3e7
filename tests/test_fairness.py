"""JOBSTREAM_MAX_RUNNING_PER_USER on a real Redis (and on a cluster): a user's jobs beyond the cap
wait, off the queue and without a worker spinning on them, then start oldest first as the user's
jobs end; other users' jobs pass; a killed worker's slot frees itself."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from redis.cluster import RedisCluster

from jobstream import keys
from jobstream.connection import RedisClient, create_client
from jobstream.fairness import SWEEP_EVERY_S, UserSlots
from jobstream.queue import QueueEntry, WorkQueue
from jobstream.registry import registry_for
from jobstream.settings import SettingsError, load_settings
from jobstream.store import JobRecord, JobStore
from jobstream.worker import Worker
from tests.conftest import ALICE, BOB, LiveStack, SyncRedis, append, create_job, make_settings
from tests.helpers import wait_until, wait_until_async

pytestmark = pytest.mark.on_cluster

#: A job that runs for a while and says little meanwhile.
LONG = {"steps": 3, "step_ms": 2000}


def _meta(rdb: SyncRedis, job: dict[str, Any]) -> dict[str, str]:
    fields: dict[str, str] = rdb.hgetall(keys.meta_key(job["id"]))
    return fields


def _status(rdb: SyncRedis, job: dict[str, Any]) -> str:
    return _meta(rdb, job).get("status", "")


def _wait_status(rdb: SyncRedis, job: dict[str, Any], status: str, timeout_s: float = 15) -> None:
    wait_until(
        lambda: _status(rdb, job) == status,
        timeout_s=timeout_s,
        interval_s=0.02,
        message=f"job {job['id']} never became {status}",
    )


def _waiting(rdb: SyncRedis, user: str) -> list[str]:
    waiting: list[str] = rdb.zrange(keys.user_key(user, "waiting"), 0, -1)
    return waiting


def _worker(stack: LiveStack) -> Any:
    assert stack.worker is not None
    return stack.worker


def test_cap_whenOneUsersJobsQueuedTogether_thenOneRunsAtATimeOldestFirstAndOthersPass(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack(max_running_per_user=1)
    with stack.client() as http:
        jobs = [create_job(http, "test.slow", input={"steps": 12, "step_ms": 100}) for _ in range(3)]
        _wait_status(rdb, jobs[0], "running")
        bobs = create_job(http, "test.slow", headers=BOB, input={"steps": 1, "step_ms": 10})
        for job in [bobs, *jobs]:
            _wait_status(rdb, job, "completed", timeout_s=30)
    alice = [_meta(rdb, job) for job in jobs]
    started = [int(meta["started_ms"]) for meta in alice]
    assert started == sorted(started), "alice's jobs did not start oldest first"
    for before, after in zip(alice, alice[1:], strict=False):
        gap_ms = int(after["started_ms"]) - int(before["completed_ms"])
        assert 0 <= gap_ms < 1000, f"the next job started {gap_ms} ms after the previous one ended"
    # Bob's job, created after alice's three, did not wait behind them.
    assert int(_meta(rdb, bobs)["started_ms"]) < int(alice[0]["completed_ms"])
    assert _worker(stack).parked == 2, "each job beyond the cap is parked once"
    assert all(meta["attempt"] == "1" for meta in alice)
    assert _waiting(rdb, "alice") == []


def _commands_served(rdb: SyncRedis) -> dict[str, int]:
    """Calls of each command so far, over every master (a cluster's replicas replay theirs)."""
    nodes = (
        [node.redis_connection for node in rdb.get_primaries() if node.redis_connection is not None]
        if isinstance(rdb, RedisCluster)
        else [rdb]
    )
    calls: dict[str, int] = {}
    for node in nodes:
        for name, stats in node.info("commandstats").items():
            calls[name] = calls.get(name, 0) + int(stats["calls"])
    return calls


def test_cap_whenJobsParkedThroughQuietPeriod_thenNoWorkerSpinsOnThem(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    # A short lease: the running job's slot would lapse (two leases) within the quiet period if
    # its worker did not renew it.
    stack = make_stack(max_running_per_user=1, worker_lease_s=2)
    with stack.client() as http:
        first = create_job(http, "test.slow", input={"steps": 3, "step_ms": 3000})
        parked = [create_job(http, "test.slow", input=LONG) for _ in range(3)]
        wait_until(lambda: _worker(stack).parked == 3, message="the jobs beyond the cap were not parked")
        _wait_status(rdb, first, "running")
        running = keys.user_key("alice", "running")
        lapse_before = rdb.zscore(running, first["id"])
        before = _commands_served(rdb)
        # On purpose: a quiet period longer than the sweep and than the slot's lapse, in which
        # nothing may happen to the parked jobs.
        time.sleep(SWEEP_EVERY_S * 2.5)
        after = _commands_served(rdb)
        assert _status(rdb, first) == "running"
        lapse_after = rdb.zscore(running, first["id"])
        assert lapse_before and lapse_after and lapse_after > lapse_before + 2000, "the slot was not renewed"
        assert _worker(stack).parked == 3
        assert [_status(rdb, job) for job in parked] == ["pending"] * 3
        assert _waiting(rdb, "alice") == [job["id"] for job in parked]
        # Parking made alice due at once (0); the worker's sweeps looked at her since.
        assert (rdb.zscore(keys.parked_key, "alice") or 0) > 0
    served = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    # A worker taking, parking or putting back jobs would ack and add queue entries.
    assert "cmdstat_xack" not in served and "cmdstat_xreadgroup" in served, served
    # One worker's rhythm (reads of the queue, cancel checks, renewals, reclaims, sweeps): a few
    # dozen commands a second, not a loop.
    assert sum(served.values()) < 300, served


def test_cap_whenWorkerKilledRunningCappedJob_thenSlotFreesWithinALeaseAndNextJobStarts(
    make_stack: Callable[..., LiveStack],
    worker_process: Callable[..., subprocess.Popen[bytes]],
    rdb: SyncRedis,
) -> None:
    lease = {"JOBSTREAM_WORKER_LEASE_S": "2", "JOBSTREAM_MAX_RUNNING_PER_USER": "1"}
    gateway = make_stack(with_worker=False)
    with gateway.client() as http:
        victim = worker_process(**lease)
        first = create_job(http, "test.slow", input={"steps": 400, "step_ms": 50})
        second = create_job(http, "test.slow", input={"steps": 2, "step_ms": 10})
        _wait_status(rdb, first, "running")
        wait_until(lambda: _waiting(rdb, "alice") == [second["id"]], message="the second job was not parked")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_ms = time.time_ns() // 1_000_000
        worker_process(**lease)
        _wait_status(rdb, second, "completed", timeout_s=20)
    lost, next_job = _meta(rdb, first), _meta(rdb, second)
    assert lost["status"] == "failed" and "worker lost" in lost["error"]
    # Freed when the dead worker's job was reclaimed (after its 2 s lease) and ended, not before.
    assert int(lost["completed_ms"]) <= int(next_job["started_ms"])
    freed_after_ms = int(next_job["started_ms"]) - killed_ms
    assert freed_after_ms < 6000, f"the slot took {freed_after_ms} ms to free"


def test_cap_whenWorkerStopsMidJob_thenHandedBackJobKeepsItsSlotUntilReclaimed(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, redis_url: str
) -> None:
    """A job handed back on shutdown is still `running`: its slot stays taken, so the worker that
    reclaims it retries it within the cap, and the waiting job starts only after it ends."""
    settings = make_settings(redis_url, max_running_per_user=1, shutdown_grace_s=0)
    with make_stack(with_worker=False).client() as http:
        first = create_job(http, "test.slow_idempotent", input={"steps": 30, "step_ms": 50})
        second = create_job(http, "test.slow", input={"steps": 1, "step_ms": 10})

    async def run_until(predicate: Callable[[Worker], bool], message: str) -> None:
        client = create_client(settings, blocking_reads=True)
        worker = Worker(settings, registry_for(settings), client, concurrency=2)
        task = asyncio.create_task(worker.run())
        try:
            await wait_until_async(lambda: predicate(worker), timeout_s=15, message=message)
        finally:
            worker.stop()
            await task
            await client.aclose()

    async def scenario() -> None:
        await run_until(
            lambda worker: worker.parked == 1 and _status(rdb, first) == "running", "the first job never ran"
        )
        assert _status(rdb, second) == "pending" and _waiting(rdb, "alice") == [second["id"]]
        assert rdb.zscore(keys.user_key("alice", "running"), first["id"]) is not None
        await run_until(lambda _: _status(rdb, second) == "completed", "the waiting job never ran")

    asyncio.run(scenario())
    retried, waited = _meta(rdb, first), _meta(rdb, second)
    assert retried["status"] == "completed" and retried["attempt"] == "2"
    assert int(retried["completed_ms"]) <= int(waited["started_ms"])


def test_slots_whenHolderDiesAndNoWorkerReclaims_thenSlotLapsesAndSweepPutsNextJobBack(redis_url: str) -> None:
    """The sweep's own path: the holder of the slot neither renews nor releases it, and no worker
    reclaims its job; the slot lapses (two leases) and a sweep, by another worker, puts the oldest
    waiting job back onto the queue; that job's end puts back the next at once."""

    async def scenario() -> None:
        settings = make_settings(redis_url, worker_lease_s=2, max_running_per_user=1)
        client = create_client(settings)
        try:
            store = JobStore(client, settings)
            dead_queue = WorkQueue(client, "dead")
            await dead_queue.ensure_group()
            first, second, third = [await _new_job(store) for _ in range(3)]
            taken = await dead_queue.take(3, block_ms=100)
            assert [entry.job_id for entry in taken] == [first, second, third]
            dead = UserSlots(client, dead_queue, settings)
            held_at = time.monotonic()
            assert (await dead.admit(taken[0])).owner == "alice"
            assert (await dead.admit(taken[1])).parked and (await dead.admit(taken[2])).parked
            assert await _queued(client, second) == []
            other = UserSlots(client, WorkQueue(client, "other"), settings)
            await other.sweep()
            assert await _queued(client, second) == [], "put back while its owner's slot was held"

            async def put_back() -> list[QueueEntry]:
                await other.sweep()
                return await _queued(client, second)

            requeued = await wait_until_async(
                put_back, timeout_s=15, interval_s=0.1, message="the waiting job was never put back"
            )
            assert time.monotonic() - held_at >= 3.9, "the slot lapsed before two leases"
            assert await _queued(client, third) == [], "more put back than slots freed"
            admitted = await other.admit(requeued[0])
            assert not admitted.parked and admitted.owner == "alice"
            # The run's end puts back the next job at once, without waiting for a sweep.
            await other.release(admitted)
            (last,) = await _queued(client, third)
            admitted = await other.admit(last)
            assert not admitted.parked
            await other.release(admitted)

            async def forgotten() -> bool:
                await other.sweep()
                return await client.zscore(keys.parked_key, "alice") is None

            await wait_until_async(
                forgotten, timeout_s=10, interval_s=0.1, message="a user with no waiting job stayed registered"
            )
        finally:
            await client.aclose()

    asyncio.run(scenario())


async def _new_job(store: JobStore) -> str:
    job_id = str(uuid.uuid4())
    await store.create(JobRecord.new(job_id=job_id, owner="alice", job_type="test.slow", input={}, ttl_s=600))
    return job_id


async def _queued(client: RedisClient, job_id: str) -> list[QueueEntry]:
    entries = await client.xrange(keys.queue_key)
    return [
        QueueEntry(entry_id, job_id, fields.get("owner")) for entry_id, fields in entries if fields["job"] == job_id
    ]


def test_cap_whenParkedJobCancelled_thenEndedAtOnceAndNeverStarted(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack(max_running_per_user=1)
    with stack.client() as http:
        first = create_job(http, "test.slow", input=LONG)
        cancelled, last = (create_job(http, "test.slow", input={"steps": 1, "step_ms": 10}) for _ in range(2))
        wait_until(lambda: _worker(stack).parked == 2, message="the jobs beyond the cap were not parked")
        assert http.post(f"/v1/jobs/{cancelled['id']}/cancel", headers=ALICE).status_code == 202
        assert _status(rdb, cancelled) == "cancelled"
        assert http.post(f"/v1/jobs/{first['id']}/cancel", headers=ALICE).status_code == 202
        _wait_status(rdb, last, "completed")
    assert "started_ms" not in _meta(rdb, cancelled) and _meta(rdb, cancelled)["attempt"] == "0"
    events = rdb.xrange(keys.events_key(cancelled["id"]))
    assert [fields["t"] for _, fields in events] == ["done"]
    assert _waiting(rdb, "alice") == []


def test_cap_whenExternalJobsRunning_thenTheyDoNotCount(make_stack: Callable[..., LiveStack], rdb: SyncRedis) -> None:
    stack = make_stack(max_running_per_user=1)
    with stack.client() as http:
        external = create_job(http)
        append(http, external, {"type": "delta", "data": {"text": "still going"}})
        assert _status(rdb, external) == "running"
        job = create_job(http, "test.slow", input={"steps": 1, "step_ms": 10})
        _wait_status(rdb, job, "completed")
        assert _status(rdb, external) == "running"
    assert _worker(stack).parked == 0


def test_cap_whenZero_thenJobsRunTogetherAndNothingIsKeptPerUser(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack()
    assert stack.settings.max_running_per_user == 0
    with stack.client() as http:
        jobs = [create_job(http, "test.slow", input={"steps": 20, "step_ms": 50}) for _ in range(3)]
        wait_until(lambda: all(_status(rdb, job) == "running" for job in jobs), message="the jobs did not run together")
        for job in jobs:
            _wait_status(rdb, job, "completed")
    assert _worker(stack).parked == 0
    assert not rdb.exists(keys.parked_key, *(keys.user_key("alice", name) for name in ("running", "waiting")))


def test_startAttempt_whenJobQueuedTwice_thenTheSecondEntryIsDroppedAndTheRunCarriesOn(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack(max_running_per_user=1)
    with stack.client() as http:
        job = create_job(http, "test.slow", input={"steps": 30, "step_ms": 20})
        _wait_status(rdb, job, "running")
        rdb.xadd(keys.queue_key, {"job": job["id"], "owner": "alice"})
        _wait_status(rdb, job, "completed")
        wait_until(lambda: rdb.xlen(keys.queue_key) == 0, message="an entry was left on the queue")
    meta = _meta(rdb, job)
    assert meta["attempt"] == "1" and "error" not in meta
    assert rdb.zcard(keys.user_key("alice", "running")) == 0


def test_settings_whenMaxRunningPerUserNotANonNegativeInteger_thenStartupRefused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().max_running_per_user == 0
    for bad in ("-1", "1.5", "two"):
        monkeypatch.setenv("JOBSTREAM_MAX_RUNNING_PER_USER", bad)
        with pytest.raises(SettingsError, match="JOBSTREAM_MAX_RUNNING_PER_USER"):
            load_settings()
    monkeypatch.setenv("JOBSTREAM_MAX_RUNNING_PER_USER", "3")
    assert load_settings().max_running_per_user == 3
