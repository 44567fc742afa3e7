"""The commands as a user runs them: `jobstream dev` end to end, and start-up errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from jobstream.devredis import free_port
from tests.helpers import app_env, clean_env, jobstream, kill_all, scrape, wait_ready, wait_until


def children_of(parent: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is ``parent``, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == parent:
            found.append((int(entry), command))
    return found


def test_dev_whenStarted_thenServesAStoryEndToEndArchivesItAndStopsEverything(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data" / "jobstream"  # made by `dev`, parents and all
    process = subprocess.Popen(
        [sys.executable, "-m", "jobstream", "dev", "--port", str(port)],
        env=clean_env(XDG_DATA_HOME=str(tmp_path / "data")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = ""
        deadline = time.monotonic() + 20
        while "Ctrl-C" not in banner and time.monotonic() < deadline:
            banner += process.stdout.readline()
        key = re.search(r"API key\s+(\S+)", banner)
        assert key, banner
        assert f"http://127.0.0.1:{port}/" in banner and "curl" in banner
        redis_children = [p for p in children_of(process.pid) if "redis-server" in p[1]]
        assert len(redis_children) == 1
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=15) as http:
            wait_ready(http)
            auth = {"Authorization": f"Bearer {key.group(1)}"}
            job = http.post("/v1/jobs", json={"type": "demo.story", "input": {"words": 5, "delay_ms": 0}}, headers=auth)
            assert job.status_code == 201, job.text
            body = job.json()
            with http.stream("GET", body["links"]["events"], params={"token": body["token"]}) as stream:
                text = "".join(stream.iter_text())
            assert "event: done" in text and '"status":"completed"' in text
            # Archived by default, into archive.db in its data directory ($XDG_DATA_HOME/jobstream).
            wait_until(
                lambda: http.get(f"/v1/jobs/{body['id']}", headers=auth).json()["archived"],
                timeout_s=20,
                interval_s=0.1,
            )
            assert (data_dir / "archive.db").is_file()
            assert http.get("/").status_code == 200
            assert http.get("/dev.json").json() == {"api_key": key.group(1)}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
        for pid, _ in redis_children:
            assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), "the embedded Redis was left running"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_serve_whenSettingInvalid_thenOneClearLineNoTraceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobstream", "serve"],
        env=clean_env(JOBSTREAM_JOB_TTL_S="soon", JOBSTREAM_API_KEYS="novalue"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "JOBSTREAM_JOB_TTL_S" in lines[0] and "JOBSTREAM_API_KEYS" in lines[0]
    assert "Traceback" not in result.stderr


def test_serveAndWorker_whenSeparateProcesses_thenJobRunsAndSigtermStopsBoth(redis_url: str) -> None:
    port = free_port()
    env = clean_env(
        JOBSTREAM_REDIS_URL=redis_url,
        JOBSTREAM_API_KEYS="k-serve=alice",
        JOBSTREAM_TOKEN_SECRET="s" * 32,
        JOBSTREAM_DEMO="1",
    )
    gateway = jobstream("serve", "--port", str(port), env=env)
    worker = jobstream("worker", "--concurrency", "2", env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            wait_ready(http)
            auth = {"Authorization": "Bearer k-serve"}
            created = http.post(
                "/v1/jobs", json={"type": "demo.story", "input": {"words": 4, "delay_ms": 0}}, headers=auth
            )
            body = created.json()
            with http.stream("GET", body["links"]["events"], params={"token": body["token"]}) as stream:
                text = "".join(stream.iter_text())
            assert text.count("event: delta") == 4 and "event: done" in text
        for process in (gateway, worker):
            process.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=20) == 0
        assert worker.wait(timeout=20) == 0
    finally:
        kill_all(gateway, worker)


def test_serve_whenWorkersTwo_thenBothProcessesServeStreams(redis_url: str) -> None:
    port = free_port()
    env = app_env(redis_url, "k-serve", "s" * 32, JOBSTREAM_MAX_SSE_PER_USER="50")
    gateway = jobstream("serve", "--port", str(port), "--workers", "2", env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            wait_ready(http)
            assert len(children_of(gateway.pid)) >= 2
            auth = {"Authorization": "Bearer k-serve"}
            job = http.post("/v1/jobs", json={"type": "external"}, headers=auth).json()
            for _ in range(2):  # no worker runs: they wait in the queue, whichever process is asked
                assert http.post("/v1/jobs", json={"type": "test.echo"}, headers=auth).status_code == 201
            for _ in range(4):
                assert scrape(port, "jobstream_queue_depth", state="waiting") == 2
            url = job["links"]["events"]
            # Several connections, spread by the kernel over both processes, all see the same events.
            streams = [http.stream("GET", url, params={"token": job["token"]}) for _ in range(6)]
            responses = [stream.__enter__() for stream in streams]
            # Whichever process answers a scrape answers for both (new connection each time).
            for _ in range(8):
                assert scrape(port, "jobstream_sse_connections") == 6
                assert scrape(port, "jobstream_jobs_created_total", type="external") == 1
            http.post(
                f"{job['links']['self']}/events",
                json=[{"type": "delta", "data": {"text": "hi"}}, {"type": "done", "data": {"status": "completed"}}],
                headers=auth,
            )
            delivered = 0
            for stream, response in zip(streams, responses, strict=True):
                text = "".join(response.iter_text())
                stream.__exit__(None, None, None)
                assert '"text":"hi"' in text and "event: done" in text
                delivered += text.count("id: ")
            # Each process adds its delivery counts to the shared counter in the background.
            wait_until(
                lambda: scrape(port, "jobstream_events_delivered_total", transport="sse") == delivered,
                timeout_s=15,
                interval_s=0.1,
                message=f"the delivery counter never reached the {delivered} events delivered",
            )
            for _ in range(4):
                assert scrape(port, "jobstream_events_delivered_total", transport="sse") == delivered
                assert scrape(port, "jobstream_sse_connections") == 0
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=20) == 0
    finally:
        kill_all(gateway)


def test_serve_whenTokensInRequests_thenNeverInItsLogs(redis_url: str) -> None:
    port = free_port()
    env = app_env(redis_url, "k-secret-api-key", "s" * 32, JOBSTREAM_LOG_LEVEL="INFO")
    gateway = jobstream("serve", "--port", str(port), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            wait_ready(http)
            job = http.post("/v1/jobs", json={"type": "external"}, headers={"Authorization": "Bearer k-secret-api-key"})
            token = job.json()["token"]
            http.get(f"/v1/jobs/{job.json()['id']}/poll", params={"token": token, "after": "bad id"})
            http.get(f"/v1/jobs/{job.json()['id']}/poll", params={"token": token + "tampered"})
            http.get("/v1/jobs/6f1c1f4e-4b8f-4c39-9a2e-1c2d3e4f5a6b", headers={"Authorization": "Bearer wrong-key-xyz"})
        gateway.send_signal(signal.SIGTERM)
        output, _ = gateway.communicate(timeout=20)
    finally:
        kill_all(gateway)
    logs = output.decode(errors="replace")
    assert "/poll?token=REDACTED" in logs  # the access log is on, and redacted
    for secret in (token, token.split(".")[2], "k-secret-api-key", "wrong-key-xyz"):
        assert secret not in logs
