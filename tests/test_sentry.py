"""Sentry, with the real SDK in a real gateway and worker, reporting to a local HTTP server that
plays Sentry's ingest endpoint: the envelopes it receives are read back and checked."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from jobstream.devredis import free_port
from tests.conftest import read_sse
from tests.helpers import app_env, jobstream, kill_all, wait_ready, wait_until

API_KEY = "sentry-test-key-0123456789"
TOKEN_SECRET = "sentry-test-token-secret-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


class FakeIngest:
    """Accepts envelopes on /api/<project>/envelope/ and keeps their raw (decompressed) bytes."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with outer._lock:
                    outer.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def items(self, kind: str) -> list[dict[str, Any]]:
        """Payloads of every item of a type ("event", "transaction") received so far."""
        with self._lock:
            bodies = list(self.bodies)
        found = []
        for body in bodies:
            for header, payload in _envelope_items(body):
                if header.get("type") == kind:
                    found.append(json.loads(payload))
        return found

    def raw(self) -> bytes:
        with self._lock:
            return b"\n".join(self.bodies)


def _envelope_items(body: bytes) -> Iterator[tuple[dict[str, Any], bytes]]:
    _, _, rest = body.partition(b"\n")  # the envelope's own header
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        if not line.strip():
            continue
        header = json.loads(line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"] :].removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        yield header, payload


@pytest.fixture
def ingest() -> Iterator[FakeIngest]:
    fake = FakeIngest()
    yield fake
    fake.server.shutdown()


def _duration_s(transaction: dict[str, Any]) -> float:
    def seconds(stamp: str | float) -> float:
        return stamp if isinstance(stamp, float) else datetime.fromisoformat(stamp).timestamp()

    return seconds(transaction["timestamp"]) - seconds(transaction["start_timestamp"])


def _wait_for(ingest: FakeIngest, kind: str, predicate: Any, timeout_s: float = 15) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: next((item for item in ingest.items(kind) if predicate(item)), None),
        timeout_s=timeout_s,
        interval_s=0.1,
        message=f"no matching {kind}",
    )
    return found


def sentry_env(redis_url: str, ingest: FakeIngest, **extra: str) -> dict[str, str]:
    """A gateway's or worker's environment reporting every transaction to ``ingest``."""
    return app_env(
        redis_url,
        API_KEY,
        TOKEN_SECRET,
        JOBSTREAM_SENTRY_DSN=f"http://publickey@127.0.0.1:{ingest.port}/42",
        JOBSTREAM_SENTRY_TRACES_SAMPLE_RATE="1.0",
        **extra,
    )


def test_sentry_whenJobsRunAndFail_thenLinkedTracesTaggedErrorsAndNothingSecret(
    redis_url: str, ingest: FakeIngest
) -> None:
    port = free_port()
    env = sentry_env(
        redis_url, ingest, JOBSTREAM_SENTRY_ENVIRONMENT="ci", JOBSTREAM_HEARTBEAT_S="0.5", JOBSTREAM_DEMO="1"
    )
    gateway = jobstream("serve", "--port", str(port), env=env)
    worker = jobstream("worker", env=env)
    tokens = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            wait_ready(http)
            boom = http.post("/v1/jobs", json={"type": "test.boom"}, headers=HEADERS).json()
            story = http.post(
                "/v1/jobs", json={"type": "demo.story", "input": {"words": 20, "delay_ms": 100}}, headers=HEADERS
            ).json()
            external = http.post("/v1/jobs", json={"type": "external"}, headers=HEADERS).json()
            tokens = [boom["token"], story["token"], external["token"]]
            read_sse(http, boom)
            started = time.monotonic()
            _, events = read_sse(http, story)
            streamed_s = time.monotonic() - started
            assert events[-1].event == "done" and streamed_s > 1.5
            poll = http.get(external["links"]["poll"], params={"token": external["token"], "wait": 1})
            assert poll.status_code == 200

        error = _wait_for(ingest, "event", lambda e: e.get("tags", {}).get("job_id") == boom["id"])
        assert error["exception"]["values"][-1]["type"] == "RuntimeError"
        assert error["tags"]["job_type"] == "test.boom" and str(error["tags"]["attempt"]) == "1"
        assert error["tags"]["component"] == "worker"
        assert error["environment"] == "ci" and error["release"].startswith("jobstream@")
        crumbs = [c.get("message") for c in error["breadcrumbs"]["values"] if c.get("category") == "job"]
        assert "started" in crumbs

        # The worker's run of the job continues the trace of the request that created it.
        creates = [t for t in ingest.items("transaction") if t["transaction"] == "/v1/jobs"]
        run = _wait_for(ingest, "transaction", lambda t: t["transaction"] == "job test.boom")
        assert run["contexts"]["trace"]["op"] == "queue.process"
        assert run["contexts"]["trace"]["trace_id"] == error["contexts"]["trace"]["trace_id"]
        assert run["contexts"]["trace"]["trace_id"] in {t["contexts"]["trace"]["trace_id"] for t in creates}

        # The event stream's transaction ends once the stream is set up, not when it closes.
        streams = [t for t in ingest.items("transaction") if t["transaction"] == "/v1/jobs/{job_id}/events"] or [
            _wait_for(ingest, "transaction", lambda t: t["transaction"] == "/v1/jobs/{job_id}/events")
        ]
        longest = max(_duration_s(t) for t in streams)
        assert longest < streamed_s / 2, f"a stream transaction lasted {longest:.2f}s of {streamed_s:.2f}s"

        long_poll = _wait_for(ingest, "transaction", lambda t: t["transaction"] == "/v1/jobs/{job_id}/poll")
        assert "long_poll.wait" in {span["op"] for span in long_poll["spans"]}
    finally:
        kill_all(gateway, worker)
    sent = ingest.raw()
    for secret in [API_KEY, TOKEN_SECRET, *tokens]:
        assert secret.encode() not in sent, "a secret reached Sentry"
    assert b"Bearer" not in sent


def test_sentry_whenStreamIdleBeforeFirstEvent_thenTransactionEndsOnceStreamSetUp(
    redis_url: str, ingest: FakeIngest
) -> None:
    port = free_port()
    # No ping while the stream is idle: nothing is written at all.
    env = sentry_env(redis_url, ingest, JOBSTREAM_HEARTBEAT_S="30")
    gateway = jobstream("serve", "--port", str(port), env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            wait_ready(http)
            job = http.post("/v1/jobs", json={"type": "external"}, headers=HEADERS).json()
            started = time.monotonic()
            with http.stream("GET", job["links"]["events"], params={"token": job["token"]}) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("retry:")  # set up: headers and retry written
                time.sleep(2.5)  # the job produces nothing for a while: the idleness under test
                http.post(
                    job["links"]["events"],
                    json=[
                        {"type": "delta", "data": {"text": "late"}},
                        {"type": "done", "data": {"status": "completed"}},
                    ],
                    headers=HEADERS,
                ).raise_for_status()
                assert "event: done" in list(lines)
            streamed_s = time.monotonic() - started

        stream_transaction = _wait_for(
            ingest,
            "transaction",
            lambda t: t["transaction"] == "/v1/jobs/{job_id}/events" and t["request"]["method"] == "GET",
        )
        duration_s = _duration_s(stream_transaction)
        assert duration_s < streamed_s / 5, f"the stream's transaction lasted {duration_s:.2f}s of {streamed_s:.2f}s"
    finally:
        kill_all(gateway)


def test_scrubber_whenSecretsAnywhere_thenFiltered() -> None:
    from jobstream.sentry import FILTERED, Scrubber

    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    scrub = Scrubber(["key-alice-123", "abc"])  # too short to be a secret worth replacing: kept
    event = {
        "request": {
            "headers": {"Authorization": "Bearer x", "X-Api-Key": "k", "Accept": "text/event-stream"},
            "query_string": f"token={jwt}&after=0-0",
            "url": "http://gw/v1/jobs/1/events?access_token=zzz",
        },
        "breadcrumbs": {"values": [{"message": "used key-alice-123 and abc", "data": {"t": [jwt]}}]},
        "count": 3,
    }
    cleaned = scrub.event(event, None)
    assert cleaned["request"]["headers"] == {
        "Authorization": FILTERED,
        "X-Api-Key": FILTERED,
        "Accept": "text/event-stream",
    }
    assert cleaned["request"]["query_string"] == f"token={FILTERED}&after=0-0"
    assert cleaned["request"]["url"].endswith(f"?access_token={FILTERED}")
    assert cleaned["breadcrumbs"]["values"][0] == {"message": f"used {FILTERED} and abc", "data": {"t": [FILTERED]}}
    assert cleaned["count"] == 3
