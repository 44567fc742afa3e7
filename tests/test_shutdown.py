"""SIGTERM with streams open, in every launch mode: `serve`, `serve --workers 2` and `dev`.

Each mode must end its open event streams at once and cleanly (the chunked body properly closed, so
that EventSource reconnects from its last id), answer waiting long-polls, and exit 0, well within uvicorn's graceful
timeout (10 s here): readers then resume on another gateway instead of being cut mid-body.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from jobstream.devredis import free_port
from tests.helpers import app_env, jobstream, kill_all, value, wait_ready, wait_until

KEY = "k-shutdown"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRACE_S = 10
#: Well under GRACE_S: the streams must not wait for uvicorn's graceful timeout.
PROMPT_S = 3.0


@dataclass
class Reader:
    """One open event stream, read to its end in a thread of its own."""

    text: str = ""
    error: str = ""
    ended_at: float = 0.0


def read_stream(base_url: str, url: str, params: dict[str, str], reader: Reader, opened: threading.Event) -> None:
    try:
        with (
            httpx.Client(base_url=base_url, timeout=30) as http,
            http.stream("GET", url, params=params) as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_text():
                reader.text += chunk
                if "hello" in reader.text:
                    opened.set()
    except Exception as exc:  # recorded: the test asserts there was none
        reader.error = f"{type(exc).__name__}: {exc}"
    finally:
        reader.ended_at = time.monotonic()
        opened.set()


def long_poll(base_url: str, url: str, params: dict[str, str], answers: list[httpx.Response]) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        answers.append(http.get(url, params={**params, "wait": "25"}))


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["serve"], ["serve", "--workers", "2"], ["dev"]], ids=["serve", "workers2", "dev"])
def test_sigterm_whenStreamsOpen_thenTheyEndCleanlyAtOnceAndTheProcessExits(redis_url: str, mode: list[str]) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = app_env(redis_url, KEY, "s" * 32, JOBSTREAM_SHUTDOWN_GRACE_S=str(GRACE_S), JOBSTREAM_MAX_SSE_PER_USER="50")
    gateway = jobstream(*mode, "--port", str(port), env=env)
    try:
        with httpx.Client(base_url=base_url, timeout=15) as http:
            wait_ready(http)
            job = http.post("/v1/jobs", json={"type": "external", "tags": ["t"]}, headers=AUTH).json()
            first = http.post(
                f"/v1/jobs/{job['id']}/events", json={"type": "delta", "data": {"text": "hello"}}, headers=AUTH
            ).json()["ids"][0]
            token = {"token": job["token"]}
            tag_token = {"token": http.post("/v1/read-tokens", json={"tag": "t"}, headers=AUTH).json()["token"]}
            # Two readers of the job's own stream, one of it among many jobs, one of its tag.
            streams = [
                (job["links"]["events"], token),
                (job["links"]["events"], token),
                ("/v1/events", {"jobs": job["id"], **token}),
                ("/v1/events", {"tag": "t", **tag_token}),
            ]
            readers = [Reader() for _ in streams]
            opened = [threading.Event() for _ in readers]
            threads = [
                threading.Thread(target=read_stream, args=(base_url, url, params, reader, event))
                for (url, params), reader, event in zip(streams, readers, opened, strict=True)
            ]
            answers: list[httpx.Response] = []
            cursor = http.get("/v1/poll", params={"jobs": job["id"], **token}).json()["cursor"]
            polls = [
                (job["links"]["poll"], {"after": first, **token}),
                ("/v1/poll", {"jobs": job["id"], "cursor": cursor, **token}),
            ]
            threads += [
                threading.Thread(target=long_poll, args=(base_url, url, params, answers)) for url, params in polls
            ]
            for thread in threads:
                thread.start()
            for event in opened:
                assert event.wait(15), "a stream never delivered its first event"
            wait_until(
                lambda: _waiting_long_polls(http) >= 2, timeout_s=10, message="the long-polls never started waiting"
            )
            signalled = time.monotonic()
            gateway.send_signal(signal.SIGTERM)
            for thread in threads:
                thread.join(GRACE_S + 10)
            for reader in readers:
                assert reader.error == "", reader.error
                assert reader.ended_at - signalled < PROMPT_S, f"stream open {reader.ended_at - signalled:.1f}s"
                assert '"text":"hello"' in reader.text, reader.text[-200:]
            assert len(answers) == 2 and all(answer.status_code == 200 for answer in answers), answers
            assert all(answer.json()["events"] == [] for answer in answers)
            assert gateway.wait(timeout=GRACE_S + 10) == 0
            assert time.monotonic() - signalled < PROMPT_S + 2
    finally:
        kill_all(gateway)


def _waiting_long_polls(http: httpx.Client) -> float:
    return value(http.get("/metrics").text, "jobstream_polls_total", kind="long")
