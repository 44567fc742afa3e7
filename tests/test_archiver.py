"""Archiving by workers (archiver.py): every job that ends is copied into the archive, with its
status document and every event; Redis keeps it until then, whatever the archive's state; a batch
retried after a crash duplicates nothing; a job deleted before its copy is not archived; the
archive's retention deletes old jobs. On both stores (SQLite file, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobstream import archiver, keys, outbox
from jobstream.archive import ArchivedJob, open_archive
from jobstream.archiver import Archiver
from jobstream.connection import create_client
from jobstream.models import iso
from jobstream.outbox import Outbox, Record
from jobstream.store import StoredEvent, now_ms
from tests.conftest import ALICE, LiveStack, SyncRedis, append, create_job, make_settings
from tests.helpers import wait_until, wait_until_async

ENDING = [
    {"type": "delta", "data": {"text": "Hello, "}},
    {"type": "delta", "data": {"text": "world"}},
    {"type": "progress", "data": {"current": 1, "total": 1}},
    {"type": "result", "data": {"answer": 42, "nested": {"é": [1, 2.5, None]}}},
]


def archived(url: str, job_id: str) -> ArchivedJob | None:
    """The job as the archive holds it, events and all (None: not there)."""

    async def read() -> ArchivedJob | None:
        archive = open_archive(url)
        try:
            await archive.migrate()  # idempotent: the archiver may not have made the schema yet
            found = await archive.get(job_id)
            if found is None:
                return None
            return ArchivedJob(found.fields, await archive.events(job_id, None, 100_000))
        finally:
            await archive.close()

    return asyncio.run(read())


def redis_events(rdb: SyncRedis, job_id: str) -> list[StoredEvent]:
    return [StoredEvent(entry_id, f["t"], f["d"]) for entry_id, f in rdb.xrange(keys.events_key(job_id))]


def status_of(http: httpx.Client, job_id: str) -> dict[str, Any]:
    response = http.get(f"/v1/jobs/{job_id}", headers=ALICE)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries of an archive that is down come within a second (the real cap is 20 s)."""
    monkeypatch.setattr(archiver, "FIRST_BACKOFF_S", 0.2)
    monkeypatch.setattr(archiver, "MAX_BACKOFF_S", 0.5)


def test_endedJob_isArchived_withItsStatusDocumentAndEveryEvent_thenExpiresFromRedisAsBefore(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, archive_url: str
) -> None:
    stack = make_stack(archive_url=archive_url, retention_s=600, snapshot_max_bytes=1000)
    with stack.client() as http:
        job = create_job(http, "external", tags=["chat:1"], metadata={"who": "me"})
        assert status_of(http, job["id"])["archived"] is False
        append(http, job, ENDING)
        wait_until(lambda: status_of(http, job["id"])["archived"] is True, timeout_s=20, interval_s=0.1)
        document = status_of(http, job["id"])
    meta = rdb.hgetall(keys.meta_key(job["id"]))
    stored = archived(archive_url, job["id"])
    assert stored is not None
    # Everything Redis holds, kept as given (JSON not re-encoded), but where the archive differs.
    differing = {"expires_ms", "archived", "kept_ms", "output_text"}
    assert {k: v for k, v in stored.fields.items() if k not in differing} == {
        k: v for k, v in meta.items() if k not in differing
    }
    assert stored.fields["archived"] == "1" and stored.fields["output_text"] == "Hello, world"
    assert stored.events == redis_events(rdb, job["id"])
    assert [e.type for e in stored.events] == ["status", "delta", "delta", "progress", "result", "done"]
    # The archive keeps it for its retention (30 days by default) from the job's end.
    assert int(stored.fields["expires_ms"]) == int(meta["completed_ms"]) + 30 * 86_400_000
    # Redis gives it back the expiry it had before it was kept for the archive, which its status
    # document showed all along.
    assert document["expires_at"] == iso(int(meta["completed_ms"]) + 600_000)
    assert int(meta["expires_ms"]) == int(meta["completed_ms"]) + 600_000
    assert 590 <= rdb.ttl(keys.meta_key(job["id"])) <= 600
    assert 590 <= rdb.ttl(keys.events_key(job["id"])) <= 600


@pytest.mark.on_cluster
def test_workerJobs_whenEnded_thenArchived_onEveryRedis(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    stack = make_stack(archive_url=url)
    with stack.client() as http:
        echo = create_job(http, "test.echo", input={"events": [{"type": "log", "data": {"n": 1}}], "result": {"ok": 1}})
        boom = create_job(http, "test.boom")
        for job in (echo, boom):
            wait_until(lambda job=job: status_of(http, job["id"])["archived"] is True, timeout_s=20, interval_s=0.1)
    for job, status in ((echo, "completed"), (boom, "failed")):
        stored = archived(url, job["id"])
        assert stored is not None and stored.status == status
        assert stored.events == redis_events(rdb, job["id"])
    # Both consumers' work is done: nothing of the outbox is left behind.
    wait_until(lambda: not rdb.exists(keys.outbox_state_key(echo["id"])), timeout_s=10, interval_s=0.1)
    assert not rdb.zscore(keys.outbox_due_key("archive"), echo["id"])


def test_archiveDown_jobStaysInRedisPastItsRetention_thenArchivedWhenItReturns(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, tmp_path: Path, fast_retries: None
) -> None:
    folder = tmp_path / "not-yet"
    url = f"sqlite:///{folder / 'archive.db'}"  # a missing directory: the archive cannot be opened
    stack = make_stack(archive_url=url, retention_s=1, failed_retention_s=1)
    with stack.client() as http:
        job = create_job(http, "external")
        append(http, job, ENDING)
        ended = time.monotonic()
        # Past its 1 s retention, Redis keeps it: the archive does not hold it yet.
        wait_until(lambda: time.monotonic() - ended > 3, timeout_s=10, interval_s=0.1)
        document = status_of(http, job["id"])
        assert document["status"] == "completed" and document["archived"] is False
        assert rdb.ttl(keys.meta_key(job["id"])) > 86_400
        assert redis_events(rdb, job["id"])[-1].type == "done"
        text = http.get("/metrics").text
        assert "jobstream_archive_pending_jobs 1.0" in text
        assert float(text.split("\njobstream_archive_oldest_pending_age_seconds ")[1].split()[0]) >= 3
        assert float(text.split("\njobstream_archive_failures_total ")[1].split()[0]) >= 1
        folder.mkdir()  # the archive is back
        wait_until(lambda: archived(url, job["id"]) is not None, timeout_s=60, interval_s=0.1)
        # Archived, its Redis retention long past: Redis lets it go at once.
        wait_until(
            lambda: not rdb.exists(keys.meta_key(job["id"]), keys.events_key(job["id"])), timeout_s=10, interval_s=0.1
        )
        wait_until(lambda: "jobstream_archive_pending_jobs 0.0" in http.get("/metrics").text)
    stored = archived(url, job["id"])
    assert stored is not None and [e.type for e in stored.events][-1] == "done"


def test_jobDeletedBeforeArchived_isNotArchived(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, tmp_path: Path, fast_retries: None
) -> None:
    folder = tmp_path / "later"
    url = f"sqlite:///{folder / 'archive.db'}"
    stack = make_stack(archive_url=url)
    with stack.client() as http:
        kept, deleted = create_job(http, "external"), create_job(http, "external")
        for job in (kept, deleted):
            append(http, job, ENDING)
        assert http.delete(f"/v1/jobs/{deleted['id']}", headers=ALICE).status_code == 204
        folder.mkdir()
        wait_until(lambda: archived(url, kept["id"]) is not None, timeout_s=60, interval_s=0.1)
        wait_until(lambda: not rdb.exists(keys.outbox_state_key(deleted["id"])), timeout_s=10, interval_s=0.1)
    assert archived(url, deleted["id"]) is None


def test_batchRetriedAfterACrash_duplicatesNothing(
    make_stack: Callable[..., LiveStack],
    rdb: SyncRedis,
    archive_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(archiver, "LEASE_MS", 300)
    stack = make_stack(archive_url=archive_url, with_worker=False)
    with stack.client() as http:
        jobs = [create_job(http, "external") for _ in range(3)]
        for job in jobs:
            append(http, job, ENDING)

    async def crash_then_retry() -> None:
        settings = make_settings(redis_url, archive_url=archive_url)
        client = create_client(settings)
        archive = open_archive(archive_url)
        try:
            # Stored, then the process dies before it marks and settles anything.
            crashing = Archiver(client, settings, archive)

            async def die(*args: Any, **kwargs: Any) -> None:
                raise ConnectionError("killed")

            monkeypatch.setattr(crashing, "_done", die)
            with pytest.raises(ConnectionError):
                await crashing.run_once()
            assert all([await archive.get(job["id"]) is not None for job in jobs])
            assert rdb.hget(keys.meta_key(jobs[0]["id"]), "archived") == "0"
            # Another process takes the jobs once the lease lapses, and stores them again.
            again = Archiver(client, settings, archive)
            deadline = time.monotonic() + 10
            while await again.run_once() < len(jobs) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await archive.close()
            await client.aclose()

    asyncio.run(crash_then_retry())
    for job in jobs:
        stored = archived(archive_url, job["id"])
        assert stored is not None
        assert stored.events == redis_events(rdb, job["id"])  # each once
        assert rdb.hget(keys.meta_key(job["id"]), "archived") == "1"


def test_archiveRetention_deletesOldJobs(
    make_stack: Callable[..., LiveStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archiver, "SWEEP_EVERY_S", 0.5)
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    # 2 s of archive retention.
    stack = make_stack(archive_url=url, archive_retention_days=2 / 86_400)
    with stack.client() as http:
        job = create_job(http, "external")
        append(http, job, ENDING)
        wait_until(lambda: archived(url, job["id"]) is not None, timeout_s=20, interval_s=0.1)
        wait_until(lambda: archived(url, job["id"]) is None, timeout_s=20, interval_s=0.1)


def test_backoff_doublesUpToItsCap_withJitter() -> None:
    waits = [archiver.backoff_s(n) for n in range(1, 12)]
    assert archiver.FIRST_BACKOFF_S <= waits[0] <= archiver.FIRST_BACKOFF_S * (1 + archiver.JITTER)
    assert all(archiver.MAX_BACKOFF_S <= w <= archiver.MAX_BACKOFF_S * (1 + archiver.JITTER) for w in waits[6:])
    # Within a minute of the archive's return, whatever the attempts so far.
    assert archiver.MAX_BACKOFF_S * (1 + archiver.JITTER) < 60


def test_jobForgottenByRedis_isServedFromTheArchive_withTheSameEventsAndDocument(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, archive_url: str
) -> None:
    stack = make_stack(archive_url=archive_url, retention_s=2)
    with stack.client() as http:
        job = create_job(http, "test.echo", input={"events": [{"type": "delta", "data": {"text": "hi"}}]})
        wait_until(lambda: status_of(http, job["id"])["status"] == "completed", interval_s=0.05)
        before = status_of(http, job["id"])
        from_redis = http.get(f"/v1/jobs/{job['id']}/events", params={"token": job["token"]}).text
        polled = http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"]}).json()
        # Archived, then gone from Redis 2 s after its end: every read goes on from the archive.
        wait_until(lambda: not rdb.exists(keys.meta_key(job["id"])), timeout_s=20, interval_s=0.1)
        after = status_of(http, job["id"])
        assert after["archived"] is True
        assert {**after, "expires_at": None, "archived": None} == {**before, "expires_at": None, "archived": None}
        assert http.get(f"/v1/jobs/{job['id']}/events", params={"token": job["token"]}).text == from_redis
        assert http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"]}).json() == polled
        listed = http.get("/v1/jobs", headers=ALICE).json()
        assert [j["id"] for j in listed["jobs"]] == [job["id"]]


Scenario = Callable[[Archiver, Any], Awaitable[None]]


def with_archiver(redis_url: str, archive_url: str, scenario: Scenario) -> None:
    """Run ``scenario`` with an Archiver of this process (and its archive)."""

    async def main() -> None:
        settings = make_settings(redis_url, archive_url=archive_url)
        client = create_client(settings)
        archive = open_archive(archive_url)
        try:
            await scenario(Archiver(client, settings, archive), archive)
        finally:
            await archive.close()
            await client.aclose()

    asyncio.run(main())


async def archive_all(worker: Archiver, expected: int) -> None:
    """Passes until ``expected`` jobs were taken in one (leases lapse in between: see LEASE_MS)."""
    deadline = time.monotonic() + 10
    while await worker.run_once() < expected:
        assert time.monotonic() < deadline, "never took every job"
        await asyncio.sleep(0.05)


def test_longJobs_areReadInPages_andArchivedWhole(
    make_stack: Callable[..., LiveStack],
    rdb: SyncRedis,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(archiver, "FIRST_PAGE_EVENTS", 100)
    monkeypatch.setattr(archiver, "READ_PAGE_EVENTS", 70)
    monkeypatch.setattr(archiver, "TXN_EVENTS", 300)
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    with make_stack(archive_url=url, with_worker=False).client() as http:
        jobs = [create_job(http, "external") for _ in range(3)]
        for job, count in zip(jobs, (0, 49, 250), strict=True):
            for start in range(0, count, 100):
                append(http, job, [{"type": "log", "data": {"n": n}} for n in range(start, min(count, start + 100))])
            append(http, job, ENDING)

    async def scenario(worker: Archiver, archive: Any) -> None:
        await archive_all(worker, 3)

    with_archiver(redis_url, url, scenario)
    for job in jobs:
        stored = archived(url, job["id"])
        assert stored is not None and stored.events == redis_events(rdb, job["id"])


def test_crashAfterMarking_andRedisLetTheJobGo_thenRetryKeepsTheArchivedCopy(
    make_stack: Callable[..., LiveStack],
    rdb: SyncRedis,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(archiver, "LEASE_MS", 300)
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    with make_stack(archive_url=url, with_worker=False, retention_s=1).client() as http:
        job = create_job(http, "external")
        append(http, job, ENDING)

    async def scenario(worker: Archiver, archive: Any) -> None:
        async def die(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("killed")

        # Stored and marked (its 1 s retention then lets it go), then the process dies.
        monkeypatch.setattr(worker, "_settled", die)
        with pytest.raises(ConnectionError):
            await worker.run_once()
        await wait_until_async(lambda: not rdb.exists(keys.meta_key(job["id"])), timeout_s=10)
        await archive_all(Archiver(worker._redis, make_settings(redis_url, archive_url=url), archive), 1)

    with_archiver(redis_url, url, scenario)
    stored = archived(url, job["id"])
    assert stored is not None and stored.events[-1].type == "done"
    assert not rdb.exists(keys.outbox_state_key(job["id"]))


def test_jobDeletedWhileItsCopyIsWritten_isDeletedFromTheArchive(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, redis_url: str, archive_url: str
) -> None:
    with make_stack(archive_url=archive_url, with_worker=False).client() as http:
        job = create_job(http, "external")
        append(http, job, ENDING)

        async def scenario(worker: Archiver, archive: Any) -> None:
            store = archive.store

            async def deleted_meanwhile(jobs: Any) -> None:
                # The user's DELETE lands between the archiver's read and its write.
                assert http.delete(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 204
                await store(jobs)

            archive.store = deleted_meanwhile
            await archive_all(worker, 1)

        with_archiver(redis_url, archive_url, scenario)
        assert http.get(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 404
    assert archived(archive_url, job["id"]) is None


def test_archiveDown_eachRetryKeepsTheJobInRedis(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, redis_url: str, tmp_path: Path, fast_retries: None
) -> None:
    url = f"sqlite:///{tmp_path / 'missing' / 'archive.db'}"
    with make_stack(archive_url=url, with_worker=False).client() as http:
        job = create_job(http, "external")
        append(http, job, ENDING)
    for key in (keys.meta_key(job["id"]), keys.events_key(job["id"])):
        rdb.expire(key, 100)  # as if the archive had been down for almost 3 days

    async def scenario(worker: Archiver, archive: Any) -> None:
        await worker.run_once()

    with_archiver(redis_url, url, scenario)
    for key in (keys.meta_key(job["id"]), keys.events_key(job["id"])):
        assert rdb.ttl(key) > 3 * 86_400 - 60
    assert rdb.hget(keys.meta_key(job["id"]), "archived") == "0"


def test_aJobTheArchiveRefuses_holdsUpNoOtherJobOfItsBatch(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, redis_url: str, archive_url: str, fast_retries: None
) -> None:
    with make_stack(archive_url=archive_url, with_worker=False).client() as http:
        good, bad = create_job(http, "external"), create_job(http, "external")
        for job in (good, bad):
            append(http, job, ENDING)
    rdb.hset(keys.meta_key(bad["id"]), "created_ms", "not a number")  # no store can take it

    async def scenario(worker: Archiver, archive: Any) -> None:
        await archive_all(worker, 2)

    with_archiver(redis_url, archive_url, scenario)
    assert archived(archive_url, good["id"]) is not None
    assert archived(archive_url, bad["id"]) is None
    assert rdb.hget(keys.meta_key(bad["id"]), "archived") == "0"  # kept, retried later


def test_lostNudge_thenTheLooksWhileTheJobRunsFindItsEnding(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process that wrote an ending died before nudging the archivers: the look the job was
    registered for at create, then the looks while it runs, find the record."""

    async def lost(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(Outbox, "nudge", lost)
    monkeypatch.setattr(outbox, "REGISTERED_LOOK_MS", 300)
    monkeypatch.setattr(archiver, "ARCHIVE_IDLE_LOOK_MS", 300)
    due = keys.outbox_due_key("archive")
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    with make_stack(archive_url=url).client() as http:
        job = create_job(http, "external")
        registered = rdb.zscore(due, job["id"])
        assert registered is not None
        append(http, job, [{"type": "delta", "data": {"text": "hi"}}])
        # Looked at while running (nothing to archive): due again later.
        wait_until(lambda: (rdb.zscore(due, job["id"]) or 0) > registered + 250, message="never looked at")
        append(http, job, ENDING)
        wait_until(lambda: archived(url, job["id"]) is not None, timeout_s=10, interval_s=0.1)


def test_aPassOverrunByAnotherProcessThatArchivedAndFinished_neverDeletesTheCopy(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis, redis_url: str, archive_url: str
) -> None:
    with make_stack(archive_url=archive_url, with_worker=False, retention_s=1).client() as http:
        job = create_job(http, "external")
        append(http, job, ENDING)
    ending = Record(job["id"], "1-0", "completed", now_ms(), {}, 0)

    async def scenario(worker: Archiver, archive: Any) -> None:
        # Another process archived the job, Redis let it go, the outbox finished and is gone...
        await archive_all(Archiver(worker._redis, make_settings(redis_url, archive_url=archive_url), archive), 1)
        await wait_until_async(lambda: not rdb.exists(keys.meta_key(job["id"]), keys.outbox_state_key(job["id"])))
        # ...then a slower pass that had stored it too gets to its mark: the job is gone, not deleted.
        worker._deadline = asyncio.get_running_loop().time() + 30  # (its pass had time left)
        await worker._done(ending, now_ms() + 1000)

    with_archiver(redis_url, archive_url, scenario)
    assert archived(archive_url, job["id"]) is not None


def test_workerProcess_archivesThenStopsAtSigterm_whileTheArchiveIsDown(
    make_stack: Callable[..., LiveStack],
    worker_process: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """`jobstream worker` as deployed: it archives, and SIGTERM stops it promptly, also while
    the archive cannot be reached and its endings wait for retries."""
    url = f"sqlite:///{tmp_path / 'archive.db'}"
    with make_stack(archive_url=url, with_worker=False).client() as http:
        worker = worker_process(JOBSTREAM_ARCHIVE_URL=url, JOBSTREAM_TOKEN_SECRET="s" * 32)
        job = create_job(http, "test.echo", input={"result": {"ok": True}})
        wait_until(lambda: archived(url, job["id"]) is not None, timeout_s=30, interval_s=0.1)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0
        down = f"sqlite:///{tmp_path / 'missing' / 'archive.db'}"
        worker = worker_process(JOBSTREAM_ARCHIVE_URL=down, JOBSTREAM_TOKEN_SECRET="s" * 32)
        waiting = create_job(http, "test.echo", input={"result": {"ok": True}})
        wait_until(lambda: status_of(http, waiting["id"])["status"] == "completed", timeout_s=30, interval_s=0.1)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0
        assert status_of(http, waiting["id"])["archived"] is False  # kept in Redis for the next worker
