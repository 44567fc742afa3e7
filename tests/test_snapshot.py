"""Snapshots for late joiners (API.md 1.1): ``include=output``, ``events?snapshot=1`` and
``poll?snapshot=1``, the text kept by the append script as deltas are appended, bounded by
JOBSTREAM_SNAPSHOT_MAX_BYTES, and the output key living and dying with its job."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from jobstream import keys
from jobstream.connection import create_client
from jobstream.store import JobStore, OutgoingEvent
from tests.conftest import (
    ALICE,
    BOB,
    LiveStack,
    SyncRedis,
    append,
    create_job,
    make_settings,
    poll_all,
    read_sse,
    subscribed_channels,
)
from tests.helpers import assert_problem, redis_commands_of, wait_until

DONE = {"type": "done", "data": {"status": "completed"}}
UNICODE = [
    "é",
    "日本語",
    "😀",
    "👩\u200d👩\u200d👧",
    "a\u0000b",
    'quote " backslash \\ \n\r\t',
    "\u2028\u2029",
    "ﬁ\U0001f9ea",
]


def deltas(texts: list[str]) -> list[dict[str, Any]]:
    return [{"type": "delta", "data": {"text": text}} for text in texts]


def text_of(events: list[Any]) -> str:
    """The deltas' text of SSE events or poll events, concatenated."""
    parts = []
    for event in events:
        if isinstance(event, dict):
            if event["type"] == "delta":
                parts.append(event["data"]["text"])
        elif event.event == "delta":
            parts.append(event.json()["text"])
    return "".join(parts)


def output_of(http: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    response = http.get(f"/v1/jobs/{job['id']}", params={"include": "output"}, headers=ALICE)
    assert response.status_code == 200, response.text
    output: dict[str, Any] = response.json()["output"]
    return output


@contextmanager
def following(http: httpx.Client, job: dict[str, Any], **params: str) -> Iterator[Iterator[ServerSentEvent]]:
    """A job's event stream, open, as an iterator of its events (pings and `retry:` left out)."""
    url = f"/v1/jobs/{job['id']}/events"
    with connect_sse(http, "GET", url, params={"token": job["token"], **params}) as source:
        assert source.response.status_code == 200
        yield (event for event in source.iter_sse() if event.event != "message" or event.data)


def full_replay(http: httpx.Client, job: dict[str, Any]) -> list[ServerSentEvent]:
    _, events = read_sse(http, job)
    assert events[-1].event == "done"
    return events


def assert_snapshot_then_rest(
    events: list[ServerSentEvent], full: list[ServerSentEvent], *, status: str
) -> ServerSentEvent:
    """``events``: one snapshot, then exactly the events of ``full`` after the one it covers last;
    its text and those deltas' make the whole text. Returns the snapshot."""
    snapshot, rest = events[0], events[1:]
    assert snapshot.event == "snapshot" and [event.event for event in rest].count("snapshot") == 0
    ids = [event.id for event in full]
    assert snapshot.id in ids
    assert [(e.id, e.event, e.data) for e in rest] == [
        (e.id, e.event, e.data) for e in full[ids.index(snapshot.id) + 1 :]
    ]
    assert snapshot.json()["text"] + text_of(rest) == text_of(full)
    assert snapshot.json()["status"] == status
    return snapshot


# ---- the late reader's snapshot


def test_sse_whenLateReaderAfter1000Deltas_thenOneSnapshotWithTheWholeTextThenTheRest(client: httpx.Client) -> None:
    job = create_job(client)
    words = [f"w{index} " for index in range(1000)]
    ids = append(client, job, deltas(words))
    append(client, job, {"type": "progress", "data": {"current": 1, "total": 4}})
    with following(client, job, snapshot="1") as events:
        snapshot = next(events)
        assert snapshot.event == "snapshot"
        assert snapshot.json() == {
            "text": "".join(words),
            "progress": {"current": 1, "total": 4, "message": None, "percent": 25.0},
            "status": "running",
        }
        assert output_of(client, job) == {"text": "".join(words), "last_event_id": snapshot.id}
        later = append(client, job, [*deltas(["tail ", "end"]), {"type": "result", "data": {"n": 1}}])
        rest = list(events)
    assert snapshot.id not in ids  # the progress event after the deltas is its last
    assert [event.id for event in rest[:3]] == later
    assert [event.event for event in rest] == ["delta", "delta", "result", "done"]
    full = full_replay(client, job)
    assert len(full) == 1 + 1000 + 1 + 4  # status, deltas, progress, the rest
    assert_snapshot_then_rest([snapshot, *rest], full, status="running")


def test_sse_whenResumedFromTheSnapshotsId_thenNothingLostNorRepeatedAndNoSecondSnapshot(
    client: httpx.Client,
) -> None:
    job = create_job(client)
    append(client, job, deltas([f"{index}," for index in range(50)]))
    with following(client, job, snapshot="1") as events:
        snapshot = next(events)
    later = append(client, job, [*deltas(["a", "b"]), {"type": "log", "data": {"m": 1}}, DONE])
    _, by_header = read_sse(client, job, headers={"Last-Event-ID": snapshot.id}, snapshot="1")
    _, by_query = read_sse(client, job, last_event_id=snapshot.id, snapshot="1")
    assert [event.id for event in by_header] == later == [event.id for event in by_query]
    polled = poll_all(client, job, after=snapshot.id, snapshot="1")
    assert [event["id"] for event in polled] == later
    assert snapshot.json()["text"] + text_of(polled) == text_of(full_replay(client, job))


def test_sse_whenJobEnded_thenSnapshotThenDone(client: httpx.Client) -> None:
    job = create_job(client)
    append(
        client,
        job,
        [
            *deltas(["Hello", " multi\nline\r\nworld"]),
            {"type": "progress", "data": {"current": 1, "total": 2, "message": "half"}},
            {"type": "result", "data": {"words": 2}},
        ],
    )
    _, events = read_sse(client, job, snapshot="1")
    assert [event.event for event in events] == ["snapshot", "done"]
    assert events[0].json() == {
        "text": "Hello multi\nline\r\nworld",
        "progress": {"current": 1, "total": 2, "message": "half", "percent": 50.0},
        "status": "completed",
    }
    full = full_replay(client, job)
    assert events[0].id == full[-2].id and events[1].id == full[-1].id
    head = client.head(f"/v1/jobs/{job['id']}/events", params={"token": job["token"], "snapshot": "1"})
    assert head.status_code == 200 and head.content == b""
    # Its reconnect (Last-Event-ID: done) is told to stop, as usual.
    response, _ = read_sse(client, job, headers={"Last-Event-ID": events[1].id}, snapshot="1")
    assert response.status_code == 204


def test_sse_whenJobHasNoEventsYet_thenNoSnapshotAndTheStreamFromItsStart(
    client: httpx.Client, stack: LiveStack, rdb: SyncRedis
) -> None:
    job = create_job(client)

    def produce() -> None:
        # The reader found no events and follows the job: what comes now is live.
        wait_until(lambda: subscribed_channels(rdb, keys.live_channel(job["id"])))
        with stack.client() as producer:
            append(producer, job, [*deltas(["x", "y"]), DONE])

    thread = threading.Thread(target=produce)
    thread.start()
    _, events = read_sse(client, job, snapshot="1")
    thread.join()
    assert [event.event for event in events] == ["status", "delta", "delta", "done"]


def test_sse_whenPendingJobCancelled_thenOnlyDone(client: httpx.Client) -> None:
    job = create_job(client)
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE).status_code == 202
    _, events = read_sse(client, job, snapshot="1")
    assert [event.event for event in events] == ["done"]
    assert output_of(client, job) == {"text": "", "last_event_id": None}


def test_sse_whenRunningJobCancelled_thenSnapshotCancelledThenDone(client: httpx.Client) -> None:
    job = create_job(client)
    ids = append(client, job, deltas(["partial ", "text"]))
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE).status_code == 202
    _, events = read_sse(client, job, snapshot="1")
    assert [event.event for event in events] == ["snapshot", "done"]
    assert events[0].id == ids[-1]
    assert events[0].json() == {"text": "partial text", "progress": None, "status": "cancelled"}
    assert events[1].json() == {"status": "cancelled"}


def test_sse_whenWorkerWritesCoalescedDeltas_thenSnapshotHasEveryToken(client: httpx.Client) -> None:
    job = create_job(client, "test.tokens", input={"count": 500})
    wait_until(
        lambda: client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["status"] == "completed",
        message="the job never completed",
    )
    expected = "".join(f"t{index} " for index in range(500))
    _, events = read_sse(client, job, snapshot="1")
    assert [event.event for event in events] == ["snapshot", "done"]
    assert events[0].json()["text"] == expected == text_of(full_replay(client, job))
    assert output_of(client, job) == {"text": expected, "last_event_id": events[0].id}


def test_sse_whenReadersJoinWhileDeltasKeepComing_thenEachGetsTheWholeTextOnce(
    client: httpx.Client, stack: LiveStack
) -> None:
    job = create_job(client)
    append(client, job, deltas(["start "]))
    texts = [f"{index} " for index in range(200)]

    def produce() -> None:
        with stack.client() as producer:
            for text in texts:
                append(producer, job, deltas([text]))
            append(producer, job, DONE)

    results: list[list[ServerSentEvent]] = []

    def late_reader(delay_s: float) -> None:
        time.sleep(delay_s)  # on purpose: readers join at random points of the job
        with stack.client() as reader:
            results.append(read_sse(reader, job, snapshot="1")[1])

    readers = [threading.Thread(target=late_reader, args=(random.uniform(0, 0.5),)) for _ in range(8)]
    producer = threading.Thread(target=produce)
    for thread in [producer, *readers]:
        thread.start()
    for thread in [producer, *readers]:
        thread.join(30)
    full = full_replay(client, job)
    assert len(results) == 8
    for events in results:
        assert_snapshot_then_rest(events, full, status=json.loads(events[0].data)["status"])


# ---- the bound


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_snapshot_whenTextWouldPassTheBound_thenFrozenThereAndTheRestReplayed(
    make_stack: Callable[..., LiveStack], batch: int
) -> None:
    with make_stack(with_worker=False, snapshot_max_bytes=105).client() as http:
        job = create_job(http)
        story: list[dict[str, Any]] = []
        for index in range(30):
            story += deltas(["0123456789"])
            if index % 5 == 4:
                story.append({"type": "progress", "data": {"current": index + 1, "total": 30}})
        story += deltas(["x"])  # would fit under the bound: the snapshot stays frozen all the same
        ids: list[str] = []
        for start in range(0, len(story), batch):
            ids += append(http, job, story[start : start + batch])
        # 10 deltas make 100 bytes; the 11th would pass 105: the snapshot ends with progress 10.
        frozen_at = ids[11]
        assert story[11]["type"] == "progress"
        assert output_of(http, job) == {"text": "0123456789" * 10, "last_event_id": frozen_at}
        append(http, job, DONE)
        full = full_replay(http, job)
        _, events = read_sse(http, job, snapshot="1")
        snapshot = assert_snapshot_then_rest(events, full, status="completed")
        assert snapshot.id == frozen_at
        assert snapshot.json()["progress"] == {"current": 10, "total": 30, "message": None, "percent": 33.33}
        assert [event.id for event in events[1:-1]] == ids[12:]
        assert http.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["progress"]["current"] == 30


def test_snapshot_whenFirstDeltaAlonePassesTheBound_thenItCoversTheEventsBefore(
    make_stack: Callable[..., LiveStack],
) -> None:
    with make_stack(with_worker=False, snapshot_max_bytes=10).client() as http:
        job = create_job(http)
        ids = append(http, job, [{"type": "log", "data": {"m": 1}}, *deltas(["more than ten bytes", "a"]), DONE])
        _, events = read_sse(http, job, snapshot="1")
        assert events[0].id == ids[0] and events[0].json()["text"] == ""
        assert [event.event for event in events[1:]] == ["delta", "delta", "done"]
        assert text_of(events[1:]) == "more than ten bytesa"


def test_snapshot_whenEventsAfterAFrozenSnapshotWereTrimmed_thenTruncatedFollowsTheSnapshot(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    with make_stack(with_worker=False, snapshot_max_bytes=5, stream_maxlen=10).client() as http:
        job = create_job(http)
        ids = append(http, job, [*deltas(["abcde", "f", *(str(index % 10) for index in range(400))]), DONE])
        oldest = rdb.xrange(keys.events_key(job["id"]), count=1)[0][0]
        assert oldest in ids[2:], "the approximate MAXLEN should have trimmed the events after the snapshot"
        _, events = read_sse(http, job, snapshot="1")
        assert [event.event for event in events[:3]] == ["snapshot", "truncated", "delta"]
        assert events[0].id == ids[0] and events[0].json()["text"] == "abcde"
        assert events[1].json() == {"first_id": oldest} and events[2].id == oldest
        body = http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "snapshot": "1"}).json()
        assert body["truncated"] == {"first_id": oldest}
        assert [event["id"] for event in body["events"][:2]] == [ids[0], oldest]


def test_snapshot_whenUnicode_thenConcatenatedByteForByte(make_stack: Callable[..., LiveStack]) -> None:
    with make_stack(with_worker=False).client() as http:
        job = create_job(http)
        append(http, job, deltas(UNICODE[:3]))
        for text in UNICODE[3:]:
            append(http, job, deltas([text]))
        assert output_of(http, job)["text"] == "".join(UNICODE)
        append(http, job, DONE)
        _, events = read_sse(http, job, snapshot="1")
        assert events[0].json()["text"] == "".join(UNICODE) == text_of(full_replay(http, job))


def test_snapshot_whenDataHasUnicodeEscapes_thenDecodedText(
    make_stack: Callable[..., LiveStack], redis_url: str
) -> None:
    """A producer that writes ASCII-only JSON (surrogate pairs as escapes) gets the same text."""
    with make_stack(with_worker=False).client() as http:
        job = create_job(http)

        async def write() -> None:
            settings = make_settings(redis_url)
            client = create_client(settings)
            try:
                escaped = [OutgoingEvent("delta", json.dumps({"text": text})) for text in UNICODE]
                assert all(event.data.isascii() for event in escaped)
                await JobStore(client, settings).append(job["id"], escaped)
            finally:
                await client.aclose()

        asyncio.run(write())
        assert output_of(http, job)["text"] == "".join(UNICODE)


def test_snapshot_whenBoundFallsInsideAMultiByteText_thenTheWholeDeltaIsLeftOut(
    make_stack: Callable[..., LiveStack],
) -> None:
    with make_stack(with_worker=False, snapshot_max_bytes=10).client() as http:
        job = create_job(http)
        append(http, job, deltas(["😀", "😀", "😀"]))
        output = output_of(http, job)
        assert output["text"] == "😀😀" and len(output["text"].encode()) == 8


# ---- include=output, poll, bad input, snapshots off


def test_include_whenNoDeltas_thenEmptyTextCoveringWhatThereIs(client: httpx.Client) -> None:
    job = create_job(client)
    assert output_of(client, job) == {"text": "", "last_event_id": None}
    (progress,) = append(client, job, {"type": "progress", "data": {"current": 1}})
    assert output_of(client, job) == {"text": "", "last_event_id": progress}


def test_include_whenOutput_thenTheStatusDocumentWithOutputAndItsOwnEtag(client: httpx.Client) -> None:
    job = create_job(client)
    ids = append(client, job, deltas(["a", "b"]))
    url = f"/v1/jobs/{job['id']}"
    plain = client.get(url, headers=ALICE)
    with_output = client.get(url, params={"include": "output"}, headers=ALICE)
    assert with_output.json() == {**plain.json(), "output": {"text": "ab", "last_event_id": ids[-1]}}
    assert with_output.headers["etag"] != plain.headers["etag"]
    again = client.get(
        url, params={"include": "output"}, headers={**ALICE, "If-None-Match": with_output.headers["etag"]}
    )
    assert again.status_code == 304
    by_token = client.get(url, params={"include": "output", "token": job["token"]})
    assert by_token.json()["output"]["text"] == "ab"


def test_include_whenAnyOtherValue_then400AfterTheJobsOwnChecks(client: httpx.Client) -> None:
    job = create_job(client)
    url = f"/v1/jobs/{job['id']}"
    for params in ({"include": "text"}, {"include": ""}, {"include": "output,progress"}, {"include": ["output"] * 2}):
        body = assert_problem(client.get(url, params=params, headers=ALICE), 400)
        assert body["errors"] == [{"loc": ["include"], "msg": "the one value is 'output'"}]
    assert_problem(client.get(url, params={"include": "x"}, headers=BOB), 403)
    assert_problem(
        client.get("/v1/jobs/6f1c1f4e-4b8f-4c39-9a2e-1c2d3e4f5a6b", params={"include": "x"}, headers=ALICE), 404
    )
    assert_problem(client.get(url, params={"include": "output"}, headers=BOB), 403)


def test_snapshotParam_whenNotABoolean_then400AfterTheJobsOwnChecks(client: httpx.Client) -> None:
    job = create_job(client)
    for endpoint in ("events", "poll"):
        url = f"/v1/jobs/{job['id']}/{endpoint}"
        assert_problem(client.get(url, params={"token": job["token"], "snapshot": "maybe"}), 400)
        assert_problem(client.get(url, params={"snapshot": "maybe"}, headers=BOB), 403)


def test_poll_whenSnapshot_thenFirstEventOfTheAnswerWithinLimitAndNextAfterTheLastReturned(
    make_stack: Callable[..., LiveStack],
) -> None:
    with make_stack(with_worker=False, snapshot_max_bytes=20).client() as http:
        job = create_job(http)
        ids = append(http, job, deltas([f"{index:04d}-" for index in range(10)]))
        url = f"/v1/jobs/{job['id']}/poll"
        body = http.get(url, params={"token": job["token"], "snapshot": "1", "limit": "3"}).json()
        assert [event["type"] for event in body["events"]] == ["snapshot", "delta", "delta"]
        snapshot = body["events"][0]
        assert snapshot == {
            "id": ids[3],
            "type": "snapshot",
            "data": {"text": "0000-0001-0002-0003-", "progress": None, "status": "running"},
        }
        assert [event["id"] for event in body["events"][1:]] == ids[4:6]
        assert body["next"] == ids[5] and body["done"] is False and body["status"] == "running"
        only = http.get(url, params={"token": job["token"], "snapshot": "true", "limit": "1"}).json()
        assert only["events"] == [snapshot] and only["next"] == ids[3]
        append(http, job, DONE)
        rest = poll_all(http, job, after=body["next"])
        assert snapshot["data"]["text"] + text_of(body["events"][1:] + rest) == "".join(
            f"{index:04d}-" for index in range(10)
        )
        # A cursor wins over snapshot=1, as on the event stream.
        resumed = http.get(url, params={"token": job["token"], "snapshot": "1", "after": ids[8]}).json()
        assert [event["id"] for event in resumed["events"]][0] == ids[9]


def test_poll_whenSnapshotOfAnEndedJob_thenSnapshotThenDone(client: httpx.Client) -> None:
    job = create_job(client)
    append(client, job, [*deltas(["one ", "two"]), DONE])
    url = f"/v1/jobs/{job['id']}/poll"
    body = client.get(url, params={"token": job["token"], "snapshot": "1"}).json()
    assert [event["type"] for event in body["events"]] == ["snapshot", "done"]
    assert body["events"][0]["data"] == {"text": "one two", "progress": None, "status": "completed"}
    assert body["done"] is True and body["status"] == "completed"
    first = client.get(url, params={"token": job["token"], "snapshot": "1", "limit": "1"}).json()
    assert [event["type"] for event in first["events"]] == ["snapshot"] and first["done"] is False
    then = client.get(url, params={"token": job["token"], "after": first["next"]}).json()
    assert [event["type"] for event in then["events"]] == ["done"] and then["done"] is True


def test_longPoll_whenSnapshotExists_thenAnsweredAtOnce(client: httpx.Client) -> None:
    job = create_job(client)
    append(client, job, deltas(["ready"]))
    started = time.monotonic()
    params = {"token": job["token"], "snapshot": "1", "wait": "10"}
    body = client.get(f"/v1/jobs/{job['id']}/poll", params=params).json()
    assert time.monotonic() - started < 5
    assert [event["type"] for event in body["events"]] == ["snapshot"]


def test_snapshots_whenOff_thenNothingKeptPlainReplayAnd409ForInclude(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    with make_stack(with_worker=False, snapshot_max_bytes=0).client() as http:
        job = create_job(http)
        append(http, job, [*deltas(["a", "b"]), DONE])
        assert "output_max" not in rdb.hgetall(keys.meta_key(job["id"]))
        assert not rdb.exists(keys.output_key(job["id"]))
        _, events = read_sse(http, job, snapshot="1")
        assert [event.event for event in events] == ["status", "delta", "delta", "done"]
        polled = http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "snapshot": "1"}).json()
        assert [event["type"] for event in polled["events"]] == ["status", "delta", "delta", "done"]
        assert_problem(http.get(f"/v1/jobs/{job['id']}", params={"include": "output"}, headers=ALICE), 409)


def test_snapshot_whenItsTextWasEvicted_thenNoSnapshotRatherThanAWrongOne(client: httpx.Client, rdb: SyncRedis) -> None:
    job = create_job(client)
    append(client, job, [*deltas(["a", "b"]), DONE])
    rdb.delete(keys.output_key(job["id"]))  # as an eviction policy may, on its own
    assert output_of(client, job) == {"text": "", "last_event_id": None}
    _, events = read_sse(client, job, snapshot="1")
    assert [event.event for event in events] == ["status", "delta", "delta", "done"]


# ---- the output key's life


def test_outputKey_whenJobDeleted_thenRemoved(client: httpx.Client, rdb: SyncRedis) -> None:
    job = create_job(client)
    append(client, job, deltas(["some text"]))
    assert rdb.get(keys.output_key(job["id"])) == "some text"
    assert client.delete(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 204
    assert not rdb.exists(keys.output_key(job["id"]))


def test_outputKey_whenAppendedAndEnded_thenItExpiresWithTheJob(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    with make_stack(with_worker=False, retention_s=1).client() as http:
        job = create_job(http, ttl=300)
        meta, output = keys.meta_key(job["id"]), keys.output_key(job["id"])
        append(http, job, deltas(["text"]))
        assert 290 < rdb.ttl(output) <= 300 and abs(rdb.ttl(output) - rdb.ttl(meta)) <= 1
        append(http, job, [*deltas([" more"]), DONE])
        assert rdb.ttl(output) != -1 and rdb.ttl(output) <= 1  # the retention's TTL (-2: gone already)
        wait_until(
            lambda: not rdb.exists(meta) and not rdb.exists(output),
            timeout_s=5,
            message="the output key did not expire with its job",
        )


def test_roundTrips_whenIncludeOrPollSnapshot_thenOneScript(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    with make_stack(with_worker=False).client() as http:
        job = create_job(http)
        append(http, job, deltas(["a", "b"]))
        url = f"/v1/jobs/{job['id']}"
        assert redis_commands_of(rdb, lambda: http.get(url, params={"include": "output"}, headers=ALICE)) == ["evalsha"]
        params = {"token": job["token"], "snapshot": "1"}
        assert redis_commands_of(rdb, lambda: http.get(f"{url}/poll", params=params)) == ["evalsha"]


# ---- on a Redis Cluster


@pytest.mark.parametrize("redis_backend", ["cluster"], scope="session")
def test_cluster_whenSnapshotBoundedIncludedPolledAndDeleted_thenAsOnOneRedis(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    with make_stack(snapshot_max_bytes=30).client() as http:
        job = create_job(http)
        ids = append(http, job, deltas(UNICODE + ["0123456789"] * 5))
        output = output_of(http, job)
        assert len(output["text"].encode()) <= 30 and "".join(UNICODE).startswith(output["text"])
        assert output["last_event_id"] in ids
        append(http, job, DONE)
        full = full_replay(http, job)
        _, events = read_sse(http, job, snapshot="1")
        assert_snapshot_then_rest(events, full, status="completed")
        polled = poll_all(http, job, snapshot="1", limit=3)
        assert polled[0]["type"] == "snapshot" and polled[0]["id"] == events[0].id
        assert polled[0]["data"]["text"] + text_of(polled[1:]) == text_of(full)
        assert http.delete(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 204
        assert not rdb.exists(keys.output_key(job["id"])) and not rdb.exists(keys.meta_key(job["id"]))


def test_openapi_whenServed_thenDocumentsIncludeSnapshotAndTheOutput(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]

    def parameters(path: str) -> dict[str, Any]:
        return {param["name"]: param["schema"] for param in paths[path]["get"]["parameters"]}

    assert parameters("/v1/jobs/{job_id}")["include"] == {"enum": ["output"]}
    assert {"400", "409"} <= paths["/v1/jobs/{job_id}"]["get"]["responses"].keys()
    for path in ("/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/poll"):
        assert parameters(path)["snapshot"] == {"type": "boolean", "default": False}
    assert schemas["Job"]["properties"]["output"]["$ref"] == "#/components/schemas/Output"
    assert schemas["Output"]["required"] == ["text", "last_event_id"]
    assert schemas["Snapshot"]["required"] == ["text", "progress", "status"]
