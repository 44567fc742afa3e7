"""Reads fall back to the archive (API.md, "Archive"): once Redis has forgotten an ended job, every
read endpoint serves it from the archive with the same ids, rules and bodies (but ``expires_at``),
writes answer as for an ended job, DELETE removes it from both, and an archive that is down costs
a 503 for such jobs only. Each test runs on both stores (a SQLite file, a real PostgreSQL).

Jobs get into the archive the real way: an `external` job run to its end over HTTP, then the
workers' ``Archiver`` pass against the test's Redis; then the job's keys are deleted, as Redis
expires them after the archive holds them."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from jobstream import keys
from jobstream.archive import ArchivedJob, ArchiveError, open_archive
from jobstream.archive.bounded import BoundedArchive
from jobstream.archiver import Archiver
from jobstream.connection import create_client
from jobstream.devredis import free_port
from jobstream.multicursor import JobsCursor
from jobstream.store import now_ms
from tests.conftest import ALICE, BOB, LiveStack, SyncRedis, append, create_job, read_sse, subscribed_channels
from tests.helpers import assert_problem, wait_until, wait_until_async

RETENTION_DAYS = 2.5
#: The events every test job gets (after the `status` running its first append implies), then a
#: result or a failure (which implies `done`).
EVENTS: list[dict[str, Any]] = [
    {"type": "progress", "data": {"current": 1, "total": 2, "message": "half"}},
    {"type": "delta", "data": {"text": "Hel"}},
    {"type": "log", "data": {"line": "é ✓"}},
    {"type": "delta", "data": {"text": "lo"}},
]


@dataclass
class Site:
    """A gateway (no worker) with an archive, and the two steps that move its ended jobs there."""

    stack: LiveStack
    http: httpx.Client
    archive_url: str
    rdb: SyncRedis

    def archive(self, *jobs: dict[str, Any]) -> None:
        """Archive ended jobs as a worker does (Redis keeps them, marked archived)."""
        settings = self.stack.settings

        async def run() -> None:
            client = create_client(settings)
            store = open_archive(self.archive_url)
            archiver = Archiver(client, settings, store)

            async def archived() -> bool:
                await archiver.run_once()
                return all(self.rdb.hget(keys.meta_key(job["id"]), "archived") == "1" for job in jobs)

            try:
                await wait_until_async(archived, message="the archiver never archived the jobs")
            finally:
                await store.close()
                await client.aclose()

        asyncio.run(run())

    def forget(self, *jobs: dict[str, Any]) -> None:
        """Delete the jobs' keys, as Redis expires them once archived, at their ``kept_ms``: only the
        archive holds them, and its copy says Redis let them go (now: as if that time had come)."""
        for job in jobs:
            self.rdb.delete(keys.meta_key(job["id"]), keys.events_key(job["id"]), keys.output_key(job["id"]))

        async def let_go() -> None:
            store = open_archive(self.archive_url)
            try:
                for job in jobs:
                    found = await store.get(job["id"])
                    assert found is not None, "forget archived jobs"
                    await store.store([ArchivedJob({**found.fields, "kept_ms": str(now_ms() - 1)})])
            finally:
                await store.close()

        asyncio.run(let_go())

    def in_archive(self, job_id: str) -> bool:
        async def get() -> bool:
            store = open_archive(self.archive_url)
            try:
                return await store.get(job_id) is not None
            finally:
                await store.close()

        return asyncio.run(get())


@pytest.fixture
def site(make_stack: Callable[..., LiveStack], archive_url: str, rdb: SyncRedis) -> Iterator[Site]:
    stack = make_stack(with_worker=False, archive_url=archive_url, archive_retention_days=RETENTION_DAYS)
    with stack.client() as http:
        yield Site(stack, http, archive_url, rdb)


def ended_job(
    http: httpx.Client, *, headers: dict[str, str] | None = None, ending: str = "result", **create: Any
) -> dict[str, Any]:
    """An external job with EVENTS, ended by a result (completed) or a failure (failed)."""
    job = create_job(http, headers=headers, tags=["t:1", "keep"], metadata={"chat": "42"}, **create)
    append(http, job, EVENTS, headers=headers)
    last = {"answer": 42} if ending == "result" else {"message": "boom"}
    append(http, job, [{"type": ending, "data": last}], headers=headers)
    return job


def parse_iso(text: str) -> int:
    """Epoch milliseconds of a status document's time."""
    return round(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def answer(response: httpx.Response) -> tuple[int, str | None, bytes]:
    return response.status_code, response.headers.get("content-type"), response.content


def without_expiry(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    body = response.json()
    body.pop("expires_at")
    return response.status_code, body


def reads(http: httpx.Client, job: dict[str, Any]) -> dict[str, tuple[int, str | None, bytes]]:
    """Every read of one ended job whose answer must not depend on where the job is kept."""
    job_id, token = job["id"], job["token"]
    events = http.get(f"/v1/jobs/{job_id}/poll", headers=ALICE).json()["events"]
    mid, done = events[2]["id"], events[-1]["id"]
    base = f"/v1/jobs/{job_id}"
    requests: dict[str, tuple[str, str, dict[str, str], dict[str, str]]] = {
        "sse": ("GET", f"{base}/events", {}, ALICE),
        "sse token": ("GET", f"{base}/events", {"token": token}, {}),
        "sse resumed": ("GET", f"{base}/events", {}, {**ALICE, "Last-Event-ID": mid}),
        "sse query resumed": ("GET", f"{base}/events", {"last_event_id": mid}, ALICE),
        "sse after done": ("GET", f"{base}/events", {}, {**ALICE, "Last-Event-ID": done}),
        "sse newest": ("GET", f"{base}/events", {"last_event_id": "$"}, ALICE),
        "sse past everything": ("GET", f"{base}/events", {"last_event_id": "18446744073709551614-0"}, ALICE),
        "sse snapshot": ("GET", f"{base}/events", {"snapshot": "1"}, ALICE),
        "sse ui": ("GET", f"{base}/events", {"format": "ui-message-stream"}, ALICE),
        "sse ui resumed": ("GET", f"{base}/events", {"format": "ui-message-stream", "last_event_id": mid}, ALICE),
        "sse ui after done": ("GET", f"{base}/events", {"format": "ui-message-stream", "last_event_id": done}, ALICE),
        "sse head": ("HEAD", f"{base}/events", {}, ALICE),
        "sse head after done": ("HEAD", f"{base}/events", {"last_event_id": done}, ALICE),
        "poll": ("GET", f"{base}/poll", {"token": token}, {}),
        "poll page": ("GET", f"{base}/poll", {"limit": "2"}, ALICE),
        "poll after": ("GET", f"{base}/poll", {"after": mid, "limit": "2"}, ALICE),
        "poll after done": ("GET", f"{base}/poll", {"after": done}, ALICE),
        "poll newest": ("GET", f"{base}/poll", {"after": "$"}, ALICE),
        "poll snapshot": ("GET", f"{base}/poll", {"snapshot": "1"}, ALICE),
        "long-poll after done": ("GET", f"{base}/poll", {"after": done, "wait": "20"}, ALICE),
        "many poll": ("GET", "/v1/poll", {"jobs": job_id, "limit": "3"}, ALICE),
        "many poll token": ("GET", "/v1/poll", {"jobs": job_id, "token": token}, {}),
        "many sse": ("GET", "/v1/events", {"jobs": job_id}, ALICE),
        "many head": ("HEAD", "/v1/events", {"jobs": job_id}, ALICE),
        "bad id": ("GET", f"{base}/events", {"last_event_id": "nope"}, ALICE),
        "other user": ("GET", f"{base}/poll", {}, BOB),
        "other user many": ("GET", "/v1/poll", {"jobs": job_id}, BOB),
    }
    found = {
        name: answer(http.request(method, url, params=params, headers=headers))
        for name, (method, url, params, headers) in requests.items()
    }
    # Resumed from the cursor of a jobs= stream that has seen the `done`, and a poll's next page.
    many = http.get("/v1/poll", params={"jobs": job_id, "limit": "3"}, headers=ALICE).json()
    found["many poll next"] = answer(
        http.get("/v1/poll", params={"jobs": job_id, "cursor": many["cursor"]}, headers=ALICE)
    )
    cursor = JobsCursor()
    cursor.advance(job_id, done, done=True)
    found["many sse after done"] = answer(
        http.get("/v1/events", params={"jobs": job_id}, headers={**ALICE, "Last-Event-ID": cursor.encode()})
    )
    return found


def test_reads_whenOnlyTheArchiveHoldsTheJob_thenEveryAnswerIsTheSame(site: Site) -> None:
    job = ended_job(site.http)
    site.archive(job)
    in_redis = reads(site.http, job)
    status_redis = site.http.get(f"/v1/jobs/{job['id']}", headers=ALICE)
    output_redis = site.http.get(f"/v1/jobs/{job['id']}", params={"include": "output"}, headers=ALICE)
    site.forget(job)
    assert site.rdb.exists(keys.meta_key(job["id"])) == 0
    in_archive = reads(site.http, job)
    for name, expected in in_redis.items():
        assert in_archive[name] == expected, name
    # What the comparison covers: the history then the end, 204s, the rules' 400 and 403.
    assert in_archive["sse"][0] == 200 and in_archive["sse"][2].count(b"\nevent: ") == len(EVENTS) + 3
    assert in_archive["sse after done"][0] == in_archive["sse newest"][0] == 204
    assert in_archive["sse past everything"][0] == in_archive["many sse after done"][0] == 204
    assert b"event: snapshot" in in_archive["sse snapshot"][2] and b"[DONE]" in in_archive["sse ui"][2]
    assert json.loads(in_archive["poll after done"][2])["done"] is True
    assert [in_archive[name][0] for name in ("bad id", "other user", "other user many")] == [400, 403, 403]

    # A long-poll of an archived job answers at once: it has ended.
    started = time.monotonic()
    waited = site.http.get(f"/v1/jobs/{job['id']}/poll", params={"wait": "20"}, headers=ALICE)
    assert waited.json()["done"] is True and time.monotonic() - started < 5
    status = site.http.get(f"/v1/jobs/{job['id']}", headers=ALICE)
    assert without_expiry(status) == without_expiry(status_redis)
    assert status.json()["archived"] is True and status.json()["status"] == "completed"
    completed_ms = parse_iso(status.json()["completed_at"])
    assert parse_iso(status.json()["expires_at"]) == completed_ms + round(RETENTION_DAYS * 86_400_000)
    output = site.http.get(f"/v1/jobs/{job['id']}", params={"include": "output"}, headers=ALICE)
    assert without_expiry(output) == without_expiry(output_redis)
    assert output.json()["output"]["text"] == "Hello"


def test_status_whenArchived_thenETagAnswers304AndOthersGet403Or404(site: Site) -> None:
    job = ended_job(site.http)
    site.archive(job)
    site.forget(job)
    first = site.http.get(f"/v1/jobs/{job['id']}", params={"token": job["token"]})
    assert first.status_code == 200 and first.headers["etag"]
    again = site.http.get(f"/v1/jobs/{job['id']}", headers={**ALICE, "If-None-Match": first.headers["etag"]})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", first.headers["etag"])
    changed = site.http.get(f"/v1/jobs/{job['id']}", headers={**ALICE, "If-None-Match": '"other"'})
    assert changed.status_code == 200 and changed.content == first.content
    assert_problem(site.http.get(f"/v1/jobs/{job['id']}", headers=BOB), 403)
    assert_problem(site.http.get(f"/v1/jobs/{job['id']}", params={"include": "output"}, headers=BOB), 403)
    unknown = "00000000-0000-4000-8000-000000000000"
    for path in ("", "/events", "/poll"):
        assert_problem(site.http.get(f"/v1/jobs/{unknown}{path}", headers=ALICE), 404)


def test_events_whenArchivedHistoryIsLongAndTrimmed_thenPagedWithTruncationAndNoHub(
    make_stack: Callable[..., LiveStack], archive_url: str, rdb: SyncRedis
) -> None:
    # 1,300 events in a stream capped at about 1,000: trimmed, and longer than a history page (500).
    stack = make_stack(with_worker=False, archive_url=archive_url, stream_maxlen=1000)
    with stack.client() as http:
        site = Site(stack, http, archive_url, rdb)
        job = create_job(http)
        first = append(http, job, [{"type": "delta", "data": {"text": f"{i} "}} for i in range(1000)])[0]
        append(http, job, [{"type": "delta", "data": {"text": f"{i} "}} for i in range(1000, 1299)])
        append(http, job, [{"type": "result", "data": {}}])
        assert rdb.hget(keys.meta_key(job["id"]), "trimmed") == "1"
        site.archive(job)
        cases = [{}, {"Last-Event-ID": first}, {"Last-Event-ID": "0-1"}]
        in_redis = [answer(http.get(f"/v1/jobs/{job['id']}/events", headers={**ALICE, **case})) for case in cases]
        polled_redis = answer(http.get(f"/v1/jobs/{job['id']}/poll", params={"after": first}, headers=ALICE))
        many_redis = answer(http.get("/v1/events", params={"jobs": job["id"]}, headers=ALICE))
        site.forget(job)
        for case, expected in zip(cases, in_redis, strict=True):
            assert answer(http.get(f"/v1/jobs/{job['id']}/events", headers={**ALICE, **case})) == expected, case
        assert answer(http.get(f"/v1/jobs/{job['id']}/poll", params={"after": first}, headers=ALICE)) == polled_redis
        assert answer(http.get("/v1/events", params={"jobs": job["id"]}, headers=ALICE)) == many_redis
        assert b"event: truncated" in in_redis[1][2] and b'"truncated":{"first_id"' in polled_redis[2]
        assert many_redis[2].count(b"\nevent: delta") > 500  # more than a page of history

        # A reader of the archived job is off the hub at once, its stream open all the while.
        channel = keys.live_channel(job["id"])
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=ALICE) as response:
            chunks = response.iter_bytes()
            assert b"retry:" in next(chunks)
            wait_until(lambda: channel not in subscribed_channels(rdb, "*"), message="the reader stayed on the hub")
            rest = b"".join(chunks)
        assert rest.endswith(b'event: done\ndata: {"status":"completed"}\n\n')


def test_many_whenAnArchivedJobIsListedWithALiveOne_thenItsHistoryThenTheLiveOnesUntilBothEnd(site: Site) -> None:
    archived = ended_job(site.http, ending="failure")
    site.archive(archived)
    site.forget(archived)
    live = create_job(site.http)
    append(site.http, live, [{"type": "delta", "data": {"text": "a"}}])
    params = {"jobs": f"{archived['id']},{live['id']}"}

    polled = site.http.get("/v1/poll", params=params, headers=ALICE).json()
    per_job = [(event["job_id"], event["type"]) for event in polled["events"]]
    assert per_job == [(archived["id"], "status")] + [(archived["id"], e["type"]) for e in EVENTS] + [
        (archived["id"], "failure"),
        (archived["id"], "done"),
        (live["id"], "status"),
        (live["id"], "delta"),
    ]
    assert polled["done"] is False
    response, events = _read_many(site.http, params, count=len(per_job))
    assert response.status_code == 200
    assert [(json.loads(e.data)["job_id"], e.event) for e in events] == per_job

    append(site.http, live, [{"type": "result", "data": {}}])
    response, rest = _read_many(site.http, params, last_event_id=events[-1].id)
    assert [(json.loads(e.data)["job_id"], e.event) for e in rest] == [(live["id"], "result"), (live["id"], "done")]
    again = site.http.get("/v1/events", params=params, headers={**ALICE, "Last-Event-ID": rest[-1].id})
    assert again.status_code == 204
    final = site.http.get("/v1/poll", params={**params, "cursor": polled["cursor"]}, headers=ALICE).json()
    assert final["done"] is True and [e["type"] for e in final["events"]] == ["result", "done"]
    # Tag streams follow the jobs Redis holds: the archived one is not among them.
    tagged = site.http.get("/v1/poll", params={"tag": "t:1"}, headers=ALICE).json()
    assert {event["job_id"] for event in tagged["events"]} <= {live["id"]}


def _read_many(
    http: httpx.Client, params: dict[str, str], *, count: int | None = None, last_event_id: str | None = None
) -> tuple[httpx.Response, list[ServerSentEvent]]:
    headers = {**ALICE, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    events: list[ServerSentEvent] = []
    with connect_sse(http, "GET", "/v1/events", params=params, headers=headers) as source:
        for event in source.iter_sse():
            if event.event == "message" and not event.data:
                continue
            events.append(event)
            if count is not None and len(events) == count:
                break
    return source.response, events


def test_listing_whenJobsAreInRedisAndInTheArchive_thenRedisOnesFirstThenArchivedOnesEachOnce(site: Site) -> None:
    running = create_job(site.http, tags=["keep"])
    old_failed = ended_job(site.http, ending="failure")
    old_done = ended_job(site.http)
    bobs = ended_job(site.http, headers=BOB)
    site.archive(old_failed, old_done, bobs)
    site.forget(old_failed, old_done, bobs)
    kept = ended_job(site.http)  # archived, and still held by Redis: listed once, from Redis
    site.archive(kept)
    expected = [kept["id"], running["id"], old_done["id"], old_failed["id"]]

    def listed(**params: str) -> tuple[list[str], list[dict[str, Any]]]:
        ids: list[str] = []
        documents: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(20):
            query = {**params, **({"cursor": cursor} if cursor else {})}
            page = site.http.get("/v1/jobs", params=query, headers=ALICE)
            assert page.status_code == 200, page.text
            documents += page.json()["jobs"]
            ids += [job["id"] for job in page.json()["jobs"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                return ids, documents
        raise AssertionError("the listing never ended")

    ids, documents = listed()
    assert ids == expected
    for size in ("1", "2", "3"):
        assert listed(limit=size)[0] == expected, size
    assert listed(status="failed")[0] == [old_failed["id"]]
    assert listed(status="completed,pending", limit="1")[0] == [kept["id"], running["id"], old_done["id"]]
    assert listed(tag="keep", limit="1")[0] == [kept["id"], running["id"], old_done["id"], old_failed["id"]]
    assert listed(type="external", limit="2")[0] == expected and listed(type="test.echo")[0] == []
    by_id = {document["id"]: document for document in documents}
    in_archive = site.http.get(f"/v1/jobs/{old_done['id']}", headers=ALICE).json()
    assert by_id[old_done["id"]] == in_archive and by_id[old_done["id"]]["archived"] is True
    bob_ids = [job["id"] for job in site.http.get("/v1/jobs", headers=BOB).json()["jobs"]]
    assert bob_ids == [bobs["id"]]
    assert_problem(site.http.get("/v1/jobs", params={"cursor": "YTE6eHl6"}, headers=ALICE), 400)


def _pages(http: httpx.Client, **params: str) -> list[list[str]]:
    """Every page of a listing, each page's ids."""
    pages: list[list[str]] = []
    cursor: str | None = None
    for _ in range(50):
        answer = http.get("/v1/jobs", params={**params, **({"cursor": cursor} if cursor else {})}, headers=ALICE)
        assert answer.status_code == 200, answer.text
        pages.append([job["id"] for job in answer.json()["jobs"]])
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("the listing never ended")


def test_listing_whenManyArchivedJobsRedisStillHolds_thenEveryPageIsFullWhileMoreMatch(site: Site) -> None:
    gone = [ended_job(site.http) for _ in range(2)]
    held = [ended_job(site.http) for _ in range(10)]
    site.archive(*gone, *held)
    site.forget(*gone)
    for limit in ("1", "3"):
        pages = _pages(site.http, limit=limit)
        assert all(len(page) == int(limit) for page in pages[:-1]), pages
        assert [i for page in pages for i in page] == [j["id"] for j in reversed(gone + held)]


def test_listing_whenRedisLetsAListedJobGoBetweenPages_thenItIsNotListedAgain(site: Site) -> None:
    gone = ended_job(site.http)
    first, second = ended_job(site.http), ended_job(site.http)
    site.archive(gone, first, second)
    site.forget(gone)
    page = site.http.get("/v1/jobs", params={"limit": "1"}, headers=ALICE).json()
    assert [job["id"] for job in page["jobs"]] == [second["id"]]
    # Redis forgets the job listed already (its keys expire), before its kept_ms as the archive
    # knows it: the rest of the listing, as of its first page, does not list it again.
    site.rdb.delete(keys.meta_key(second["id"]), keys.events_key(second["id"]))
    rest = _pages(site.http, limit="1", cursor=page["next_cursor"])
    assert [i for ids in rest for i in ids] == [first["id"], gone["id"]]
    # A listing begun once Redis has let it go lists it from the archive (after Redis's jobs).
    site.forget(second)
    assert [i for ids in _pages(site.http) for i in ids] == [first["id"], second["id"], gone["id"]]


def test_listing_whenACursorHoldsNumbersTheStoresCannot_then400(site: Site) -> None:
    job_id = "00000000-0000-4000-8000-000000000000"
    for text in (
        f"a1:{2**63}:{job_id}",
        f"a1:{10**19 - 1}:{job_id}",
        f"a2:1:{2**63}:{job_id}",
        f"a2:{2**63}",
        f"l2:{2**63}:1",
    ):
        forged = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
        assert_problem(site.http.get("/v1/jobs", params={"cursor": forged}, headers=ALICE), 400)


def test_readTokens_whenJobsAreArchived_thenIssuedAndTheyRead(site: Site) -> None:
    job = ended_job(site.http)
    in_redis = ended_job(site.http)
    site.archive(job)
    site.forget(job)
    issued = site.http.post("/v1/read-tokens", json={"jobs": [job["id"], in_redis["id"]]}, headers=ALICE)
    assert issued.status_code == 201, issued.text
    token = issued.json()["token"]
    assert site.http.get(f"/v1/jobs/{job['id']}", params={"token": token}).json()["status"] == "completed"
    response, events = read_sse(site.http, {**job, "token": token})
    assert response.status_code == 200 and events[-1].event == "done"
    polled = site.http.get("/v1/poll", params={"jobs": f"{job['id']},{in_redis['id']}", "token": token}).json()
    assert polled["done"] is True and len(polled["events"]) == 2 * (len(EVENTS) + 3)
    # The job's own token, given at create, reads it too.
    assert site.http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"]}).json()["done"] is True
    assert_problem(site.http.post("/v1/read-tokens", json={"jobs": [job["id"]]}, headers=BOB), 403)
    unknown = "00000000-0000-4000-8000-000000000000"
    assert_problem(site.http.post("/v1/read-tokens", json={"jobs": [job["id"], unknown]}, headers=ALICE), 404)


def test_writes_whenOnlyTheArchiveHoldsTheJob_then409ForCancelAndAppendAndDeleteRemovesIt(site: Site) -> None:
    job = ended_job(site.http)
    site.archive(job)
    site.forget(job)
    path = f"/v1/jobs/{job['id']}"
    event = {"type": "delta", "data": {"text": "late"}}
    assert "ended" in str(assert_problem(site.http.post(f"{path}/cancel", headers=ALICE), 409)["detail"])
    assert "ended" in str(assert_problem(site.http.post(f"{path}/events", json=event, headers=ALICE), 409)["detail"])
    assert_problem(site.http.post(f"{path}/cancel", headers=BOB), 403)
    assert_problem(site.http.post(f"{path}/events", json=event, headers=BOB), 403)
    token = {"Authorization": f"Bearer {job['token']}"}
    for method, url in (("POST", f"{path}/cancel"), ("POST", f"{path}/events"), ("DELETE", path)):
        assert_problem(site.http.request(method, url, json=event, headers=token), 403)
    # A bad body of an archived external job: its own answer, after the job's checks.
    assert_problem(site.http.post(f"{path}/events", json={"type": "done"}, headers=BOB), 403)
    assert_problem(site.http.post(f"{path}/events", json={"nope": 1}, headers=ALICE), 422)
    assert_problem(site.http.delete(path, headers=BOB), 403)
    assert site.http.delete(path, headers=ALICE).status_code == 204
    assert not site.in_archive(job["id"])
    assert_problem(site.http.get(path, headers=ALICE), 404)
    assert_problem(site.http.delete(path, headers=ALICE), 404)
    assert_problem(site.http.post(f"{path}/cancel", headers=ALICE), 404)

    # A job Redis still holds, archived: deleted from both, its archived flag read by the delete
    # script itself (the one HGET is the owner's index's script reading its entry).
    both = ended_job(site.http)
    site.archive(both)
    assert site.in_archive(both["id"])
    hgets = site.rdb.info("commandstats").get("cmdstat_hget", {}).get("calls", 0)
    assert site.http.delete(f"/v1/jobs/{both['id']}", headers=ALICE).status_code == 204
    assert site.rdb.info("commandstats").get("cmdstat_hget", {}).get("calls", 0) == hgets + 1
    assert not site.in_archive(both["id"]) and site.rdb.exists(keys.meta_key(both["id"])) == 0
    assert_problem(site.http.get(f"/v1/jobs/{both['id']}", headers=ALICE), 404)


class CountingArchive:
    """An archive that counts what it is asked, by method."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name in ("migrate", "close"):
            return method

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await method(*args, **kwargs)

        return counted


def test_archiveQueries_whenRead_thenOnePerRequestAndNoneForJobsRedisHolds(
    site: Site, make_stack: Callable[..., LiveStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    archived = ended_job(site.http)
    held = ended_job(site.http)
    site.archive(archived, held)
    site.forget(archived)
    counting: list[CountingArchive] = []

    def counted_archive(url: str) -> CountingArchive:
        counting.append(CountingArchive(open_archive(url)))
        return counting[0]

    monkeypatch.setattr("jobstream.app.open_archive", counted_archive)
    with make_stack(with_worker=False, archive_url=site.archive_url).client() as http:
        wait_until(lambda: counting, message="the gateway never opened its archive")
        requests = [
            ("GET", "", {}),
            ("GET", "", {"include": "output"}),
            ("GET", "/events", {}),
            ("GET", "/events", {"snapshot": "1"}),
            ("HEAD", "/events", {}),
            ("GET", "/poll", {"wait": "5"}),
        ]
        for method, path, params in requests:
            for job, asked in ((held, 0), (archived, 1)):
                counting[0].calls.clear()
                response = http.request(method, f"/v1/jobs/{job['id']}{path}", params=params, headers=ALICE)
                assert response.status_code == 200, (method, path, response.text)
                assert len(counting[0].calls) == asked, (method, path, job is held, counting[0].calls)
        for url, params in (("/v1/poll", {}), ("/v1/events", {})):
            counting[0].calls.clear()
            both = f"{archived['id']},{held['id']}"
            assert http.get(url, params={"jobs": both, **params}, headers=ALICE).status_code == 200
            assert counting[0].calls == ["read_many"], url
        counting[0].calls.clear()
        assert http.post("/v1/read-tokens", json={"jobs": [archived["id"], held["id"]]}, headers=ALICE).is_success
        assert counting[0].calls == ["read_many"]


class SilentServer:
    """A TCP port that takes connections and never answers: an archive that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


@pytest.fixture(params=["postgresql refused", "postgresql silent", "sqlite no directory"])
def down_url(request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An archive that is down: a closed port, a server that never answers, a missing directory."""
    # Requests wait for the archive this long before their 503 (5 s in production).
    monkeypatch.setattr("jobstream.archive.bounded.TIMEOUT_S", 1.0)
    if request.param == "postgresql refused":
        yield f"postgresql://postgres@127.0.0.1:{free_port()}/js"
    elif request.param == "postgresql silent":
        server = SilentServer()
        yield f"postgresql://postgres@127.0.0.1:{server.port}/js"
        server.close()
    else:
        yield f"sqlite:///{tmp_path}/missing/archive.db"


def test_archiveDown_whenAJobOnlyItHoldsIsRead_then503QuicklyWhileRedisJobsRead(
    site: Site, make_stack: Callable[..., LiveStack], down_url: str
) -> None:
    archived = ended_job(site.http)
    held = ended_job(site.http)
    site.archive(archived)
    site.forget(archived)
    # A second gateway, whose archive is down (it started all the same).
    with make_stack(with_worker=False, archive_url=down_url).client() as http:
        path = f"/v1/jobs/{archived['id']}"
        requests = [
            ("GET", path, {}),
            ("GET", f"{path}/events", {}),
            ("GET", f"{path}/poll", {"wait": "5"}),
            ("GET", "/v1/poll", {"jobs": f"{archived['id']},{held['id']}"}),
            ("GET", "/v1/events", {"jobs": archived["id"]}),
            ("POST", f"{path}/cancel", {}),
            ("DELETE", path, {}),
        ]
        for method, url, params in requests:
            started = time.monotonic()
            response = http.request(method, url, params=params, headers=ALICE)
            assert_problem(response, 503)
            assert response.headers["retry-after"] == "2" and "archive" in response.json()["detail"]
            assert time.monotonic() - started < 4, (method, url)
        issued = http.post("/v1/read-tokens", json={"jobs": [archived["id"]]}, headers=ALICE)
        assert_problem(issued, 503)
        # A reconnect whose cursor names the archived job: the job Redis holds is answered, the
        # archived one keeps its position (not ended) for a later request.
        both = {"jobs": f"{held['id']},{archived['id']}"}
        started = site.http.get("/v1/poll", params={**both, "limit": "1"}, headers=ALICE).json()
        polled = http.get("/v1/poll", params={**both, "cursor": started["cursor"]}, headers=ALICE)
        assert polled.status_code == 200, polled.text
        assert {e["job_id"] for e in polled.json()["events"]} == {held["id"]} and polled.json()["done"] is False
        response, streamed = _read_many(http, both, last_event_id=started["cursor"])
        assert response.status_code == 200 and {json.loads(e.data)["job_id"] for e in streamed} == {held["id"]}
        # Jobs Redis holds never touch the archive.
        assert http.get(f"/v1/jobs/{held['id']}", headers=ALICE).json()["archived"] is True
        response, events = read_sse(http, held)
        assert response.status_code == 200 and events[-1].event == "done"
        assert http.get(f"/v1/jobs/{held['id']}/poll", headers=ALICE).json()["done"] is True
        assert http.get("/v1/poll", params={"jobs": held["id"]}, headers=ALICE).json()["done"] is True
        assert http.post("/v1/read-tokens", json={"jobs": [held["id"]]}, headers=ALICE).status_code == 201
        # A listing answers Redis's jobs, the archive's part is next: then 503 (503 at once for a
        # user Redis holds no job of).
        page = http.get("/v1/jobs", headers=ALICE)
        assert page.status_code == 200 and [job["id"] for job in page.json()["jobs"]] == [held["id"]]
        assert_problem(http.get("/v1/jobs", params={"cursor": page.json()["next_cursor"]}, headers=ALICE), 503)
        assert_problem(http.get("/v1/jobs", headers=BOB), 503)
        # A job that was not yet archived is deleted from Redis even so.
        fresh = create_job(http)
        assert http.delete(f"/v1/jobs/{fresh['id']}", headers=ALICE).status_code == 204
        # One the archive holds: 503, so that the client retries (gone from Redis already: the
        # retry finds it only in the archive, and deletes it there).
        stored = ended_job(site.http)
        site.archive(stored)
        assert_problem(http.delete(f"/v1/jobs/{stored['id']}", headers=ALICE), 503)
        assert site.rdb.exists(keys.meta_key(stored["id"])) == 0 and site.in_archive(stored["id"])
    assert site.http.delete(f"/v1/jobs/{stored['id']}", headers=ALICE).status_code == 204
    assert not site.in_archive(stored["id"])
    # The archive answers again: the job reads, from the first gateway's archive, and the cursor
    # reads it from where it stood.
    assert site.http.get(f"/v1/jobs/{archived['id']}", headers=ALICE).status_code == 200
    rest = site.http.get("/v1/poll", params={**both, "cursor": polled.json()["cursor"]}, headers=ALICE).json()
    seen = sum(e["job_id"] == archived["id"] for e in started["events"])
    assert [e["job_id"] for e in rest["events"]] == [archived["id"]] * (len(EVENTS) + 3 - seen) and rest["done"]


def test_boundedArchive_whenMigrationFailsAtStart_thenRetriedAtFirstUse(archive_url: str, tmp_path: Any) -> None:
    async def scenario() -> None:
        store = BoundedArchive(open_archive(archive_url), timeout_s=5)
        await store.start()  # the archive answers: migrated
        assert await store.get("nothing") is None
        await store.close()
        missing = BoundedArchive(open_archive(f"sqlite:///{tmp_path}/later/archive.db"), timeout_s=5)
        await missing.start()  # logged, not raised
        (tmp_path / "later").mkdir()
        assert await missing.read("nothing", None, 10) is None  # migrated now, at first use
        await missing.close()

    asyncio.run(scenario())


def test_boundedArchive_whenTheArchiveHangsOrFails_thenFailsFastForTheCooldownThenTriesAgain(tmp_path: Any) -> None:
    async def scenario() -> None:
        now = [1_000.0]
        server = SilentServer()
        hung = BoundedArchive(
            open_archive(f"postgresql://postgres@127.0.0.1:{server.port}/js"), 0.5, 5.0, lambda: now[0]
        )
        try:
            started = time.monotonic()
            with pytest.raises(ArchiveError, match="within"):
                await hung.get("nothing")
            assert time.monotonic() - started >= 0.5
            for _ in range(3):  # at once, for the cooldown
                started = time.monotonic()
                with pytest.raises(ArchiveError, match="moments ago"):
                    await hung.list_owner("alice")
                assert time.monotonic() - started < 0.1
            now[0] += 5.0  # then one call tries it again, and waits the bound
            started = time.monotonic()
            with pytest.raises(ArchiveError, match="within"):
                await hung.get("nothing")
            assert time.monotonic() - started >= 0.5
        finally:
            await hung.close()
            server.close()
        # An archive back after failing answers again once the cooldown is over.
        back = BoundedArchive(open_archive(f"sqlite:///{tmp_path}/later/archive.db"), 5.0, 5.0, lambda: now[0])
        with pytest.raises(ArchiveError):
            await back.get("nothing")
        (tmp_path / "later").mkdir()
        with pytest.raises(ArchiveError, match="moments ago"):
            await back.get("nothing")
        now[0] += 5.0
        assert await back.get("nothing") is None
        assert await back.get("nothing") is None  # closed again
        await back.close()

    asyncio.run(scenario())
