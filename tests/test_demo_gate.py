"""The built-in demo.* job types exist only where JOBSTREAM_DEMO=1 (which `jobstream dev` sets),
with bounded inputs and at most 5 minutes a run: elsewhere they are unknown types (422), and a
worker without them never runs one."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobstream import cli
from jobstream.devredis import free_port
from jobstream.registry import registry_for
from jobstream.settings import Settings, load_settings
from tests.conftest import ALICE, TOKEN_SECRET, LiveStack, create_job, make_settings, read_sse
from tests.helpers import app_env, assert_problem, clean_env, jobstream, kill_all, wait_ready

API_KEY = "demo-gate-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
DEMO_TYPES = ("demo.story", "demo.fail")


def _create(http: httpx.Client, job_type: str, headers: dict[str, str], **job_input: Any) -> httpx.Response:
    return http.post("/v1/jobs", json={"type": job_type, "input": job_input}, headers=headers)


def _assert_unknown_type(response: httpx.Response) -> None:
    body = assert_problem(response, 422)
    errors: list[dict[str, Any]] = body["errors"]  # type: ignore[assignment]
    assert errors[0]["loc"] == ["type"]
    assert "demo." not in errors[0]["msg"], "the known types listed include a demo type"


def test_serve_whenDemoUnsetOrOn_thenDemoTypesUnknownOrAccepted(redis_url: str) -> None:
    ports = {demo: free_port() for demo in (False, True)}
    envs = {
        False: app_env(redis_url, API_KEY, TOKEN_SECRET),
        True: app_env(redis_url, API_KEY, TOKEN_SECRET, JOBSTREAM_DEMO="1"),
    }
    gateways = {demo: jobstream("serve", "--port", str(ports[demo]), env=envs[demo]) for demo in ports}
    try:
        for demo, port in ports.items():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
                wait_ready(http)
                for job_type in DEMO_TYPES:
                    response = _create(http, job_type, AUTH)
                    if demo:
                        assert response.status_code == 201, response.text
                    else:
                        _assert_unknown_type(response)
                # The application's own types are served either way.
                assert _create(http, "test.echo", AUTH).status_code == 201
        for gateway in gateways.values():
            gateway.send_signal(signal.SIGTERM)
        assert [gateway.wait(timeout=20) for gateway in gateways.values()] == [0, 0]
    finally:
        kill_all(*gateways.values())


def test_gateway_whenDemoOffInAProcessThatImportedTheDemo_thenStillUnknown(
    make_stack: Callable[..., LiveStack],
) -> None:
    """The test suite (or an app embedding jobstream) imports the demo module and runs gateways
    with and without the demo types side by side: each answers by its own setting."""
    importlib.import_module("jobstream.demo")
    with_demo = make_stack(with_worker=False, demo=True)
    without = make_stack(with_worker=False)
    with with_demo.client() as on, without.client() as off:
        for job_type in DEMO_TYPES:
            assert _create(on, job_type, ALICE).status_code == 201
            _assert_unknown_type(_create(off, job_type, ALICE))
    assert not [name for name in registry_for(without.settings).names() if name.startswith("demo.")]


def test_demoInput_whenAboveTheBounds_then422NamingTheField(make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(with_worker=False, demo=True)
    too_large = [
        ("demo.story", {"words": 5001}, ["words"]),
        ("demo.story", {"delay_ms": 2001}, ["delay_ms"]),
        ("demo.story", {"words": 10000, "delay_ms": 10000}, ["words", "delay_ms"]),  # issue 13's
        ("demo.fail", {"after": 5001}, ["after"]),
        ("demo.fail", {"delay_ms": 2001}, ["delay_ms"]),
    ]
    within = [
        ("demo.story", {"words": 5000, "delay_ms": 2000}),
        ("demo.fail", {"after": 5000, "delay_ms": 2000}),
        # The examples of the README, of `jobstream dev`'s banner and the demo page's defaults.
        ("demo.story", {"words": 40, "delay_ms": 100}),
        ("demo.story", {"words": 60}),
        ("demo.story", {"words": 30}),
        ("demo.story", {"words": 60, "delay_ms": 80}),
    ]
    with stack.client() as http:
        for job_type, job_input, fields in too_large:
            body = assert_problem(_create(http, job_type, ALICE, **job_input), 422)
            errors: list[dict[str, Any]] = body["errors"]  # type: ignore[assignment]
            assert [error["loc"] for error in errors] == [["input", field] for field in fields], (job_type, job_input)
        for job_type, job_input in within:
            response = _create(http, job_type, ALICE, **job_input)
            assert response.status_code == 201, (job_type, job_input, response.text)


def test_worker_whenDemoUnset_thenHasNoDemoHandlersAndFailsADemoJob(
    redis_url: str, make_stack: Callable[..., LiveStack]
) -> None:
    # A gateway that takes demo jobs (JOBSTREAM_DEMO=1 there only), and a production worker.
    gateway = make_stack(with_worker=False, demo=True)
    env = app_env(redis_url, "key-alice", TOKEN_SECRET, JOBSTREAM_LOG_LEVEL="INFO")
    worker = jobstream("worker", env=env, stderr=subprocess.PIPE)
    try:
        with gateway.client() as http:
            job = create_job(http, "demo.story", input={"words": 3, "delay_ms": 0})
            _, events = read_sse(http, job)
        types = [event.event for event in events]
        assert "delta" not in types and types[-2:] == ["failure", "done"], types
        assert events[-2].json() == {"message": "No handler for job type 'demo.story' on this worker."}
        assert events[-1].json() == {"status": "failed"}
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
    finally:
        kill_all(worker)
    log = stderr.decode(errors="replace")
    started = next((line for line in log.splitlines() if " started: concurrency=" in line), None)
    assert started is not None, log
    assert "test.echo" in started and "demo." not in started


def test_dev_whenStarted_thenServesTheDemoTypesEndToEndWithTheirBounds(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "jobstream", "dev", "--port", str(port)],
        # No JOBSTREAM_DEMO: `dev` turns it on by itself. Its archive goes in the test's directory.
        env=clean_env(JOBSTREAM_DATA_DIR=str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        banner = ""
        deadline = time.monotonic() + 20
        while "Ctrl-C" not in banner and time.monotonic() < deadline:
            banner += process.stdout.readline().decode(errors="replace")
        key = next((line.split()[-1] for line in banner.splitlines() if "API key" in line), None)
        assert key, banner
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            wait_ready(http)
            created = _create(http, "demo.story", auth, words=5, delay_ms=0)
            assert created.status_code == 201, created.text
            _, events = read_sse(http, created.json())
            assert [event.event for event in events].count("delta") == 5
            assert events[-1].json() == {"status": "completed"}
            assert_problem(_create(http, "demo.story", auth, words=5001), 422)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        kill_all(process)


def test_dev_whenRun_thenDemoOnInItsSettingsAndInTheEnvironmentOfWhatItStarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JOBSTREAM_DEMO", "0")  # so that the test restores the environment after `dev`
    served: list[Settings] = []

    async def serve(settings: Settings, *args: object, **kwargs: object) -> None:
        served.append(settings)

    monkeypatch.setattr(cli, "_serve", serve)
    monkeypatch.setattr(cli, "_run", asyncio.run)  # without tuning this process's garbage collector
    cli._dev(make_settings("redis://127.0.0.1:1/0"), "127.0.0.1", free_port())
    assert [settings.demo for settings in served] == [True]
    assert os.environ["JOBSTREAM_DEMO"] == "1"


def test_demoHandlers_whenServed_thenEachRunLimitedToFiveMinutes() -> None:
    registry = registry_for(make_settings("redis://127.0.0.1:1/0", demo=True))
    for name in DEMO_TYPES:
        spec = registry.get(name)
        assert spec is not None and spec.timeout_s == 300, name


def test_settings_whenJobstreamDemo_thenOnlyThenDemoOn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBSTREAM_DEMO", raising=False)
    assert load_settings().demo is False
    monkeypatch.setenv("JOBSTREAM_DEMO", "1")
    assert load_settings().demo is True
