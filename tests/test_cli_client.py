"""`jobstream tail` and `jobstream submit` as real processes against a live gateway and worker:
output, exit codes (0 completed, 1 failed, 3 cancelled), one-line errors, and the progress line
on stderr when it is a terminal (a pseudo-terminal here) and stdout is not."""

from __future__ import annotations

import errno
import io
import json
import os
import pty
import selectors
import signal
import subprocess
import sys
import time
import tty
from collections.abc import Callable
from pathlib import Path

import pytest

from jobstream.client import Client
from jobstream.client.commands import Printer
from jobstream.client.models import Event
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


#: demo.story of this many words reports progress after every word (its step is words // 10).
STORY_WORDS = 10
#: Its progress lines, as the command shows them.
STORY_PROGRESS = [f"{10 * n}% {n} of {STORY_WORDS} words" for n in range(1, STORY_WORDS + 1)]
#: What the command writes before each progress line, and at the end to clear the last one.
CLEAR_LINE = "\r\x1b[2K"


def follow_story(command: str, stack: LiveStack) -> list[str]:
    """The arguments of ``jobstream tail`` (of a demo.story created here) or of ``jobstream submit
    --follow`` (which creates it), for a demo.story of STORY_WORDS words."""
    story = {"words": STORY_WORDS, "delay_ms": 5}
    if command == "submit":
        return ["submit", "demo.story", "--input", json.dumps(story), "--follow"]
    with Client(stack.base_url, api_key="key-alice") as client:
        return ["tail", client.create("demo.story", story).id]


def assert_story(args: list[str], output: str) -> None:
    """``output`` is what ``jobstream *args`` of `follow_story` writes to stdout: (submit: the job's id,)
    then the story's text and a newline."""
    job_id, text = output.split("\n", 1) if args[0] == "submit" else (args[1], output)
    assert text == story_text(job_id, STORY_WORDS) + "\n", repr(output)


def run_on_a_terminal(*args: str, env: dict[str, str], stdout_too: bool = False) -> tuple[int, str, str]:
    """Run ``jobstream *args`` with stderr (and stdout if ``stdout_too``, else a pipe) on a new
    pseudo-terminal in raw mode, which passes bytes on as written. Its exit status, what it wrote to
    the pipe, and what it wrote to the terminal. Both are read as they come, until the end of each,
    so that neither can fill up and block the command."""
    master, slave = pty.openpty()
    try:
        tty.setraw(slave)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "jobstream", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=slave if stdout_too else subprocess.PIPE,
                stderr=slave,
            )
        finally:
            os.close(slave)  # the command has the only other end now: its exit ends the terminal's output
        terminal, pipe = bytearray(), bytearray()
        with process:
            received = {master: terminal}
            if process.stdout is not None:
                received[process.stdout.fileno()] = pipe
            read_to_the_end(received, timeout_s=60)
            returncode = process.wait(timeout=10)
    finally:
        os.close(master)
    return returncode, pipe.decode(), terminal.decode()


def read_to_the_end(received: dict[int, bytearray], *, timeout_s: float) -> None:
    """Append what each of the descriptors ``received`` holds gives to its bytes, until each ends:
    end of file, or EIO (a pseudo-terminal's master once no process has the terminal open)."""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        for fd in received:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the command's output never ended (within {timeout_s:g} s): {received}"
            for key, _ in selector.select(remaining):
                try:
                    chunk = os.read(key.fd, 65536)
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    chunk = b""
                if chunk:
                    received[key.fd] += chunk
                else:
                    selector.unregister(key.fd)


@pytest.mark.parametrize("command", ["tail", "submit"])
def test_follow_whenStderrIsATerminal_thenProgressLineThereClearedAtTheEnd(demo_stack: LiveStack, command: str) -> None:
    args = follow_story(command, demo_stack)
    returncode, stdout, terminal = run_on_a_terminal(*args, env=env_for(demo_stack))
    assert returncode == 0, repr(terminal)
    assert_story(args, stdout)
    # Each progress line overwrites the one before; the last is cleared, leaving nothing behind.
    assert terminal.startswith(CLEAR_LINE) and terminal.endswith(STORY_PROGRESS[-1] + CLEAR_LINE), repr(terminal)
    assert [line for line in terminal.split(CLEAR_LINE) if line] == STORY_PROGRESS, repr(terminal)


@pytest.mark.parametrize("command", ["tail", "submit"])
def test_follow_whenStderrIsNotATerminal_thenNoProgressAndNoEscapes(demo_stack: LiveStack, command: str) -> None:
    args = follow_story(command, demo_stack)
    result = jobstream(*args, env=env_for(demo_stack))
    assert result.returncode == 0, result.stderr
    assert_story(args, result.stdout)
    assert result.stderr == "", repr(result.stderr)  # no progress text, no escape codes


def test_tail_whenStdoutIsTheSameTerminal_thenNoProgressInItsText(demo_stack: LiveStack) -> None:
    args = follow_story("tail", demo_stack)
    returncode, _, terminal = run_on_a_terminal(*args, env=env_for(demo_stack), stdout_too=True)
    assert returncode == 0, repr(terminal)
    assert "\x1b" not in terminal and "\r" not in terminal, repr(terminal)
    assert_story(args, terminal)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_printer_whenTruncatedWhileProgressShows_thenProgressClearedBeforeTheMessage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal, out = FakeTerminal(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    status = Printer(out, as_json=False).show(
        [
            Event(id="1-0", type="delta", data={"text": "one"}),
            Event(id="2-0", type="progress", data={"current": 1, "total": 4, "percent": 25.0}),
            Event(id=None, type="truncated", data={"first_id": "4-0"}),  # a resume after a disconnect
            Event(id="4-0", type="delta", data={"text": " four"}),
            Event(id="5-0", type="done", data={"status": "completed"}),
        ]
    )
    assert status == "completed" and out.getvalue() == "one four\n"
    # The message is a line of its own, not the end of "25%"; the text on stdout goes on.
    message = "jobstream: the oldest events were trimmed away; continuing from the oldest kept\n"
    assert terminal.getvalue() == f"{CLEAR_LINE}25%{CLEAR_LINE}{message}{CLEAR_LINE}"
