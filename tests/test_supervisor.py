"""`serve --workers N`'s supervisor: a process that dies is replaced, the processes die with the
supervisor, and processes that cannot start end the command instead of restarting for ever."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from jobstream.devredis import free_port
from jobstream.supervisor import STARTUP_FAILURE
from tests.helpers import app_env, jobstream, kill_all, wait_ready, wait_until
from tests.test_cli import children_of

pytestmark = pytest.mark.slow


def gateway_pids(supervisor_pid: int) -> list[int]:
    return [pid for pid, command in children_of(supervisor_pid) if "multiprocessing" in command and "spawn" in command]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def serve_two(redis_url: str) -> tuple[subprocess.Popen[bytes], int, list[int]]:
    """`serve --workers 2`, ready, with the pids of its two gateway processes."""
    port = free_port()
    gateway = jobstream("serve", "--port", str(port), "--workers", "2", env=app_env(redis_url, "k", "s" * 32))
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        wait_ready(http)
    pids = wait_until(lambda: len(gateway_pids(gateway.pid)) == 2 and gateway_pids(gateway.pid))
    return gateway, port, pids


def test_supervisor_whenAProcessDies_thenReplacedAndThePortKeepsAnswering(redis_url: str) -> None:
    gateway, port, first = serve_two(redis_url)
    try:
        os.kill(first[0], signal.SIGKILL)
        replaced = wait_until(
            lambda: (pids := gateway_pids(gateway.pid)) and len(pids) == 2 and first[0] not in pids and pids,
            timeout_s=20,
            message="the killed gateway process was not replaced",
        )
        assert first[1] in replaced
        for _ in range(6):  # new connections, spread by the kernel over both processes
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as fresh:
                assert fresh.get("/healthz").status_code == 200
    finally:
        kill_all(gateway)


def test_supervisor_whenKilled_thenItsProcessesDieWithIt(redis_url: str) -> None:
    gateway, _, pids = serve_two(redis_url)
    try:
        gateway.kill()
        gateway.wait()
        wait_until(lambda: not any(alive(pid) for pid in pids), timeout_s=15, message="gateway processes outlived it")
    finally:
        kill_all(gateway)


def test_supervisor_whenProcessesCannotStart_thenExitsWithStartupFailure(redis_url: str) -> None:
    env = app_env(redis_url, "k", "s" * 32, JOBSTREAM_SENTRY_DSN="not-a-dsn")
    started = time.monotonic()
    gateway = jobstream("serve", "--port", str(free_port()), "--workers", "2", env=env)
    try:
        assert gateway.wait(timeout=60) == STARTUP_FAILURE
        assert time.monotonic() - started < 60
        assert gateway_pids(gateway.pid) == []
    finally:
        kill_all(gateway)
