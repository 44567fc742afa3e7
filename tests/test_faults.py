"""Faults with real processes: Redis restarted, a gateway killed mid-stream. Nothing acknowledged is
lost, nothing is delivered twice, and every component reconnects by itself."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import ServerSentEvent, connect_sse

from jobstream import keys
from jobstream.connection import create_redis
from jobstream.cursor import parse_id
from jobstream.demo import story_text
from jobstream.devredis import EmbeddedRedis, free_port
from jobstream.store import JobRecord, JobStore, OutgoingEvent
from tests.conftest import ALICE, LiveStack, create_job, make_settings, read_sse
from tests.helpers import assert_problem, clean_env, jobstream, kill_all, scrape, wait_ready, wait_until

AOF = ["--appendonly", "yes", "--appendfsync", "everysec"]


def follow_with_resume(urls: list[str], job: dict[str, Any], timeout_s: float = 45) -> list[ServerSentEvent]:
    """Read a job's events as a browser would: on any break, reconnect (to the next gateway in
    ``urls``) with Last-Event-ID, until `done`."""
    events: list[ServerSentEvent] = []
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while time.monotonic() < deadline:
        base_url = urls[attempt % len(urls)]
        attempt += 1
        headers = {"Last-Event-ID": events[-1].id} if events else {}
        try:
            with (
                httpx.Client(base_url=base_url, timeout=10) as http,
                connect_sse(
                    http, "GET", job["links"]["events"], params={"token": job["token"]}, headers=headers
                ) as src,
            ):
                if src.response.status_code == 200:
                    for event in src.iter_sse():
                        if event.data:  # httpx-sse also yields the `retry:` block and pings, without data
                            events.append(event)
                        if event.event == "done":
                            return events
        except httpx.HTTPError:
            pass  # the gateway went away mid-read, or is not back yet
        time.sleep(0.2)  # a reconnecting client's retry delay (as EventSource's `retry`), not a wait for something
    raise AssertionError(f"no `done` within {timeout_s}s; got {len(events)} events")


def start_story(http: httpx.Client, *, words: int, delay_ms: int) -> dict[str, Any]:
    """A demo.story job: its gateway and workers need the demo job types on (JOBSTREAM_DEMO)."""
    body = {"type": "demo.story", "input": {"words": words, "delay_ms": delay_ms}}
    response = http.post("/v1/jobs", json=body, headers=ALICE)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


@contextmanager
def story_being_read(
    http: httpx.Client, urls: list[str], *, words: int, delay_ms: int, started: int
) -> Iterator[tuple[dict[str, Any], Future[list[ServerSentEvent]]]]:
    """A story job, followed in a thread by a reader that resumes across breaks (``urls`` in
    turn); yields once ``started`` events exist. The future's result is everything it read."""
    with ThreadPoolExecutor(1) as pool:
        job = start_story(http, words=words, delay_ms=delay_ms)
        reading = pool.submit(follow_with_resume, urls, job, 60)
        wait_for_events(http, job, started)
        yield job, reading


def assert_story_intact(events: list[ServerSentEvent], job_id: str, words: int) -> None:
    ids = [parse_id(event.id) for event in events]
    assert ids == sorted(set(ids)), "an event was delivered twice or out of order"
    text = "".join(event.json()["text"] for event in events if event.event == "delta")
    assert text == story_text(job_id, words), "a word was lost or repeated"
    assert events[0].event == "status" and events[-1].event == "done"
    assert events[-1].json() == {"status": "completed"}


def assert_story_survived_failover(events: list[ServerSentEvent], job_id: str, words: int) -> None:
    """After a replica took over from a killed master: events in order and once, the job ended,
    and nothing missing but what the old master had not yet replicated (the last moments)."""
    ids = [parse_id(event.id) for event in events]
    assert ids == sorted(set(ids)), "an event was delivered twice or out of order"
    assert events[-1].event == "done" and events[-1].json() == {"status": "completed"}
    got = [event.json()["text"] for event in events if event.event == "delta"]
    story = _words(story_text(job_id, words))
    assert _is_subsequence(got, story), "text that the story never had"
    assert len(story) - len(got) <= 3, "more was lost than the last moments before the crash"


def _words(text: str) -> list[str]:
    """A story as its deltas carry it: each word after the first with its leading space."""
    return [word if index == 0 else " " + word for index, word in enumerate(text.split(" "))]


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    remaining = iter(whole)
    return all(any(word == candidate for candidate in remaining) for word in part)


def test_append_whenSameBatchRetried_thenAddedOnce(redis_url: str) -> None:
    async def scenario() -> tuple[list[str], list[str], int]:
        client = create_redis(redis_url)
        store = JobStore(client, make_settings(redis_url))
        job = JobRecord.new(
            job_id="6f1c1f4e-4b8f-4c39-9a2e-1c2d3e4f5a6b", owner="a", job_type="external", input={}, ttl_s=60
        )
        await store.create(job)
        events = [OutgoingEvent("delta", '{"text":"once"}')]
        first = await store.append(job.id, events, batch="1.1")
        again = await store.append(job.id, events, batch="1.1")  # a retry after a lost reply
        await store.append(job.id, events, batch="1.2")
        length = int(await client.xlen(keys.events_key(job.id)))
        await client.aclose()
        return first, again, length

    first, again, length = asyncio.run(scenario())
    assert len(first) == 1 and again == []
    assert length == 3  # the implied `status running`, then "once" twice: batches 1.1 and 1.2


def test_redisRestart_whenAof_thenJobSurvivesEveryoneReconnectsAndReaderMissesNothing(tmp_path: Path) -> None:
    port = free_port()
    first = EmbeddedRedis(port=port, extra_args=AOF, data_dir=str(tmp_path)).start()
    second: EmbeddedRedis | None = None
    stack = LiveStack(make_settings(first.url, heartbeat_s=0.5, retry_ms=200, demo=True)).start()
    try:
        with (
            stack.client() as http,
            story_being_read(http, [stack.base_url], words=80, delay_ms=50, started=10) as (job, reading),
        ):
            first.stop()  # SIGTERM: Redis writes its append-only file and exits
            outage_started = time.monotonic()
            assert_problem(http.get("/readyz"), 503)
            refused = http.post("/v1/jobs", json={"type": "external"}, headers=ALICE)
            assert_problem(refused, 503)
            assert refused.headers["retry-after"]
            assert time.monotonic() - outage_started < 15, "requests hung while Redis was down"
            time.sleep(1)  # on purpose: Redis stays down a while, with the reader and the worker cut off

            second = EmbeddedRedis(port=port, extra_args=AOF, data_dir=str(tmp_path)).start()
            wait_ready(http, timeout_s=15)
            events = reading.result(timeout=60)
            assert_story_intact(events, job["id"], 80)
            assert http.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["status"] == "completed"
            assert http.post("/v1/jobs", json={"type": "external"}, headers=ALICE).status_code == 201
    finally:
        stack.stop()
        for server in (first, second):
            if server is not None:
                server.stop()


def wait_for_events(http: httpx.Client, job: dict[str, Any], count: int, timeout_s: float = 15) -> None:
    def enough() -> bool:
        body = http.get(job["links"]["poll"], params={"token": job["token"], "limit": count}).json()
        return len(body["events"]) >= count

    wait_until(enough, timeout_s=timeout_s, interval_s=0.05, message=f"fewer than {count} events")


def _gateway(redis_url: str, port: int, **env: str) -> subprocess.Popen[bytes]:
    environment = clean_env(
        JOBSTREAM_REDIS_URL=redis_url,
        JOBSTREAM_API_KEYS="key-alice=alice",
        JOBSTREAM_TOKEN_SECRET="s" * 32,
        JOBSTREAM_HEARTBEAT_S="0.5",
        JOBSTREAM_RETRY_MS="200",
        JOBSTREAM_DEMO="1",
        **env,
    )
    return jobstream("serve", "--port", str(port), env=environment)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "terminated"])
def test_gatewayStopped_whenMidStream_thenReaderResumesOnAnotherAndItsSlotIsFreed(
    redis_url: str, rdb: redis.Redis, stop: signal.Signals
) -> None:
    ports = [free_port(), free_port()]
    # Lease: the larger of 5 s and four heartbeats; each gateway renews its streams' leases.
    gateways = [_gateway(redis_url, port, JOBSTREAM_SSE_LEASE_S="5") for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    worker_env = clean_env(JOBSTREAM_REDIS_URL=redis_url, JOBSTREAM_TOKEN_SECRET="s" * 32, JOBSTREAM_DEMO="1")
    worker = jobstream("worker", env=worker_env)
    try:
        for url in urls:
            with httpx.Client(base_url=url, timeout=10) as http:
                wait_ready(http)
        with (
            httpx.Client(base_url=urls[0], timeout=10) as http,
            # The reader goes first to gateway 0, then to gateway 1.
            story_being_read(http, urls, words=80, delay_ms=50, started=10) as (job, reading),
        ):
            stopped_at = time.monotonic()
            gateways[0].send_signal(stop)
            exit_code = gateways[0].wait(timeout=15)
            events = reading.result(timeout=60)
        assert_story_intact(events, job["id"], 80)
        if stop == signal.SIGTERM:
            # Graceful: streams are ended at once (their readers reconnect elsewhere), then it exits.
            assert exit_code == 0 and time.monotonic() - stopped_at < 10
        # A killed gateway never released its reader's slot: it lapses with the lease.
        wait_until(
            lambda: rdb.zcard(keys.sse_leases_key("alice")) == 0,
            timeout_s=10,
            interval_s=0.2,
            message="the stopped gateway's connection slot was never freed",
        )
    finally:
        kill_all(*gateways, worker)


def test_slowReader_whenItStopsReading_thenOnlyItIsDroppedAndItResumesWithoutGap(
    make_stack: Callable[..., LiveStack],
) -> None:
    stack = make_stack(with_worker=False, send_timeout_s=1)
    with stack.client() as http, ThreadPoolExecutor(1) as pool:
        job = create_job(http)
        slow = _stalled_reader(stack.port, job)
        fast = pool.submit(follow_with_resume, [stack.base_url], job)
        _wait_for_readers(stack.port, 2)
        # 6 MiB of events: far past the slow reader's buffer bound (1 MiB) and its socket buffers.
        pad = "x" * 8000
        for batch in range(128):
            events = [{"type": "log", "data": {"n": batch * 6 + i, "pad": pad}} for i in range(6)]
            assert http.post(f"/v1/jobs/{job['id']}/events", json=events, headers=ALICE).status_code == 201
            time.sleep(0.01)  # on purpose: a steady flow, which the fast reader keeps up with
        http.post(f"/v1/jobs/{job['id']}/events", json={"type": "done", "data": {"status": "completed"}}, headers=ALICE)

        fast_events = fast.result(timeout=60)
        assert [e.json()["n"] for e in fast_events if e.event == "log"] == list(range(768))

        received = _read_until_ended(slow, timeout_s=15)  # the server dropped it: the stream ended, not a hang
        seen = [e for e in parse_frames(received) if e["event"] == "log"]
        assert 0 < len(seen) < 768, "the stalled reader should have been dropped part-way"
        _, rest = read_sse(http, job, last_event_id=seen[-1]["id"])
        numbers = [e["n"] for e in (json.loads(s["data"]) for s in seen)] + [
            e.json()["n"] for e in rest if e.event == "log"
        ]
        assert numbers == list(range(768)), "resuming after the drop lost or repeated events"


def _stalled_reader(port: int, job: dict[str, Any]) -> socket.socket:
    """An SSE client that reads the response head and then stops reading its socket."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    path = f"{job['links']['events']}?token={job['token']}"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = sock.recv(1024)
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    return sock


def _wait_for_readers(port: int, count: int, timeout_s: float = 10) -> None:
    wait_until(
        lambda: scrape(port, "jobstream_sse_connections") >= count,
        timeout_s=timeout_s,
        interval_s=0.05,
        message=f"fewer than {count} open event streams",
    )


def _read_until_ended(sock: socket.socket, timeout_s: float) -> bytes:
    """The rest of a chunked response, up to its last chunk or the connection's end (a dropped
    stream's connection may stay open for the next request, as keep-alive allows)."""
    sock.settimeout(timeout_s)
    chunks: list[bytes] = []
    with sock:
        while not b"".join(chunks[-2:]).endswith(b"\r\n0\r\n\r\n") and (chunk := sock.recv(65536)):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_frames(raw: bytes) -> list[dict[str, str]]:
    """Complete `id:` frames of a raw (chunked) HTTP response body: enough for these events."""
    events = []
    for match in re.finditer(rb"id: (\S+)\nevent: (\S+)\ndata: (\{.*?\})\n\n", raw):
        events.append({"id": match[1].decode(), "event": match[2].decode(), "data": match[3].decode()})
    return events


def test_workerTerminated_whenJobOutlastsGrace_thenHandedBackAndFinishedByAnotherAtOnce(
    make_stack: Callable[..., LiveStack], redis_url: str
) -> None:
    stack = make_stack(with_worker=False, demo=True)
    # Leases of 30 s: only a hand-back, not a lapsed lease, lets the next worker take the job at once.
    env = clean_env(
        JOBSTREAM_REDIS_URL=redis_url,
        JOBSTREAM_SHUTDOWN_GRACE_S="1",
        JOBSTREAM_WORKER_LEASE_S="30",
        JOBSTREAM_DEMO="1",
    )
    first = jobstream("worker", env=env)
    second: subprocess.Popen[bytes] | None = None
    try:
        with stack.client() as http, ThreadPoolExecutor(2) as pool:
            long_job = start_story(http, words=60, delay_ms=100)
            reading = pool.submit(follow_with_resume, [stack.base_url], long_job)
            wait_for_events(http, long_job, 5)
            short_job = start_story(http, words=5, delay_ms=50)
            short_reading = pool.submit(follow_with_resume, [stack.base_url], short_job)
            wait_for_events(http, short_job, 1)
            stopped_at = time.monotonic()
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=10) == 0
            assert time.monotonic() - stopped_at < 5  # the grace, then out
            # The short job finished inside the grace: no retry.
            short_events = short_reading.result(timeout=10)
            assert_story_intact(short_events, short_job["id"], 5)

            second = jobstream("worker", env=env)
            events = reading.result(timeout=30)
            assert time.monotonic() - stopped_at < 20, "the handed-back job waited for its lease to lapse"
        assert any(e.event == "log" and "retrying" in e.json()["message"] for e in events)
        text = "".join(e.json()["text"] for e in events if e.event == "delta")
        whole = story_text(long_job["id"], 60)
        assert text.endswith(whole) and whole.startswith(text[: len(text) - len(whole)])
        assert events[-1].json() == {"status": "completed"}
    finally:
        kill_all(first, second)
