"""Reading a job: status with ETag, SSE and polling, resume from any cut point, truncation, limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from jobstream import keys
from tests.conftest import (
    ALICE,
    BOB,
    LiveStack,
    SyncRedis,
    append,
    create_job,
    poll_all,
    read_sse,
    subscribed_channels,
)
from tests.helpers import assert_problem, value, wait_until

pytestmark = pytest.mark.on_cluster

STORY = [
    {"type": "delta", "data": {"text": "Hello"}},
    {"type": "progress", "data": {"current": 1, "total": 2, "message": "half"}},
    {"type": "delta", "data": {"text": " multi\nline\r\nworld"}},
    {"type": "log", "data": {"note": "x"}},
    {"type": "result", "data": {"words": 2}},
]


def wait_followed(rdb: SyncRedis, job: dict[str, Any]) -> None:
    """Until a gateway has subscribed to the job's channel: a reader of it is past its start."""
    wait_until(
        lambda: subscribed_channels(rdb, keys.live_channel(job["id"])),
        message=f"no reader of job {job['id']} ever subscribed",
    )


def finished_job(http: httpx.Client) -> dict[str, Any]:
    job = create_job(http)
    append(http, job, STORY)
    return job


def as_tuples(events: list[Any]) -> list[tuple[str, str, str]]:
    """(id, type, data) of httpx-sse events or poll events, for comparing both transports."""
    import json

    out = []
    for event in events:
        if isinstance(event, dict):
            out.append((event["id"], event["type"], json.dumps(event["data"], sort_keys=True)))
        else:
            out.append((event.id, event.event, json.dumps(json.loads(event.data), sort_keys=True)))
    return out


def test_status_whenFetched_thenViewAndEtag304(client: httpx.Client) -> None:
    job = create_job(client)
    first = client.get(f"/v1/jobs/{job['id']}", headers=ALICE)
    assert first.status_code == 200
    view = first.json()
    assert view["status"] == "pending" and view["progress"] is None and view["last_event_id"] is None
    etag = first.headers["etag"]
    same = client.get(f"/v1/jobs/{job['id']}", headers={**ALICE, "If-None-Match": etag})
    assert same.status_code == 304 and same.content == b""
    append(client, job, STORY[:2])
    changed = client.get(f"/v1/jobs/{job['id']}", headers={**ALICE, "If-None-Match": etag})
    assert changed.status_code == 200
    body = changed.json()
    assert body["status"] == "running" and body["started_at"]
    assert body["progress"] == {"current": 1, "total": 2, "message": "half", "percent": 50.0}


def test_status_whenOtherUserOrWrongId_then403Or404(client: httpx.Client) -> None:
    job = create_job(client)
    assert_problem(client.get(f"/v1/jobs/{job['id']}", headers=BOB), 403)
    assert_problem(client.get("/v1/jobs/6f1c1f4e-4b8f-4c39-9a2e-1c2d3e4f5a6b", headers=ALICE), 404)
    for bad in ("not-a-uuid", "6F1C1F4E-4B8F-4C39-9A2E-1C2D3E4F5A6B", "x" * 300):
        assert_problem(client.get(f"/v1/jobs/{bad}", headers=ALICE), 404)
    assert client.get(f"/v1/jobs/{job['id']}", params={"token": job["token"]}).status_code == 200
    other = create_job(client)
    assert_problem(client.get(f"/v1/jobs/{other['id']}", params={"token": job["token"]}), 403)
    assert_problem(client.get(f"/v1/jobs/{job['id']}"), 401)


def test_sse_whenJobFinished_thenHistoryDoneAndClose(client: httpx.Client) -> None:
    job = finished_job(client)
    response, events = read_sse(client, job)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    types = [event.event for event in events]
    assert types == ["status", "delta", "progress", "delta", "log", "result", "done"]
    assert events[3].json() == {"text": " multi\nline\r\nworld"}
    assert events[-1].json() == {"status": "completed"}
    assert all(event.id for event in events)


def test_sse_whenStreamOpens_thenRetryFirst(client: httpx.Client) -> None:
    job = finished_job(client)
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", params={"token": job["token"]}) as response:
        lines = [line for line in response.iter_lines()]
    assert lines[0] == "retry: 3000"
    # Each data field is one line: JSON escapes line breaks, so data can never start a frame.
    assert sum(line.startswith("data: ") for line in lines) == 7


def test_sseAndPoll_whenSameJob_thenIdenticalSequences(client: httpx.Client) -> None:
    job = finished_job(client)
    _, sse_events = read_sse(client, job)
    polled = poll_all(client, job, limit=2)
    assert as_tuples(sse_events) == as_tuples(polled)


def test_resume_whenCutAnywhere_thenNoGapNoDuplicate(client: httpx.Client) -> None:
    job = finished_job(client)
    _, full = read_sse(client, job)
    ids = [event.id for event in full]
    for cut in range(len(ids) - 1):
        _, by_header = read_sse(client, job, headers={"Last-Event-ID": ids[cut]})
        _, by_query = read_sse(client, job, last_event_id=ids[cut])
        polled = poll_all(client, job, after=ids[cut])
        expected = as_tuples(full[cut + 1 :])
        assert as_tuples(by_header) == expected
        assert as_tuples(by_query) == expected
        assert as_tuples(polled) == expected


def test_resume_whenHeaderAndQueryBothGiven_thenHeaderWins(client: httpx.Client) -> None:
    job = finished_job(client)
    _, full = read_sse(client, job)
    _, events = read_sse(client, job, headers={"Last-Event-ID": full[4].id}, last_event_id=full[1].id)
    assert [e.id for e in events] == [e.id for e in full[5:]]


def test_sse_whenLastEventIdIsDone_then204(client: httpx.Client) -> None:
    job = finished_job(client)
    _, full = read_sse(client, job)
    response, events = read_sse(client, job, headers={"Last-Event-ID": full[-1].id})
    assert response.status_code == 204 and events == []
    body = client.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "after": full[-1].id}).json()
    assert body == {"events": [], "next": full[-1].id, "status": "completed", "done": True}


def test_read_whenMalformedEventId_then400(client: httpx.Client) -> None:
    job = create_job(client)
    url = f"/v1/jobs/{job['id']}"
    for bad in ("abc", "1-2-3", "-1-0", "1732200000000", "99999999999999999999999-0", "1-0\r\nevent: x"):
        if "\n" not in bad:  # a header cannot carry a line break at all
            assert_problem(
                client.get(f"{url}/events", params={"token": job["token"]}, headers={"Last-Event-ID": bad}), 400
            )
        assert_problem(client.get(f"{url}/events", params={"token": job["token"], "last_event_id": bad}), 400)
        assert_problem(client.get(f"{url}/poll", params={"token": job["token"], "after": bad}), 400)


def test_poll_whenBadParams_then400(client: httpx.Client) -> None:
    job = create_job(client)
    url = f"/v1/jobs/{job['id']}/poll"
    for params in ({"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"wait": "31"}, {"wait": "-1"}):
        assert_problem(client.get(url, params={"token": job["token"], **params}), 400)


def test_live_whenEventsAppendedWhileReading_thenDeliveredInOrder(
    client: httpx.Client, stack: LiveStack, rdb: SyncRedis
) -> None:
    job = create_job(client)

    def produce() -> None:
        wait_followed(rdb, job)
        with stack.client() as producer:
            for index in range(20):
                append(producer, job, {"type": "delta", "data": {"text": str(index)}})
                time.sleep(0.01)  # on purpose: events trickle in, as a job writes them
            append(producer, job, {"type": "done", "data": {"status": "completed"}})

    thread = threading.Thread(target=produce)
    thread.start()
    _, events = read_sse(client, job)
    thread.join()
    assert [e.json()["text"] for e in events if e.event == "delta"] == [str(i) for i in range(20)]
    assert events[-1].event == "done"


def test_sse_whenDollar_thenOnlyNewEvents(client: httpx.Client, stack: LiveStack, rdb: SyncRedis) -> None:
    job = create_job(client)
    append(client, job, STORY[:2])

    def finish_later() -> None:
        wait_followed(rdb, job)  # `$` was resolved before the reader subscribed
        with stack.client() as producer:
            append(
                producer,
                job,
                [{"type": "delta", "data": {"text": "new"}}, {"type": "done", "data": {"status": "completed"}}],
            )

    thread = threading.Thread(target=finish_later)
    thread.start()
    _, events = read_sse(client, job, last_event_id="$")
    thread.join()
    assert [e.event for e in events] == ["delta", "done"]
    assert events[0].json() == {"text": "new"}


def test_longPoll_whenEventArrives_thenAnswersBeforeWaitEnds(
    client: httpx.Client, stack: LiveStack, rdb: SyncRedis
) -> None:
    job = create_job(client)

    def produce_later() -> None:
        wait_followed(rdb, job)  # the long-poll found nothing and is waiting
        with stack.client() as producer:
            append(producer, job, {"type": "delta", "data": {"text": "late"}})

    thread = threading.Thread(target=produce_later)
    thread.start()
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "wait": "10"})
    elapsed = time.monotonic() - started
    thread.join()
    body = response.json()
    assert response.headers["cache-control"] == "no-store"
    assert [e["type"] for e in body["events"]] == ["status", "delta"]
    assert body["status"] == "running" and body["done"] is False and body["next"] == body["events"][-1]["id"]
    assert elapsed < 8, "long-poll should answer as soon as an event exists"


def test_longPoll_whenNothingArrives_thenEmptyAfterWait(client: httpx.Client) -> None:
    job = create_job(client)
    body = client.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "wait": "0.3"}).json()
    assert body == {"events": [], "next": "0-0", "status": "pending", "done": False}


def test_truncated_whenResumeIdOlderThanOldestKept_thenReported(
    make_stack: Callable[..., LiveStack], rdb: redis.Redis
) -> None:
    stack = make_stack(with_worker=False, stream_maxlen=10)
    with stack.client() as http:
        job = create_job(http)
        first_ids = append(http, job, [{"type": "delta", "data": {"text": str(i)}} for i in range(400)])
        oldest = rdb.xrange(keys.events_key(job["id"]), count=1)[0][0]
        assert oldest != first_ids[0], "the approximate MAXLEN should have trimmed old events"
        append(http, job, {"type": "done", "data": {"status": "completed"}})
        _, events = read_sse(http, job, last_event_id=first_ids[0])
        assert events[0].event == "truncated" and events[0].json() == {"first_id": oldest}
        assert events[1].id == oldest and events[-1].event == "done"
        body = http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "after": first_ids[0]}).json()
        assert body["truncated"] == {"first_id": oldest} and body["events"][0]["id"] == oldest
        # A reader whose cursor is still kept is not told of truncation.
        _, later = read_sse(http, job, last_event_id=oldest)
        assert later[0].event == "delta"


def test_sse_whenIdle_thenPingComments(make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(with_worker=False, heartbeat_s=0.2)
    with stack.client() as http:
        job = create_job(http)
        seen: list[str] = []
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", params={"token": job["token"]}) as response:
            for line in response.iter_lines():
                seen.append(line)
                if seen.count(": ping") >= 2:
                    break
    assert seen.count(": ping") == 2


def test_sse_whenLifetimeReached_thenClosesAndResumeContinues(make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(with_worker=False, sse_max_lifetime_s=0.5, heartbeat_s=0.2)
    with stack.client() as http:
        job = create_job(http)
        append(http, job, STORY[:1])
        started = time.monotonic()
        response, events = read_sse(http, job)
        assert response.status_code == 200 and time.monotonic() - started < 10
        assert [e.event for e in events] == ["status", "delta"]
        append(http, job, {"type": "done", "data": {"status": "completed"}})
        _, rest = read_sse(http, job, headers={"Last-Event-ID": events[-1].id})
        assert [e.event for e in rest] == ["done"]


def test_sse_whenTooManyOpenPerUser_then429UntilOneCloses(make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(with_worker=False, max_sse_per_user=2)
    with stack.client() as http:
        job = create_job(http)
        url = f"/v1/jobs/{job['id']}/events"
        # With the user's own credential: streams read with a read token count per job instead.
        first = http.stream("GET", url, headers=ALICE)
        second = http.stream("GET", url, headers=ALICE)
        with first as r1, second as r2:
            assert r1.status_code == 200 and r2.status_code == 200
            refusals = value(http.get("/metrics").text, "jobstream_rate_limited_total", limit="sse")
            refused = http.get(url, headers=ALICE)
            assert_problem(refused, 429)
            assert "retry-after" in refused.headers
            assert value(http.get("/metrics").text, "jobstream_rate_limited_total", limit="sse") == refusals + 1
            # Another user is not affected.
            bob_job = create_job(http, headers=BOB)
            with http.stream("GET", f"/v1/jobs/{bob_job['id']}/events", headers=BOB) as r3:
                assert r3.status_code == 200

        def reopened() -> bool:
            with http.stream("GET", url, headers=ALICE) as again:
                return again.status_code == 200

        wait_until(
            reopened, timeout_s=5, interval_s=0.1, message="closing a stream did not release its connection slot"
        )


def test_sse_whenJobDeleted_thenOpenReaderCloses(client: httpx.Client, stack: LiveStack, rdb: SyncRedis) -> None:
    job = create_job(client)

    def delete_later() -> None:
        wait_followed(rdb, job)  # the reader is open and waiting for events
        with stack.client() as other:
            assert other.delete(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 204

    thread = threading.Thread(target=delete_later)
    thread.start()
    started = time.monotonic()
    response, _ = read_sse(client, job)
    thread.join()
    assert response.status_code == 200 and time.monotonic() - started < 10


def test_sse_whenHead_thenHeadersOnlyAndNoSlotTaken(make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(with_worker=False, max_sse_per_user=1)
    with stack.client() as http:
        job = create_job(http)
        url = f"/v1/jobs/{job['id']}/events"
        for _ in range(3):
            head = http.head(url, params={"token": job["token"]})
            assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
        with http.stream("GET", url, params={"token": job["token"]}) as response:
            assert response.status_code == 200


def test_sse_whenManyReadersComeAndGo_thenNoLeaseOrSubscriptionLeftBehind(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack(with_worker=False, max_sse_per_token_job=1)
    with stack.client() as http:
        jobs = [create_job(http) for _ in range(3)]

        def token_slots(job: dict[str, Any]) -> str:
            return keys.token_sse_leases_key(job["id"])

        streams_before = open_streams(http)
        refused = 0

        def opened(job: dict[str, Any]) -> bool:
            nonlocal refused
            with http.stream("GET", f"/v1/jobs/{job['id']}/events", params={"token": job["token"]}) as response:
                if response.status_code == 200:
                    next(response.iter_lines())  # the retry line: the stream is open
                    return True
            refused += 1
            return False

        for _ in range(40):
            for job in jobs:
                # A slot frees once the gateway has seen the previous disconnect: until then, 429.
                wait_until(
                    lambda job=job: opened(job), interval_s=0.05, message="a closed stream never gave its slot back"
                )
        assert refused < 60, f"{refused} refusals in 120 connects: slots are not released on close"
        wait_until(
            lambda: (
                sum(rdb.zcard(slots) for slots in [keys.sse_leases_key("alice"), *map(token_slots, jobs)]) == 0
                and subscribed_channels(rdb, keys.live_channel("*")) == []
            ),
            timeout_s=5,
            interval_s=0.05,
            message="a closed stream left its lease or its channel subscription behind",
        )
        assert rdb.zcard(keys.sse_leases_key("alice")) == 0
        assert subscribed_channels(rdb, keys.live_channel("*")) == []
        assert open_streams(http) == streams_before


def open_streams(http: httpx.Client) -> float:
    """The gateway's open-SSE gauge (process-wide, so tests compare it before and after)."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("jobstream_sse_connections "):
            return float(line.split()[1])
    raise AssertionError("jobstream_sse_connections is not exported")
