"""What a real gateway process logs and reports to Sentry when a client hangs up mid-request (a
quiet line, nothing else) and when a request fails unexpectedly (one error line with the request
id, one Sentry event), read from its JSON log and from a local server playing Sentry's ingest."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from jobstream import keys
from jobstream.devredis import free_port
from tests.helpers import jobstream, kill_all, wait_ready, wait_until
from tests.test_logs import _lines
from tests.test_sentry import API_KEY, FakeIngest, _wait_for, sentry_env

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


class Gateway:
    """`jobstream serve` with JSON logs to a file and Sentry reporting to ``ingest``."""

    def __init__(self, redis_url: str, ingest: FakeIngest, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = sentry_env(redis_url, ingest, JOBSTREAM_LOG_FORMAT="json")
        self._log = log_path.open("wb")
        self.process: subprocess.Popen[bytes] = jobstream("serve", "--port", str(self.port), env=env, stderr=self._log)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=15)
        wait_ready(self.http)

    def get_alone(self, url: str, **kwargs: Any) -> httpx.Response:
        """A request on a connection of its own: uvicorn closes the connection after an
        exception that left the app, which a pooled connection's next request would run into."""
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=15) as http:
            return http.get(url, **kwargs)

    def lines(self) -> list[dict[str, Any]]:
        return _lines(self.log_path)

    def wait_for_request(self, request_id: str, timeout_s: float = 15) -> None:
        """Until a line of request ``request_id`` is logged (whatever it says)."""
        wait_until(
            lambda: any(line.get("request_id") == request_id for line in self.lines()),
            timeout_s=timeout_s,
            message=f"nothing logged for request {request_id}",
        )

    def stop(self) -> list[dict[str, Any]]:
        """Stop the process (every line written) and return its whole log."""
        self.http.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=20)
        self._log.close()
        return self.lines()

    def close(self) -> None:
        self.http.close()
        kill_all(self.process)
        self._log.close()


@pytest.fixture
def sentry_ingest() -> Iterator[FakeIngest]:
    fake = FakeIngest()
    yield fake
    fake.server.shutdown()


@pytest.fixture
def gateway(redis_url: str, sentry_ingest: FakeIngest, tmp_path: Path) -> Iterator[Gateway]:
    started = Gateway(redis_url, sentry_ingest, tmp_path / "gateway.log")
    yield started
    started.close()


def _sentinel(gateway: Gateway, ingest: FakeIngest) -> None:
    """A later request, and its transaction received: Sentry's transport sends in the order things
    were captured, so any event captured before it has been received too."""
    assert gateway.http.get("/healthz").status_code == 200
    _wait_for(ingest, "transaction", lambda t: t["transaction"] == "/healthz")


def _hang_up(port: int, request_id: str, *, reset: bool) -> None:
    """Headers announcing 1000 bytes of body, 10 of them, then close (with a FIN, or a RST)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            (
                "POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                f"X-Request-ID: {request_id}\r\nContent-Length: 1000\r\n\r\n"
            ).encode()
            + b'{"type": "'
        )
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_clientHangsUpMidBody_thenOneQuietLineNoErrorAndNothingSentToSentry(
    gateway: Gateway,
    sentry_ingest: FakeIngest,
) -> None:
    hang_ups = ["hangup-fin", "hangup-rst"]
    for request_id in hang_ups:
        _hang_up(gateway.port, request_id, reset=request_id.endswith("rst"))
        gateway.wait_for_request(request_id)
    _sentinel(gateway, sentry_ingest)
    lines = gateway.stop()

    for request_id in hang_ups:
        about = [line for line in lines if line.get("request_id") == request_id]
        assert len(about) == 1, about
        assert about[0]["level"] in ("info", "debug") and "exception" not in about[0], about
    assert [line for line in lines if line["level"] not in ("info", "debug") or "exception" in line] == []
    assert sentry_ingest.items("event") == [], "a client's hang-up reached Sentry"


def test_unexpectedError_thenLoggedOnceWithRequestIdAndReportedOnce(
    gateway: Gateway,
    sentry_ingest: FakeIngest,
    redis_url: str,
) -> None:
    job = gateway.http.post("/v1/jobs", json={"type": "external"}, headers=HEADERS).json()
    # Metadata no gateway wrote: reading it fails in the router's path and in the event stream's.
    with redis.Redis.from_url(redis_url) as rdb:
        rdb.hset(keys.meta_key(job["id"]), "status", "no-such-status")
    status = gateway.get_alone(job["links"]["self"], headers={**HEADERS, "X-Request-ID": "boom-status"})
    stream = gateway.get_alone(
        job["links"]["events"], params={"token": job["token"]}, headers={"X-Request-ID": "boom-stream"}
    )
    for response in (status, stream):
        assert response.status_code == 500 and response.json()["detail"] == "An unexpected error occurred."
    _sentinel(gateway, sentry_ingest)
    lines = gateway.stop()

    errors = [line for line in lines if line["level"] not in ("info", "debug") or "exception" in line]
    assert sorted(str(line.get("request_id")) for line in errors) == ["boom-status", "boom-stream"], errors
    for line in errors:
        assert line["logger"] == "jobstream.errors" and "ValueError" in line["exception"]
    events = sentry_ingest.items("event")
    assert len(events) == 2, [event.get("exception") for event in events]
    assert {event["exception"]["values"][-1]["type"] for event in events} == {"ValueError"}
