"""`GET /v1/jobs` (API.md 1.1): the caller's jobs, newest first, filtered, paged by an opaque
cursor, from a per-user index in the user's own slot (on a single Redis and on the cluster)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from jobstream import keys
from jobstream.connection import create_client
from jobstream.models import JobStatus
from jobstream.store import JobRecord, JobStore, ListQuery, OutgoingEvent, done_event
from tests.conftest import ALICE, BOB, append, create_job, make_settings, server_nodes
from tests.helpers import assert_problem, redis_commands_of, wait_until

pytestmark = pytest.mark.on_cluster


def _list(http: httpx.Client, headers: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
    response = http.get("/v1/jobs", params=params, headers=headers or ALICE)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _all_pages(http: httpx.Client, **params: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        body = _list(http, **params, **({"cursor": cursor} if cursor else {}))
        pages.append([job["id"] for job in body["jobs"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100


def _finish(http: httpx.Client, job: dict[str, Any]) -> None:
    append(http, job, {"type": "result", "data": {"ok": True}})


def test_list_whenJobsCreated_thenNewestFirstAsTheirStatusDocuments(gateway: httpx.Client) -> None:
    created = [create_job(gateway, tags=[f"n:{n}"], metadata={"n": n}) for n in range(5)]
    body = _list(gateway)
    assert [job["id"] for job in body["jobs"]] == [job["id"] for job in reversed(created)]
    assert body["next_cursor"] is None
    for listed in body["jobs"]:
        assert listed == gateway.get(f"/v1/jobs/{listed['id']}", headers=ALICE).json()


def test_list_whenManyJobs_thenFullPagesUntilTheLastWithNothingRepeatedOrLost(gateway: httpx.Client) -> None:
    created = [create_job(gateway)["id"] for _ in range(23)]
    pages = _all_pages(gateway, limit=10)
    assert [len(page) for page in pages] == [10, 10, 3]
    assert [job_id for page in pages for job_id in page] == created[::-1]
    assert [len(page) for page in _all_pages(gateway)] == [20, 3]  # the default limit


def test_list_whenStatusFilter_thenOnlyThoseStatusesAndPagesFullWhileMoreMatch(gateway: httpx.Client) -> None:
    jobs = [create_job(gateway) for _ in range(30)]
    running = [job for index, job in enumerate(jobs) if index % 7 == 3]
    ended = [job for index, job in enumerate(jobs) if index % 7 == 5]
    for job in running:
        append(gateway, job, {"type": "delta", "data": {"text": "x"}})
    for job in ended:
        _finish(gateway, job)
    pending = [job for job in jobs if job not in running and job not in ended]

    assert _all_pages(gateway, status="running", limit=2) == [
        [job["id"] for job in reversed(running)][i : i + 2] for i in range(0, len(running), 2)
    ]
    listed = [job_id for page in _all_pages(gateway, status="completed,running", limit=3) for job_id in page]
    assert listed == [job["id"] for job in reversed(jobs) if job in running or job in ended]
    assert [job_id for page in _all_pages(gateway, status="pending") for job_id in page] == [
        job["id"] for job in reversed(pending)
    ]
    assert _list(gateway, status="failed,cancelled")["jobs"] == []


def test_list_whenTagAndTypeFilters_thenOnlyMatchingJobs(gateway: httpx.Client) -> None:
    chat = [create_job(gateway, tags=["chat:42", "draft"]) for _ in range(3)]
    create_job(gateway, tags=["chat:7"])
    create_job(gateway)
    _finish(gateway, chat[1])
    assert [job["id"] for job in _list(gateway, tag="chat:42")["jobs"]] == [job["id"] for job in reversed(chat)]
    assert [job["id"] for job in _list(gateway, tag="draft", status="completed")["jobs"]] == [chat[1]["id"]]
    assert len(_list(gateway, type="external")["jobs"]) == 5
    assert _list(gateway, type="no.such.type")["jobs"] == []
    assert _list(gateway, type="x" * 500)["jobs"] == []
    assert _list(gateway, tag="never-used")["jobs"] == []


def test_list_whenAnotherUsersJobs_thenNeverListed(gateway: httpx.Client) -> None:
    mine = create_job(gateway, tags=["shared-tag"])
    create_job(gateway, headers=BOB, tags=["shared-tag"])
    assert [job["id"] for job in _list(gateway)["jobs"]] == [mine["id"]]
    assert [job["id"] for job in _list(gateway, tag="shared-tag")["jobs"]] == [mine["id"]]


def test_list_whenReadToken_then403(gateway: httpx.Client) -> None:
    job = create_job(gateway)
    assert_problem(gateway.get("/v1/jobs", params={"token": job["token"]}), 401)
    assert_problem(gateway.get("/v1/jobs", headers={"Authorization": f"Bearer {job['token']}"}), 403)
    assert_problem(gateway.get("/v1/jobs"), 401)


def test_list_whenJobDeletedOrExpired_thenNotListed(gateway: httpx.Client, rdb: redis.Redis) -> None:
    kept = create_job(gateway, tags=["t"])
    deleted = create_job(gateway, tags=["t"])
    expiring = create_job(gateway, tags=["t"], ttl=1)
    assert gateway.delete(f"/v1/jobs/{deleted['id']}", headers=ALICE).status_code == 204
    assert deleted["id"] not in rdb.hkeys(keys.user_key("alice", "info"))  # forgotten at once
    wait_until(lambda: not rdb.exists(keys.meta_key(expiring["id"])), timeout_s=5)
    assert [job["id"] for job in _list(gateway)["jobs"]] == [kept["id"]]
    assert [job["id"] for job in _list(gateway, tag="t")["jobs"]] == [kept["id"]]
    # Listing forgot the expired job's entry, tags included.
    assert rdb.zrange(keys.user_key("alice", "tag:t"), 0, -1) == [kept["id"]]


def test_list_whenIndexMissedAStatus_thenTheJobsOwnStatusWinsAndTheIndexIsRepaired(
    gateway: httpx.Client, rdb: redis.Redis
) -> None:
    jobs = [create_job(gateway) for _ in range(4)]
    info = keys.user_key("alice", "info")
    # As if a process died between a job's write and its index's: the index still says pending.
    _finish(gateway, jobs[1])
    entry = rdb.hget(info, jobs[1]["id"])
    assert entry is not None and entry.startswith("completed\x1f")
    rdb.hset(info, jobs[1]["id"], "pending" + entry[len("completed") :])
    pending = _list(gateway, status="pending", limit=3)
    assert [job["id"] for job in pending["jobs"]] == [jobs[3]["id"], jobs[2]["id"], jobs[0]["id"]]
    assert pending["next_cursor"] is None
    assert str(rdb.hget(info, jobs[1]["id"])).startswith("completed\x1f")
    assert [job["id"] for job in _list(gateway, status="completed")["jobs"]] == [jobs[1]["id"]]


def test_list_whenManyJobs_thenTwoRoundTrips(gateway: httpx.Client, rdb: redis.Redis) -> None:
    for _ in range(60):
        create_job(gateway)
    if not isinstance(rdb, redis.RedisCluster):
        commands = redis_commands_of(rdb, lambda: _list(gateway, limit=50))
        assert commands == ["evalsha"] + ["hmget"] * 50  # the index, then the jobs in one pipeline
        return
    # MONITOR sees one node: on the cluster, count the commands every node ran (scripts loaded).
    _list(gateway, limit=50)
    before = _calls_on_every_node(rdb)
    _list(gateway, limit=50)
    after = _calls_on_every_node(rdb)
    assert (after["evalsha"] - before["evalsha"], after["hmget"] - before["hmget"]) == (1, 50)


def _calls_on_every_node(rdb: redis.Redis) -> dict[str, int]:
    totals = {"evalsha": 0, "hmget": 0}
    for node in server_nodes(rdb):
        stats = node.info("commandstats")
        for name in totals:
            totals[name] += int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
    return totals


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "finished"}, "status"),
        ({"status": "running,"}, "status"),
        ({"status": ""}, "status"),
        ({"tag": "has space"}, "tag"),
        ({"tag": "x" * 129}, "tag"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": ""}, "cursor"),
    ],
)
def test_list_whenBadQuery_then400NamingIt(gateway: httpx.Client, params: dict[str, str], field: str) -> None:
    problem = assert_problem(gateway.get("/v1/jobs", params=params, headers=ALICE), 400)
    errors = problem["errors"]
    assert isinstance(errors, list) and [error["loc"] for error in errors] == [["query", field]]


def test_jobs_whenOtherMethod_then405ListingGetAndPost(gateway: httpx.Client) -> None:
    response = gateway.put("/v1/jobs", headers=ALICE)
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def test_create_whenRedisForgotItsScripts_thenTheJobIsIndexedAndQueuedOnce(
    gateway: httpx.Client, rdb: redis.Redis
) -> None:
    create_job(gateway, "test.echo", tags=["t"])  # scripts loaded
    for node in server_nodes(rdb):
        node.script_flush()  # as after a restart or a failover: NOSCRIPT for every digest
    job = create_job(gateway, "test.echo", tags=["t"])
    assert [listed["id"] for listed in _list(gateway, tag="t", limit=1)["jobs"]] == [job["id"]]
    queued = [fields["job"] for _, fields in rdb.xrange(keys.queue_key)]
    assert queued.count(job["id"]) == 1
    assert gateway.delete(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 204
    for node in server_nodes(rdb):
        node.script_flush()
    assert gateway.delete(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 404


@asynccontextmanager
async def _store(redis_url: str) -> AsyncIterator[JobStore]:
    settings = make_settings(redis_url)
    client = create_client(settings)
    try:
        yield JobStore(client, settings)
    finally:
        await client.aclose()


def _record(owner: str = "alice", tags: tuple[str, ...] = ("t",)) -> JobRecord:
    return JobRecord.new(
        job_id=str(uuid.uuid4()), owner=owner, job_type="external", input={}, ttl_s=600, tags=list(tags)
    )


def test_list_whenAJobIsBeingCreated_thenItsEntryIsKeptAndItIsListedOnceItExists(
    redis_url: str, rdb: redis.Redis
) -> None:
    asyncio.run(_listing_during_create(redis_url, rdb))


async def _listing_during_create(redis_url: str, rdb: redis.Redis) -> None:
    async with _store(redis_url) as store:
        record = _record()
        fields = record.fields
        # The first of a create's two steps (on a cluster, two round trips): the owner's entry.
        await store.index.run(
            store.index.add_call(
                user="alice",
                job_id=record.id,
                job_type=record.type,
                tags=record.tags,
                now_ms=int(fields["created_ms"]),
                expires_ms=int(fields["expires_ms"]),
                retention_ms=600_000,
            )
        )
        # A listing in between finds no job yet: the entry is not forgotten for that.
        assert (await store.list_jobs("alice", ListQuery(limit=10)))[0] == []
        assert rdb.zscore(keys.user_key("alice", "tag:t"), record.id) is not None
        await store.create(record)
        listed, _ = await store.list_jobs("alice", ListQuery(limit=10, tag="t"))
        assert [job.id for job in listed] == [record.id]


def test_write_whenTheIndexCopyFails_thenTheAppendStillSucceeds(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(_index_copy_fails(redis_url, monkeypatch))


async def _index_copy_fails(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with _store(redis_url) as store:
        record = _record()
        await store.create(record)

        async def refused(**_: Any) -> None:
            raise RedisConnectionError("the owner's node is down")

        monkeypatch.setattr(store.index, "_status", refused)
        appended = await store.write(
            record.id, [OutgoingEvent("delta", '{"text":"x"}'), done_event(JobStatus.completed)]
        )
        assert appended.status is JobStatus.completed and len(appended.ids) == 2
        monkeypatch.undo()
        # The index still says pending; a listing by status reads the job itself and repairs it.
        listed, _ = await store.list_jobs("alice", ListQuery(limit=10, statuses=("pending",)))
        assert listed == []
        listed, _ = await store.list_jobs("alice", ListQuery(limit=10, statuses=("completed",)))
        assert [job.id for job in listed] == [record.id]
