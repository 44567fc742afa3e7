"""Webhook deliveries outlive the processes that send them: `jobstream worker` processes killed
(SIGKILL) or stopped (SIGTERM) with deliveries pending or under way, on a real Redis."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from jobstream import keys
from tests.conftest import LiveStack, append, create_job
from tests.helpers import wait_until
from tests.test_webhooks import DONE_COMPLETED, SECRET
from tests.webhook_receiver import Answer, Receiver

Start = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def gateway_for(make_stack: Callable[..., LiveStack], receiver: Receiver) -> Iterator[httpx.Client]:
    """A gateway alone: deliveries are the worker processes' only."""
    with make_stack(with_worker=False, webhook_allowed_hosts=[f"127.0.0.1:{receiver.port}"]).client() as http:
        yield http


def start_worker(worker_process: Start, receiver: Receiver) -> subprocess.Popen[bytes]:
    return worker_process(
        JOBSTREAM_WEBHOOK_SECRET=SECRET,
        JOBSTREAM_WEBHOOK_ALLOWED_HOSTS=f"127.0.0.1:{receiver.port}",
        JOBSTREAM_WEBHOOK_BACKOFF_S="0.5",
        JOBSTREAM_SHUTDOWN_GRACE_S="1",
    )


def ended_job(http: httpx.Client, receiver: Receiver) -> dict[str, Any]:
    job = create_job(http, webhook={"url": receiver.url()})
    append(http, job, DONE_COMPLETED)
    return job


def kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(10)


def test_workerKilledBetweenRetries_thenNextWorkerDeliversWithSameId(
    gateway_for: httpx.Client, receiver: Receiver, worker_process: Start, rdb: Any
) -> None:
    failing = True
    receiver.answer = lambda path, n: Answer(500 if failing else 200)
    job = ended_job(gateway_for, receiver)  # ended before any worker runs: its delivery waits
    first = start_worker(worker_process, receiver)
    state = keys.outbox_state_key(job["id"])

    def between_retries() -> bool:
        # Two failures settled, and no attempt under way (one would keep its lease after a kill).
        attempt, lease = rdb.hmget(state, "webhook:attempt", "webhook:lease")
        return int(attempt or 0) >= 2 and lease == "0"

    wait_until(between_retries, timeout_s=20, message="the first worker never retried")
    kill(first)
    failing = False
    attempts = len(receiver.at())
    start_worker(worker_process, receiver)
    wait_until(lambda: len(receiver.at()) > attempts, timeout_s=20, message="the next worker never delivered")
    assert len({r.headers["webhook-id"] for r in receiver.at()}) == 1


def test_workerKilledMidAttempt_thenDeliveredAgainOnceItsLeaseLapses(
    gateway_for: httpx.Client, receiver: Receiver, worker_process: Start, rdb: Any
) -> None:
    """At least once: the receiver may have taken the first attempt, but its sender died before
    knowing; the job is taken again once the lease (30 s) lapses."""
    receiver.answer = lambda path, n: Answer(200, delay_s=8 if n == 0 else 0)
    job = ended_job(gateway_for, receiver)
    first = start_worker(worker_process, receiver)
    wait_until(lambda: receiver.at(), timeout_s=20, message="never attempted")
    kill(first)
    start_worker(worker_process, receiver)
    wait_until(lambda: len(receiver.at()) == 2, timeout_s=50, message="never attempted again")
    assert receiver.at()[0].headers["webhook-id"] == receiver.at()[1].headers["webhook-id"]
    wait_until(lambda: not rdb.exists(keys.outbox_key(job["id"])), message="the outbox was kept")


def test_workerStopped_withAttemptUnderWay_thenItEndsAndIsNotSentAgain(
    gateway_for: httpx.Client, receiver: Receiver, worker_process: Start, rdb: Any
) -> None:
    receiver.answer = lambda path, n: Answer(200, delay_s=2)
    job = ended_job(gateway_for, receiver)
    worker = start_worker(worker_process, receiver)
    wait_until(lambda: receiver.at(), timeout_s=20, message="never attempted")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    # Delivered before it stopped: settled, and the outbox of the ended job gone.
    assert not rdb.exists(keys.outbox_key(job["id"]), keys.outbox_state_key(job["id"]))
    assert len(receiver.at()) == 1
