"""`jobstream tail` and `jobstream submit` as real processes against a live gateway and worker:
output, exit codes (0 completed, 1 failed, 3 cancelled) and one-line errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from jobstream.client import Client
from jobstream.demo import story_text
from jobstream.devredis import free_port
from tests.conftest import LiveStack
from tests.helpers import clean_env, wait_until

SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture
def demo_stack(make_stack: Callable[..., LiveStack]) -> LiveStack:
    return make_stack(demo=True)


def env_for(stack: LiveStack, key: str = "key-alice") -> dict[str, str]:
    return clean_env(PYTHONPATH=SRC, JOBSTREAM_URL=stack.base_url, JOBSTREAM_API_KEY=key)


def jobstream(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobstream", *args], env=env, capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode not in (0, 1, 3), result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobstream: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_tail_whenStoryCompletes_thenItsTextAndExit0(demo_stack: LiveStack) -> None:
    with Client(demo_stack.base_url, api_key="key-alice") as client:
        job = client.create("demo.story", {"words": 12, "delay_ms": 5})
    result = jobstream("tail", job.id, env=env_for(demo_stack))
    assert result.returncode == 0, result.stderr
    assert result.stdout == story_text(job.id, 12) + "\n"


def test_tail_json_whenJobFails_thenEventsAsJsonLinesAndExit1(demo_stack: LiveStack) -> None:
    with Client(demo_stack.base_url, api_key="key-alice") as client:
        job = client.create("demo.fail", {"after": 3, "delay_ms": 5})
    result = jobstream("tail", job.id, "--json", "--transport", "poll", env=env_for(demo_stack))
    assert result.returncode == 1, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [event["type"] for event in events].count("delta") == 3
    assert events[-1] == {"id": events[-1]["id"], "type": "done", "data": {"status": "failed"}}
    assert "failure" in [event["type"] for event in events]


def test_submit_follow_whenCompleted_thenIdThenTextAndExit0(demo_stack: LiveStack) -> None:
    result = jobstream(
        "submit", "demo.story", "--input", '{"words": 8, "delay_ms": 5}', "--follow", env=env_for(demo_stack)
    )
    assert result.returncode == 0, result.stderr
    job_id, text = result.stdout.split("\n", 1)
    assert text == story_text(job_id, 8) + "\n"


def test_submit_withoutFollow_thenPrintsOnlyTheId(demo_stack: LiveStack) -> None:
    result = jobstream("submit", "demo.story", "--input", '{"words": 2}', env=env_for(demo_stack))
    assert result.returncode == 0, result.stderr
    with Client(demo_stack.base_url, api_key="key-alice") as client:
        assert client.get(result.stdout.strip()).type == "demo.story"


def test_submit_follow_whenCancelled_thenExit3(demo_stack: LiveStack) -> None:
    command = [sys.executable, "-m", "jobstream", "submit", "test.slow", "--input", '{"steps": 1000, "step_ms": 20}']
    with subprocess.Popen(
        [*command, "--follow"], env=env_for(demo_stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        job_id = process.stdout.readline().strip()
        with Client(demo_stack.base_url, api_key="key-alice") as client:
            wait_until(lambda: client.get(job_id).status == "running", message="the job never started")
            client.cancel(job_id)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 3, stderr
    # The job may be cancelled before its first delta: what came is a beginning of its text.
    assert "".join(f"{step} " for step in range(1000)).startswith(stdout.removesuffix("\n"))


def test_errors_areOneLineAndNonZero(demo_stack: LiveStack) -> None:
    unknown = jobstream("tail", "00000000-0000-4000-8000-000000000000", env=env_for(demo_stack))
    assert_one_line_error(unknown, "404")
    bad_key = jobstream("submit", "demo.story", env=env_for(demo_stack, key="wrong"))
    assert_one_line_error(bad_key, "401")
    nobody = clean_env(PYTHONPATH=SRC, JOBSTREAM_API_KEY="key-alice", JOBSTREAM_URL=f"http://127.0.0.1:{free_port()}")
    assert_one_line_error(jobstream("tail", "any", env=nobody), "cannot reach")
    assert_one_line_error(jobstream("submit", "demo.story", "--input", "{not json", env=env_for(demo_stack)), "--input")
    assert_one_line_error(jobstream("tail", "x", env=clean_env(PYTHONPATH=SRC)), "JOBSTREAM_URL")


def test_tail_whenInterrupted_thenLeavesQuietly(demo_stack: LiveStack) -> None:
    with Client(demo_stack.base_url, api_key="key-alice") as client:
        job = client.create("test.slow", {"steps": 1000, "step_ms": 20})
    with subprocess.Popen(
        [sys.executable, "-m", "jobstream", "tail", job.id],
        env=env_for(demo_stack),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stdout.read(2) == "0 "  # the text is flowing
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr == "" and stdout.endswith("\n")


def test_tail_withReadToken_thenFollowsWithoutApiKey(demo_stack: LiveStack) -> None:
    with Client(demo_stack.base_url, api_key="key-alice") as client:
        job = client.create("demo.story", {"words": 5, "delay_ms": 5})
    env = clean_env(PYTHONPATH=SRC, JOBSTREAM_URL=demo_stack.base_url)
    result = jobstream("tail", job.id, "--token", job.token, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == story_text(job.id, 5) + "\n"
