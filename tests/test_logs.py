"""Structured logs from a real gateway and worker: with JOBSTREAM_LOG_FORMAT=json every line is a
JSON object; requests and job transitions are one line each, carrying the request id and the job
id; no credential appears."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import httpx

from jobstream.devredis import free_port
from tests.conftest import read_sse
from tests.helpers import app_env, jobstream, kill_all, wait_ready

API_KEY = "logs-test-key-0123456789"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(line, dict) for line in parsed)
    return parsed


def test_jsonLogs_whenJobsRun_thenOneLinePerRequestAndTransitionWithIdsAndNoSecrets(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = app_env(
        redis_url,
        API_KEY,
        "logs-test-token-secret-0123456789abcdef",
        JOBSTREAM_LOG_FORMAT="json",
        JOBSTREAM_DEMO="1",
    )
    gateway_log, worker_log = tmp_path / "gateway.log", tmp_path / "worker.log"
    with gateway_log.open("wb") as gateway_err, worker_log.open("wb") as worker_err:
        gateway = jobstream("serve", "--port", str(port), env=env, stderr=gateway_err)
        worker = jobstream("worker", env=env, stderr=worker_err)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
                wait_ready(http)
                body = {"type": "demo.story", "input": {"words": 3, "delay_ms": 0}}
                created = http.post("/v1/jobs", json=body, headers={**HEADERS, "X-Request-ID": "req-abc.123"})
                assert created.headers["x-request-id"] == "req-abc.123"
                story = created.json()
                boom_response = http.post(
                    "/v1/jobs",
                    json={"type": "test.boom"},
                    headers={**HEADERS, "X-Request-ID": "not an id; " + "x" * 200},
                )
                generated = boom_response.headers["x-request-id"]
                # This process's random prefix and a count: an unusable id is replaced, not echoed.
                assert re.fullmatch(r"[0-9a-f]{17,}", generated), generated
                boom = boom_response.json()
                stream_response, _ = read_sse(http, story, headers={"X-Request-ID": "stream-1"})
                assert stream_response.headers["x-request-id"] == "stream-1"
                read_sse(http, boom)
        finally:
            for process in (gateway, worker):
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=20)
            kill_all(gateway, worker)

    gateway_lines, worker_lines = _lines(gateway_log), _lines(worker_log)
    requests = [line for line in gateway_lines if line.get("event") == "request"]
    create = next(line for line in requests if line["method"] == "POST" and line["request_id"] == "req-abc.123")
    assert create["path"] == "/v1/jobs" and create["status"] == 201
    assert any(line["request_id"] == generated and line["status"] == 201 for line in requests)
    stream = next(line for line in requests if line["path"].startswith(f"/v1/jobs/{story['id']}/events"))
    assert "token=REDACTED" in stream["path"] and stream["request_id"] == "stream-1"

    story_lines = [line for line in gateway_lines if line.get("job_id") == story["id"] and "event" in line]
    assert [line["event"] for line in story_lines] == ["job.created", "job.queued"]
    assert all(line["request_id"] == "req-abc.123" for line in story_lines)

    def transitions(job_id: str) -> list[str]:
        return [line["event"] for line in worker_lines if line.get("job_id") == job_id and "event" in line]

    assert transitions(story["id"]) == ["job.started", "job.completed"]
    assert transitions(boom["id"]) == ["job.started", "job.failed"]
    raised = next(line for line in worker_lines if line.get("job_id") == boom["id"] and "exception" in line)
    assert raised["level"] == "error" and "RuntimeError" in raised["exception"]

    everything = gateway_log.read_text() + worker_log.read_text()
    for secret in (API_KEY, story["token"], boom["token"], "Bearer"):
        assert secret not in everything
