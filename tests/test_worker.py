"""The worker on a real Redis: outcomes, coalescing, cancel, timeouts, and reclaim after a SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

import httpx
import pytest
import redis

from jobstream import keys
from tests.conftest import ALICE, LiveStack, create_job, read_sse
from tests.helpers import wait_until

pytestmark = pytest.mark.on_cluster


def test_story_whenRun_thenOneDeltaPerWordProgressResultDone(demo_client: httpx.Client) -> None:
    job = create_job(demo_client, "demo.story", input={"words": 12, "delay_ms": 0})
    _, events = read_sse(demo_client, job)
    types = [e.event for e in events]
    assert types[0] == "status" and events[0].json() == {"status": "running"}
    assert types.count("delta") == 12 and types.count("progress") >= 10
    assert types[-2:] == ["result", "done"] and events[-1].json() == {"status": "completed"}
    text = "".join(e.json()["text"] for e in events if e.event == "delta")
    assert len(text.split()) == 12
    view = demo_client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()
    assert view["status"] == "completed" and view["result"] == {"words": 12}
    assert view["progress"]["percent"] == 100.0 and view["started_at"] and view["completed_at"]


def test_demoFail_whenRun_thenDeltasFailureDoneFailed(demo_client: httpx.Client) -> None:
    job = create_job(demo_client, "demo.fail", input={"after": 3, "delay_ms": 0})
    _, events = read_sse(demo_client, job)
    assert [e.event for e in events] == ["status", "delta", "delta", "delta", "failure", "done"]
    assert "after 3 deltas" in events[-2].json()["message"]
    assert events[-1].json() == {"status": "failed"}
    view = demo_client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()
    assert view["status"] == "failed" and "after 3 deltas" in view["error"]["message"]


def test_handlerRaises_whenUnexpected_thenSanitizedFailure(client: httpx.Client) -> None:
    job = create_job(client, "test.boom")
    _, events = read_sse(client, job)
    assert [e.event for e in events] == ["status", "delta", "failure", "done"]
    assert "hunter2" not in events[2].data and "RuntimeError" not in events[2].data
    refused = create_job(client, "test.refuse")
    _, events = read_sse(client, refused)
    assert events[-2].json() == {"message": "the data could not be read"}


def test_handlerTimeout_whenExceeded_thenFailed(client: httpx.Client) -> None:
    job = create_job(client, "test.timeout")
    _, events = read_sse(client, job)
    assert events[-2].event == "failure" and "timed out" in events[-2].json()["message"]
    assert events[-1].json() == {"status": "failed"}


def test_deltas_whenTokenPerCall_thenCoalescedIntoFewWrites(client: httpx.Client) -> None:
    job = create_job(client, "test.tokens", input={"count": 2000})
    _, events = read_sse(client, job)
    deltas = [e.json()["text"] for e in events if e.event == "delta"]
    assert "".join(deltas) == "".join(f"t{i} " for i in range(2000))
    assert len(deltas) < 100, f"{len(deltas)} delta events for 2000 calls"
    assert events[-1].event == "done"


def test_echo_whenCustomEvents_thenEmittedInOrder(client: httpx.Client) -> None:
    job = create_job(
        client, "test.echo", input={"events": [{"type": "log", "data": {"m": 1}}, {"type": "custom.x", "data": 7}]}
    )
    _, events = read_sse(client, job)
    assert [e.event for e in events] == ["status", "log", "custom.x", "done"]


def test_cancel_whenRunning_thenHandlerStopsWithinASecond(client: httpx.Client) -> None:
    job = create_job(client, "test.slow", input={"steps": 300, "step_ms": 50})
    wait_until(
        lambda: client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["status"] == "running",
        message="the job never started running",
    )
    requested_ms = time.time_ns() // 1_000_000
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE).status_code == 202
    _, events = read_sse(client, job)
    assert events[-1].event == "done" and events[-1].json() == {"status": "cancelled"}
    # A stream id is the time Redis appended the event: when `done` was written, not when it was read.
    stopped_after_ms = int(events[-1].id.split("-")[0]) - requested_ms
    assert stopped_after_ms < 1500, f"cancel took {stopped_after_ms} ms"
    view = client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()
    assert view["status"] == "cancelled"
    time.sleep(0.3)  # on purpose: a moment in which nothing may be appended after `done`
    assert (
        client.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "after": events[-1].id}).json()[
            "events"
        ]
        == []
    ), "no event may follow done"


def _wait_for_events(rdb: redis.Redis, job_id: str, count: int, timeout_s: float = 15) -> None:
    wait_until(
        lambda: rdb.xlen(keys.events_key(job_id)) >= count,
        timeout_s=timeout_s,
        message="the worker process did not start the job",
    )


@pytest.mark.parametrize(
    ("job_type", "outcome"), [("test.slow_idempotent", "completed"), ("test.slow", "failed")], ids=["retried", "lost"]
)
def test_reclaim_whenWorkerKilled_thenRetriedOrFailedWorkerLost(
    job_type: str,
    outcome: str,
    make_stack: Callable[..., LiveStack],
    worker_process: Callable[..., subprocess.Popen[bytes]],
    rdb: redis.Redis,
) -> None:
    gateway = make_stack(with_worker=False, worker_lease_s=2)
    with gateway.client() as http:
        victim = worker_process(JOBSTREAM_WORKER_LEASE_S="2")
        job = create_job(http, job_type, input={"steps": 20, "step_ms": 50})
        _wait_for_events(rdb, job["id"], 3)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert rdb.hget(keys.meta_key(job["id"]), "status") == "running"
        worker_process(JOBSTREAM_WORKER_LEASE_S="2")
        _, events = read_sse(http, job)
    assert events[-1].event == "done" and events[-1].json() == {"status": outcome}
    if outcome == "failed":
        assert events[-2].json() == {"message": "worker lost"}
    else:
        assert any(e.event == "log" and e.json()["attempt"] == 2 for e in events)
    # The worker acks its queue entry just after writing `done`, which the reader may see first.
    deadline = time.monotonic() + 5
    while rdb.xlen(keys.queue_key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rdb.xlen(keys.queue_key) == 0
    assert rdb.xpending(keys.queue_key, keys.queue_group)["pending"] == 0


def test_cancel_whenManyRunning_thenEveryOneEndsCancelled(client: httpx.Client) -> None:
    """Regression: a cancellation that landed inside a redis-py call could be swallowed there, and
    the handler ran on to `completed`; the worker now repeats the cancel until the handler stops."""
    # Long enough (4,000 steps) that none can finish on its own before its cancel lands.
    jobs = [create_job(client, "test.slow", input={"steps": 4000, "step_ms": 1}) for _ in range(4)]
    deadline = time.monotonic() + 10
    for job in jobs:
        while client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    for job in jobs:
        assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE).status_code == 202
    for job in jobs:
        _, events = read_sse(client, job)
        assert events[-1].json() == {"status": "cancelled"}
