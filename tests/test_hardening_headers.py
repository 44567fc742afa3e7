"""Request heads and slow clients (API.md, 1.1 "Hardening"): request headers over 16 KiB in all
are 431; a gateway never holds more than a bounded head per connection, however much a client
sends; a request that does not arrive in time is answered 408 and its connection closed; a huge
bad credential cannot stall everyone else's requests. Mostly against a real `serve` process."""

from __future__ import annotations

import re
import signal
import socket
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest

from jobstream.devredis import EmbeddedRedis, free_port
from tests.conftest import LiveStack, create_job
from tests.helpers import app_env, assert_problem, jobstream, kill_all, wait_ready, wait_until

API_KEY = "headers-api-key-0123456789"
TOKEN_SECRET = "headers-token-secret-0123456789abcdef"
JWT_SECRET = "headers-jwt-secret-0123456789abcdef"
#: The gateway's JOBSTREAM_REQUEST_TIMEOUT_S, short so that slow clients are dropped while we watch.
REQUEST_TIMEOUT_S = 2.0


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    pid: int
    port: int
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=15)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found is not None
        return int(found.group(1))


@pytest.fixture(scope="module")
def gateway(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    port = free_port()
    env = app_env(
        redis_server.url,
        API_KEY,
        TOKEN_SECRET,
        JOBSTREAM_JWT_SECRET=JWT_SECRET,
        JOBSTREAM_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S),
    )
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with log.open("wb") as stderr:
        process = jobstream("serve", "--port", str(port), env=env, stderr=stderr)
    try:
        gateway = Gateway(process, process.pid, port, log)
        with gateway.client() as http:
            wait_ready(http)
        yield gateway
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        kill_all(process)


def _connect(port: int, timeout_s: float = 15) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.settimeout(timeout_s)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its answer counts as closing)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


# ---- 431


def test_headers_whenOver16KiBInAll_then431Problem_andJustUnderServed(
    gateway: Gateway, make_stack: Callable[..., LiveStack]
) -> None:
    stack = make_stack(with_worker=False)
    job_events = f"/v1/jobs/{uuid.uuid4()}/events"
    for http in (gateway.client(), stack.client()):  # the real process, and the app under plain uvicorn
        with http:
            big = {"X-Filler": "a" * (17 * 1024)}
            spread = {f"X-Filler-{index}": "b" * 1100 for index in range(16)}  # 16 of them: ~17.4 KiB
            for path, headers in (("/healthz", big), ("/healthz", spread), (job_events, big)):
                body = assert_problem(http.get(path, headers=headers), 431)
                assert "16384" in str(body["detail"])
            # Past 32 KiB of head the gateway's protocol answers before the head is even complete
            # (under plain uvicorn the app still does).
            assert_problem(http.get("/healthz", headers={"X-Filler": "c" * (40 * 1024)}), 431)
            under = {"X-Filler": "d" * (15 * 1024)}
            assert http.get("/healthz", headers=under).status_code == 200
            assert_problem(http.get(job_events, headers=under), 401)  # through to the route


def test_headers_when8MB_then431OrClosedAndNeverServed(gateway: Gateway) -> None:
    with _connect(gateway.port) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Filler: "
        try:
            sock.sendall(head + b"a" * (8 * 1024 * 1024) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: the answer may be lost with the reset
        answer = _read_until_closed(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    if answer:
        assert b"content-type: application/problem+json" in answer and b"connection: close" in answer
    with gateway.client() as http:
        assert http.get("/healthz").status_code == 200


def test_unfinishedHeaders_whenFiveConnectionsSend20MiBEach_thenMemoryStaysFlat(gateway: Gateway) -> None:
    with gateway.client() as http:
        for _ in range(20):
            assert http.get("/healthz").status_code == 200
    before = gateway.rss_kib()
    total = 20 * 1024 * 1024
    sent: list[int] = [0] * 5
    sockets = [_connect(gateway.port, timeout_s=60) for _ in sent]

    def flood(index: int) -> None:
        sock, chunk = sockets[index], b"a" * 65536
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Filler: ")
            while sent[index] < total:
                sock.sendall(chunk)
                sent[index] += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass

    started = time.monotonic()
    threads = [threading.Thread(target=flood, args=(index,)) for index in range(len(sockets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    after = gateway.rss_kib()  # with every connection still open on our side
    try:
        grown_mib = (after - before) / 1024
        print(
            f"RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB; sent {[n >> 10 for n in sent]} KiB in {elapsed:.2f} s"
        )
        assert grown_mib < 16, f"the gateway grew by {grown_mib:.0f} MiB holding unfinished headers"
        for sock in sockets:
            answer = _read_until_closed(sock)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    finally:
        for sock in sockets:
            sock.close()
    with gateway.client() as http:
        assert http.get("/healthz").status_code == 200


# ---- credentials that cost


def test_badBearers_when6MB_thenHealthzKeepsAnswering(gateway: Gateway) -> None:
    """Three 6 MB JWT-shaped bearers with a bad signature, sent while /healthz is timed: before,
    each was decoded twice on the event loop (~1 s), and /healthz waited behind them."""
    bearer = jwt.encode({"sub": "alice", "pad": "x" * 4_500_000}, "a-wrong-secret-0123456789abcdef-0123")
    assert len(bearer) > 6_000_000
    request = (
        f"GET /v1/jobs/{uuid.uuid4()} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {bearer}\r\n\r\n"
    ).encode()
    statuses: list[str] = []

    def send_bad_bearer() -> None:
        # A raw socket, the request built beforehand: this process holds no lock while it sends,
        # so what /healthz waits for below is the gateway.
        with _connect(gateway.port) as sock:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed while we were still sending
            statuses.append(_read_until_closed(sock).split(b"\r\n", 1)[0].decode() or "closed")

    with gateway.client() as http:

        def healthz_s() -> float:
            started = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            return time.perf_counter() - started

        baseline = [healthz_s() for _ in range(20)]
        senders = [threading.Thread(target=send_bad_bearer) for _ in range(3)]
        for thread in senders:
            thread.start()
        under_load = [healthz_s()]
        while any(thread.is_alive() for thread in senders) or len(under_load) < 20:
            under_load.append(healthz_s())
        for thread in senders:
            thread.join()
    median_ms, worst_ms = statistics.median(baseline) * 1000, max(under_load) * 1000
    print(f"/healthz: median {median_ms:.1f} ms alone, worst {worst_ms:.1f} ms under 6 MB bearers {statuses}")
    assert worst_ms < 500, f"/healthz took {worst_ms:.0f} ms while bad bearers were checked"
    assert all(status in ("HTTP/1.1 431 Request Header Fields Too Large", "closed") for status in statuses), statuses


# ---- slow and idle clients


def test_slowClients_whenRequestStalls_thenClosedWithinRequestTimeout_andKeepAliveUntouched(
    gateway: Gateway,
) -> None:
    job = _job(gateway)
    silent = _connect(gateway.port)  # opens and sends nothing
    partial_line = _connect(gateway.port)
    partial_line.sendall(b"GET /heal")
    partial_head = _connect(gateway.port)
    partial_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: 1\r\n")
    partial_body = _connect(gateway.port)
    partial_body.sendall(
        f"POST /v1/jobs/{job}/events HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {API_KEY}\r\n"
        'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"type": '.encode()
    )
    started = time.monotonic()
    # A connection that finished its request idles on keep-alive: the request timeout is not for it.
    idle = _connect(gateway.port)
    assert _healthz_on(idle).startswith(b"HTTP/1.1 200 ")

    closed_after: dict[str, float] = {}
    answers: dict[str, bytes] = {}
    for name, sock in (("silent", silent), ("line", partial_line), ("head", partial_head), ("body", partial_body)):
        sock.settimeout(REQUEST_TIMEOUT_S + 5)
        try:
            answers[name] = _read_until_closed(sock)
        except TimeoutError:
            answers[name] = b"<still open>"
        closed_after[name] = time.monotonic() - started
        sock.close()
    print({name: f"{seconds:.2f} s" for name, seconds in closed_after.items()})
    assert answers["silent"] == b""  # nothing asked, nothing answered
    for name in ("line", "head", "body"):
        assert answers[name].startswith(b"HTTP/1.1 408 "), (name, answers[name][:200])
        assert b"application/problem+json" in answers[name]
    for name, seconds in closed_after.items():
        assert REQUEST_TIMEOUT_S * 0.5 <= seconds <= REQUEST_TIMEOUT_S + 2, (name, seconds)

    # Idle for longer than the request timeout, the kept-alive connection still serves.
    assert _healthz_on(idle).startswith(b"HTTP/1.1 200 ")
    idle.close()
    wait_until(lambda: "request not received within" in gateway.log.read_text(), message="no log line")


def _healthz_on(sock: socket.socket) -> bytes:
    """GET /healthz on an open connection: the whole answer."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    answer = b""
    while not answer.endswith(b'{"status":"ok"}'):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {answer!r}"
        answer += chunk
    return answer


def _job(gateway: Gateway) -> str:
    with gateway.client() as http:
        job_id: str = create_job(http, headers={"Authorization": f"Bearer {API_KEY}"})["id"]
    return job_id
