"""deploy/nginx.conf in front of two gateways: events pass through while the stream is open,
and a reader that reconnects through the proxy resumes with nothing lost.

Debian's nginx (nginx-light) must be installed (`make test` installs it): without it this test
fails, it never skips.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from jobstream.devredis import free_port
from tests.conftest import ALICE, LiveStack, append, create_job
from tests.helpers import wait_until

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"


@pytest.fixture
def proxy(make_stack: Callable[..., LiveStack], tmp_path: Path) -> Iterator[tuple[str, list[LiveStack]]]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("nginx is missing: apt-get install nginx-light (the proxy test needs it)")
    gateways = [make_stack(with_worker=False), make_stack(with_worker=False)]
    port = free_port()
    servers = " ".join(f"server 127.0.0.1:{gateway.port};" for gateway in gateways)
    conf = CONFIG.read_text().replace("{{GATEWAYS}}", servers).replace("{{LISTEN}}", f"127.0.0.1:{port}")
    (tmp_path / "nginx.conf").write_text(conf)
    process = subprocess.Popen([nginx, "-g", "daemon off;", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)])
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(base_url)
        yield base_url, gateways
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(timeout=10)


def _wait_http(base_url: str, timeout_s: float = 10) -> None:
    def healthy() -> bool:
        try:
            return httpx.get(base_url + "/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout_s=timeout_s, interval_s=0.05, message="nginx did not come up")


def test_proxy_whenEventAppended_thenReaderGetsItAtOnceThroughNginx(proxy: tuple[str, list[LiveStack]]) -> None:
    base_url, _ = proxy
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(10, read=3)) as http:
        job = create_job(http)
        with connect_sse(http, "GET", job["links"]["events"], params={"token": job["token"]}) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            events = source.iter_sse()
            append(http, job, {"type": "delta", "data": {"text": "now"}})
            # Read while the stream stays open (3 s read timeout): the proxy passes events on live.
            first = next(event for event in events if event.data)
            assert first.event == "status"
            assert next(event for event in events if event.data).json() == {"text": "now"}
            seen = first.id
        # Reconnect through the proxy (to either gateway) and resume after what was seen.
        append(
            http, job, [{"type": "delta", "data": {"text": "later"}}, {"type": "done", "data": {"status": "completed"}}]
        )
        with connect_sse(
            http, "GET", job["links"]["events"], params={"token": job["token"]}, headers={"Last-Event-ID": seen}
        ) as source:
            rest = [event for event in source.iter_sse() if event.data]
        assert [e.json() for e in rest] == [{"text": "now"}, {"text": "later"}, {"status": "completed"}]
    with httpx.Client(base_url=base_url, headers=ALICE) as http:
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "completed"


def test_proxy_whenHundredJobsOnOneStream_thenTheLongUrlAndCursorPassNginx(proxy: tuple[str, list[LiveStack]]) -> None:
    base_url, _ = proxy
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(30)) as http:
        jobs = [create_job(http) for _ in range(100)]
        for job in jobs:
            append(http, job, {"type": "result", "data": {}})
        token = http.post("/v1/read-tokens", json={"jobs": [job["id"] for job in jobs]}, headers=ALICE).json()["token"]
        params = {"jobs": ",".join(job["id"] for job in jobs), "token": token}
        with connect_sse(http, "GET", "/v1/events", params=params) as source:
            assert source.response.status_code == 200
            received = [event for event in source.iter_sse() if event.data]
        assert len(received) == 100 * 3  # each job's status, result and done
        # The reconnect's Last-Event-ID (every job's cursor) passes too: everything seen, 204.
        again = http.get("/v1/events", params=params, headers={"Last-Event-ID": received[-1].id})
        assert again.status_code == 204
