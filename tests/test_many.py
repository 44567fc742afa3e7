"""Many jobs on one connection (API.md 1.1): `GET /v1/events` and `GET /v1/poll` with `jobs=` or
`tag=`, one opaque cursor for all of them, resumed with nothing lost or repeated."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, connect_sse

from jobstream import keys
from jobstream.multicursor import JobsCursor
from tests.conftest import ALICE, BOB, LiveStack, append, create_job, server_nodes, subscribed_channels
from tests.helpers import assert_problem, value, wait_until

pytestmark = pytest.mark.on_cluster


def _deltas(http: httpx.Client, job: dict[str, Any], texts: list[str], *, end: bool = False) -> list[str]:
    events: list[dict[str, Any]] = [{"type": "delta", "data": {"text": text}} for text in texts]
    if end:
        events.append({"type": "result", "data": {"n": len(texts)}})
    return append(http, job, events)


def _read(
    http: httpx.Client,
    params: dict[str, str],
    *,
    headers: dict[str, str] | None = None,
    count: int | None = None,
    url: str = "/v1/events",
) -> tuple[httpx.Response, list[ServerSentEvent]]:
    """Read the stream until the server ends it, or ``count`` events (then hang up)."""
    events: list[ServerSentEvent] = []
    with connect_sse(http, "GET", url, params=params, headers=headers if headers is not None else ALICE) as source:
        if source.response.status_code != 200:
            source.response.read()
            return source.response, events
        for event in source.iter_sse():
            if event.event == "message" and not event.data:
                continue
            events.append(event)
            if count is not None and len(events) == count:
                break
    return source.response, events


def _wrapped(events: list[ServerSentEvent]) -> list[tuple[str, str, str, Any]]:
    """(job id, event id, type, data) of each event, from its wrapped data."""
    out = []
    for event in events:
        body = json.loads(event.data)
        assert set(body) == {"job_id", "id", "data"}
        out.append((body["job_id"], body["id"], event.event, body["data"]))
    return out


def _per_job(events: list[tuple[str, str, str, Any]]) -> dict[str, list[str]]:
    jobs: dict[str, list[str]] = {}
    for job_id, event_id, _, _ in events:
        jobs.setdefault(job_id, []).append(event_id)
    return jobs


def test_events_whenJobsListed_thenEveryEventOfEachInOrderThenTheStreamEnds(gateway: httpx.Client) -> None:
    jobs = [create_job(gateway) for _ in range(3)]
    written = {job["id"]: _deltas(gateway, job, [f"{job['id'][:4]}-{n}" for n in range(5)], end=True) for job in jobs}
    response, events = _read(gateway, {"jobs": ",".join(job["id"] for job in jobs)})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    wrapped = _wrapped(events)
    per_job = _per_job(wrapped)
    for job in jobs:
        # Around what was appended: the implied `status: running` first, and the implied `done`.
        assert per_job[job["id"]][1:-1] == written[job["id"]]
        assert [kind for job_id, _, kind, _ in wrapped if job_id == job["id"]][-2:] == ["result", "done"]
    assert all(event.id for event in events)
    # Every event's id covers every job: resuming after the last one finds nothing left.
    again = gateway.get(
        "/v1/events",
        params={"jobs": ",".join(j["id"] for j in jobs)},
        headers={**ALICE, "Last-Event-ID": events[-1].id},
    )
    assert again.status_code == 204


def test_events_whenResumedFromAnyEvent_thenNothingLostOrRepeated(gateway: httpx.Client) -> None:
    jobs = [create_job(gateway) for _ in range(4)]
    for job in jobs:
        _deltas(gateway, job, [str(n) for n in range(3)])
    query = {"jobs": ",".join(job["id"] for job in jobs)}
    _, first = _read(gateway, query, count=7)
    seen = _wrapped(first)
    # More happens while the reader is away, and while it is back.
    for job in jobs:
        _deltas(gateway, job, ["later"])
    done = threading.Event()

    def finish() -> None:
        done.wait(5)
        for job in jobs:
            _deltas(gateway, job, ["last"], end=True)

    finisher = threading.Thread(target=finish)
    finisher.start()
    with connect_sse(
        gateway, "GET", "/v1/events", params=query, headers={**ALICE, "Last-Event-ID": first[-1].id}
    ) as source:
        assert source.response.status_code == 200
        rest: list[ServerSentEvent] = []
        for event in source.iter_sse():
            if event.event == "message" and not event.data:
                continue
            rest.append(event)
            done.set()
    finisher.join()
    resumed = seen + _wrapped(rest)
    ids = [(job_id, event_id) for job_id, event_id, _, _ in resumed]
    assert len(ids) == len(set(ids)), "an event was repeated"
    for job in jobs:
        stored = [
            event["id"]
            for event in gateway.get(
                f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "limit": 1000}
            ).json()["events"]
        ]
        assert _per_job(resumed)[job["id"]] == stored, "an event was lost"


@pytest.mark.parametrize("credential", ["api_key", "tag_token"])
def test_events_whenTagFollowed_thenJobsCreatedLaterJoinFromTheirFirstEvent(
    make_stack: Callable[..., LiveStack], credential: str
) -> None:
    with make_stack(with_worker=False, sse_max_lifetime_s=4, heartbeat_s=0.5).client() as gateway:
        _follow_tag(gateway, credential)


def _follow_tag(gateway: httpx.Client, credential: str) -> None:
    before = create_job(gateway, tags=["chat:1"])
    _deltas(gateway, before, ["a"])
    create_job(gateway, tags=["chat:2"])  # another tag: never followed
    params, headers = {"tag": "chat:1"}, ALICE
    if credential == "tag_token":
        token = gateway.post("/v1/read-tokens", json={"tag": "chat:1"}, headers=ALICE).json()["token"]
        params, headers = {"tag": "chat:1", "token": token}, {}
    with _following(gateway, params, headers) as (received, ended):
        wait_until(lambda: len(received) == 2)  # the first job's running status and delta
        later = create_job(gateway, tags=["other", "chat:1"])
        _deltas(gateway, later, ["b"])
        _deltas(gateway, before, ["c"])
        wait_until(lambda: len(received) == 5)
        wrapped = _wrapped(received)
        assert [(kind, data) for job_id, _, kind, data in wrapped if job_id == later["id"]] == [
            ("status", {"status": "running"}),
            ("delta", {"text": "b"}),
        ]
        assert [data for job_id, _, kind, data in wrapped if job_id == before["id"] and kind == "delta"] == [
            {"text": "a"},
            {"text": "c"},
        ]
        assert not ended.is_set()  # a tag's stream stays open, until its lifetime ends
        assert ended.wait(10)


def test_events_whenFollowedJobDeleted_thenItDropsOutAndTheStreamEnds(gateway: httpx.Client) -> None:
    jobs = [create_job(gateway) for _ in range(2)]
    _deltas(gateway, jobs[0], ["x"], end=True)
    _deltas(gateway, jobs[1], ["y"])
    with _following(gateway, {"jobs": ",".join(job["id"] for job in jobs)}) as (received, ended):
        wait_until(lambda: len(received) == 6)  # status, delta, result, done; status, delta
        assert gateway.delete(f"/v1/jobs/{jobs[1]['id']}", headers=ALICE).status_code == 204
        assert ended.wait(10), "a deleted job kept the jobs= stream open"
        assert len(received) == 6
    # Its cursor skips the deleted job: nothing is left to follow.
    again = gateway.get(
        "/v1/events",
        params={"jobs": ",".join(job["id"] for job in jobs)},
        headers={**ALICE, "Last-Event-ID": received[-1].id},
    )
    assert again.status_code == 204


@contextlib.contextmanager
def _following(
    http: httpx.Client, params: dict[str, str], headers: dict[str, str] | None = None
) -> Iterator[tuple[list[ServerSentEvent], threading.Event]]:
    """Follow a stream on a thread of its own client: the events as they come, and an event set
    once the server ended it. Leaving the block hangs up."""
    received: list[ServerSentEvent] = []
    ended = threading.Event()
    own = httpx.Client(base_url=http.base_url, timeout=30)

    def follow() -> None:
        with contextlib.suppress(httpx.TransportError):  # hung up by the test
            with connect_sse(own, "GET", "/v1/events", params=params, headers=headers or ALICE) as source:
                assert source.response.status_code == 200
                for event in source.iter_sse():
                    if event.event != "message" or event.data:
                        received.append(event)
                ended.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        yield received, ended
    finally:
        own.close()
        reader.join(10)


def test_poll_whenJobsListed_thenPagesInIdOrderUntilDone(gateway: httpx.Client) -> None:
    jobs = [create_job(gateway) for _ in range(3)]
    for round_ in range(3):
        for job in jobs:
            _deltas(gateway, job, [f"{round_}"], end=round_ == 2)
    query: dict[str, Any] = {"jobs": ",".join(job["id"] for job in jobs), "limit": 4}
    collected: list[dict[str, Any]] = []
    for _ in range(50):
        body = gateway.get("/v1/poll", params=query, headers=ALICE).json()
        assert set(body) == {"events", "cursor", "done"}
        collected += body["events"]
        query["cursor"] = body["cursor"]
        if body["done"]:
            break
    assert body["done"]
    ids = [(event["job_id"], event["id"]) for event in collected]
    assert len(ids) == len(set(ids))
    for job in jobs:
        stored = [
            e["id"] for e in gateway.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"]}).json()["events"]
        ]
        assert [event_id for job_id, event_id in ids if job_id == job["id"]] == stored
    again = gateway.get("/v1/poll", params=query, headers=ALICE).json()
    assert again["events"] == [] and again["done"] is True


def test_poll_whenTag_thenNeverDoneAndLongPollWakesOnANewJob(gateway: httpx.Client) -> None:
    first = create_job(gateway, tags=["t"])
    _deltas(gateway, first, ["a"], end=True)
    body = gateway.get("/v1/poll", params={"tag": "t"}, headers=ALICE).json()
    assert [event["type"] for event in body["events"]] == ["status", "delta", "result", "done"]
    assert body["done"] is False
    cursor = body["cursor"]
    empty = gateway.get("/v1/poll", params={"tag": "t", "cursor": cursor, "wait": 0.2}, headers=ALICE).json()
    assert empty["events"] == []


def test_events_whenTooManyStreams_thenItCountsAsOne(make_stack: Callable[..., LiveStack]) -> None:
    with make_stack(with_worker=False, max_sse_per_user=1).client() as http:
        jobs = [create_job(http) for _ in range(3)]
        opened = threading.Event()
        release = threading.Event()

        def hold() -> None:
            with connect_sse(
                http, "GET", "/v1/events", params={"jobs": ",".join(j["id"] for j in jobs)}, headers=ALICE
            ) as source:
                assert source.response.status_code == 200
                opened.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        assert opened.wait(5)
        try:
            assert_problem(http.get("/v1/events", params={"jobs": jobs[0]["id"]}, headers=ALICE), 429)
        finally:
            release.set()
            holder.join()


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"jobs": "", "tag": "t"},
        {"tag": "bad tag"},
        {"jobs": ",".join(f"00000000-0000-4000-8000-{n:012d}" for n in range(101))},
        {"jobs": ","},
    ],
)
@pytest.mark.parametrize("url", ["/v1/events", "/v1/poll"])
def test_many_whenBadSelection_then400(gateway: httpx.Client, params: dict[str, str], url: str) -> None:
    assert_problem(gateway.get(url, params=params, headers=ALICE), 400)


@pytest.mark.parametrize("url", ["/v1/events", "/v1/poll"])
def test_many_whenUnknownForeignOrOutOfScope_then404Or403(gateway: httpx.Client, url: str) -> None:
    mine = create_job(gateway, tags=["t"])
    bobs = create_job(gateway, headers=BOB)
    unknown = "00000000-0000-4000-8000-000000000000"
    assert_problem(gateway.get(url, params={"jobs": f"{mine['id']},{unknown}"}, headers=ALICE), 404)
    assert_problem(gateway.get(url, params={"jobs": f"{mine['id']},not-a-job"}, headers=ALICE), 404)
    assert_problem(gateway.get(url, params={"jobs": f"{mine['id']},{bobs['id']}"}, headers=ALICE), 403)
    # A job's own read token reads that job only; a tag's token that tag only.
    assert_problem(gateway.get(url, params={"jobs": f"{mine['id']},{bobs['id']}", "token": mine["token"]}), 403)
    assert_problem(gateway.get(url, params={"tag": "t", "token": mine["token"]}), 403)
    tag_token = gateway.post("/v1/read-tokens", json={"tag": "t"}, headers=ALICE).json()["token"]
    assert_problem(gateway.get(url, params={"tag": "u", "token": tag_token}), 403)
    other = create_job(gateway, tags=["u"])
    assert_problem(gateway.get(url, params={"jobs": other["id"], "token": tag_token}), 403)
    assert_problem(
        gateway.get(url, params={"jobs": mine["id"], "last_event_id": "garbage!", "cursor": "garbage!"}, headers=ALICE),
        400,
    )


def test_cursor_whenHundredJobs_thenAtMost4KiB(gateway: httpx.Client) -> None:
    jobs = [create_job(gateway) for _ in range(100)]
    for job in jobs:
        _deltas(gateway, job, ["x"], end=True)
    query: dict[str, Any] = {"jobs": ",".join(job["id"] for job in jobs), "limit": 1000}
    body = gateway.get("/v1/poll", params=query, headers=ALICE).json()
    assert body["done"] and len(body["events"]) == 100 * 4
    assert len(body["cursor"]) <= 4096


def test_events_whenTheHubLosesItsLink_thenTheStreamCarriesOnWithNothingLost(
    gateway: httpx.Client, rdb: redis.Redis
) -> None:
    jobs = [create_job(gateway) for _ in range(2)]
    for job in jobs:
        _deltas(gateway, job, ["a"])
    with _following(gateway, {"jobs": ",".join(job["id"] for job in jobs)}) as (received, ended):
        wait_until(lambda: len(received) == 4)  # each job's status and first delta
        assert sum(node.client_kill_filter(_type="pubsub") for node in server_nodes(rdb)) >= 1
        for job in jobs:
            _deltas(gateway, job, ["b"], end=True)
        assert ended.wait(15), "the stream stalled after the hub's link was lost"
    texts = {
        job["id"]: [
            data["text"] for job_id, _, kind, data in _wrapped(received) if job_id == job["id"] and kind == "delta"
        ]
        for job in jobs
    }
    assert texts == {job["id"]: ["a", "b"] for job in jobs}


def test_poll_whenTagLongPollWaits_thenAJobCreatedMeanwhileAnswersIt(gateway: httpx.Client) -> None:
    first = create_job(gateway, tags=["t"])
    _deltas(gateway, first, ["a"], end=True)
    cursor = gateway.get("/v1/poll", params={"tag": "t"}, headers=ALICE).json()["cursor"]
    answer: dict[str, Any] = {}

    def long_poll() -> None:
        answer.update(gateway.get("/v1/poll", params={"tag": "t", "cursor": cursor, "wait": 20}, headers=ALICE).json())

    poller = threading.Thread(target=long_poll)
    started = time.monotonic()
    poller.start()
    wait_until(lambda: value(gateway.get("/metrics").text, "jobstream_polls_total", kind="long") >= 1)
    later = create_job(gateway, tags=["t"])
    _deltas(gateway, later, ["b"])
    poller.join(15)
    assert time.monotonic() - started < 10, "the long-poll waited out its time"
    assert answer["events"] and {event["job_id"] for event in answer["events"]} == {later["id"]}


def test_events_whenTagGetsManyJobs_thenTheCursorStaysBounded(make_stack: Callable[..., LiveStack]) -> None:
    with make_stack(with_worker=False).client() as gateway:
        with _following(gateway, {"tag": "busy"}) as (received, _):
            wait_until(lambda: _open_streams(gateway) == 1)
            for n in range(130):
                job = create_job(gateway, tags=["busy"])
                _deltas(gateway, job, [str(n)], end=True)
            wait_until(lambda: len(received) == 130 * 4, timeout_s=30)
        assert max(len(event.id) for event in received) <= 4096
        # Ended jobs that joined first leave the cursor past 100: it never outgrows 100 jobs.
        assert max(len(JobsCursor.decode(event.id)) for event in received) == 100
        done_jobs = {json.loads(event.data)["job_id"] for event in received if event.event == "done"}
        assert len(done_jobs) == 130


def _open_streams(http: httpx.Client) -> float:
    return value(http.get("/metrics").text, "jobstream_sse_connections")


def test_events_whenQuietThenTheClientHangsUp_thenPingsThenSlotAndSubscriptionsFreed(
    make_stack: Callable[..., LiveStack], rdb: redis.Redis
) -> None:
    with make_stack(with_worker=False, heartbeat_s=0.3).client() as gateway:
        jobs = [create_job(gateway, tags=["q"]) for _ in range(2)]
        for job in jobs:
            _deltas(gateway, job, ["a"])
        for params in ({"jobs": ",".join(job["id"] for job in jobs)}, {"tag": "q"}):
            with gateway.stream("GET", "/v1/events", params=params, headers=ALICE) as response:
                assert response.status_code == 200
                seen = ""
                started = time.monotonic()
                for chunk in response.iter_text():
                    seen += chunk
                    if seen.count(": ping") >= 3:  # a quiet second: three heartbeats, no event
                        # Open, it holds one of the user's slots (checked before leaving the loop:
                        # httpx closes a response whose iteration is abandoned).
                        assert rdb.zcard(keys.sse_leases_key("alice")) == 1
                        break
                assert time.monotonic() - started < 10
                assert seen.count("event: delta") == 2
            # Hung up mid-stream: the slot and every subscription of the stream go at once.
            wait_until(lambda: rdb.zcard(keys.sse_leases_key("alice")) == 0)
            wait_until(lambda: subscribed_channels(rdb, "jobstream:*") == [])
