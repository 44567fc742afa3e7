"""JOBSTREAM_POLL_MAX_WAIT_S is the long-poll's bound, whatever its size: above the default 30 as
well as below it, in the answers and in /openapi.json."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from jobstream import keys
from tests.conftest import ALICE, LiveStack, SyncRedis, append, create_job
from tests.helpers import wait_until


def _wait_param(http: httpx.Client) -> dict[str, Any]:
    parameters = http.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/poll"]["get"]["parameters"]
    found: dict[str, Any] = next(p for p in parameters if p["name"] == "wait")
    return found


def _refused(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    errors = response.json()["errors"]
    assert [error["loc"] for error in errors] == [["wait"]]
    message: str = errors[0]["msg"]
    return message


def test_longPoll_whenMaxWaitAbove30_thenLongerWaitHonouredAndConfiguredBoundEnforced(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack(with_worker=False, poll_max_wait_s=60)
    with stack.client() as http:
        assert _wait_param(http)["schema"]["maximum"] == 60
        job = create_job(http)
        url, token = f"/v1/jobs/{job['id']}/poll", job["token"]

        answer: dict[str, Any] = {}

        def long_poll() -> None:
            started = time.monotonic()
            with httpx.Client(base_url=stack.base_url, timeout=60) as poller:
                answer["response"] = poller.get(url, params={"token": token, "wait": "45"})
            answer["elapsed_s"] = time.monotonic() - started

        thread = threading.Thread(target=long_poll)
        thread.start()
        # The poll is waiting once it holds one of alice's long-poll slots.
        wait_until(
            lambda: rdb.zcard(keys.long_poll_leases_key("alice")) > 0 or "response" in answer,
            message="the long-poll never started waiting",
        )
        assert "response" not in answer, f"answered without waiting: {answer['response'].text}"
        append(http, job, {"type": "delta", "data": {"text": "late"}}, headers=ALICE)
        thread.join(30)
        response = answer["response"]
        assert response.status_code == 200, response.text
        assert "delta" in [event["type"] for event in response.json()["events"]]
        assert answer["elapsed_s"] < 20, "the long-poll answers as soon as an event exists"

        assert "60" in _refused(http.get(url, params={"token": token, "wait": "61"}))


def test_longPoll_whenDefaultMaxWait_then31Refused(client: httpx.Client) -> None:
    assert _wait_param(client)["schema"]["maximum"] == 30
    job = create_job(client)
    message = _refused(client.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "wait": "31"}))
    assert "30" in message
