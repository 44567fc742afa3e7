"""Long-poll slots: a tiny `wait` answers at once, a client that hangs up frees its slot at once,
and a waiting long-poll renews its slot's lease (API.md, Hardening)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import httpx

from jobstream import keys
from tests.conftest import LiveStack, SyncRedis, append, create_job
from tests.helpers import wait_until


def test_longPoll_whenWaitTiny_thenAnswersAtOnceAndHoldsNoSlot(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack(with_worker=False, max_long_polls_per_user=10)
    with stack.client() as http:
        job = create_job(http)
        first = append(http, job, {"type": "delta", "data": {"text": "a"}})[0]
        answers: list[tuple[int, float]] = []

        def poll(wait: str) -> None:
            started = time.monotonic()
            with stack.client() as own:
                params = {"token": job["token"], "after": first, "wait": wait}
                status = own.get(f"/v1/jobs/{job['id']}/poll", params=params).status_code
            answers.append((status, time.monotonic() - started))

        threads = [threading.Thread(target=poll, args=(wait,)) for wait in ["1e-9", "0.0001", "0.001"] * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert len(answers) == 12
        assert all(status in (200, 429) for status, _ in answers), answers
        assert max(elapsed for _, elapsed in answers) < 3, answers
        assert rdb.zcard(keys.long_poll_leases_key("alice")) == 0


def open_long_poll(stack: LiveStack, job: dict[str, str], after: str) -> socket.socket:
    """A long-poll sent on a raw socket, so that the test can hang up while it waits."""
    sock = socket.create_connection(("127.0.0.1", stack.port))
    path = f"/v1/jobs/{job['id']}/poll?token={job['token']}&after={after}&wait=20"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def test_longPoll_whenClientHangsUp_thenItsSlotIsFreedAtOnce(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack(with_worker=False, max_long_polls_per_user=2)
    slots = keys.long_poll_leases_key("alice")
    with stack.client() as http:
        job = create_job(http)
        first = append(http, job, {"type": "delta", "data": {"text": "a"}})[0]
        waiting = [open_long_poll(stack, job, first) for _ in range(2)]
        wait_until(lambda: rdb.zcard(slots) == 2, message="the long-polls never took their slots")
        params = {"token": job["token"], "after": first, "wait": "1"}
        assert http.get(f"/v1/jobs/{job['id']}/poll", params=params).status_code == 429
        hung_up = time.monotonic()
        for sock in waiting:
            sock.close()
        wait_until(lambda: rdb.zcard(slots) == 0, timeout_s=5, message="hung-up long-polls kept their slots")
        assert time.monotonic() - hung_up < 5  # their waits had 20 s to go
        answer: dict[str, httpx.Response] = {}

        def poll() -> None:
            answer["response"] = http.get(f"/v1/jobs/{job['id']}/poll", params={**params, "wait": "10"})

        thread = threading.Thread(target=poll)
        thread.start()
        wait_until(lambda: rdb.zcard(slots) == 1 or "response" in answer, message="the new long-poll never waited")
        second = append(http, job, {"type": "delta", "data": {"text": "b"}})[0]
        thread.join(15)
        assert answer["response"].status_code == 200
        assert [event["id"] for event in answer["response"].json()["events"]] == [second]


def test_longPoll_whenWaiting_thenItsLeaseIsRenewed(make_stack: Callable[..., LiveStack], rdb: SyncRedis) -> None:
    # A lease of ceil(3) + 5 = 8 s, renewed every third of it, during a wait of 3 s.
    stack = make_stack(with_worker=False, poll_max_wait_s=3)
    slots = keys.long_poll_leases_key("alice")
    with stack.client() as http:
        job = create_job(http)
        first = append(http, job, {"type": "delta", "data": {"text": "a"}})[0]
        answer: dict[str, httpx.Response] = {}

        def poll() -> None:
            params = {"token": job["token"], "after": first, "wait": "3"}
            answer["response"] = http.get(f"/v1/jobs/{job['id']}/poll", params=params)

        thread = threading.Thread(target=poll)
        thread.start()
        taken = wait_until(lambda: rdb.zrange(slots, 0, -1, withscores=True), message="no slot taken")
        ((lease, expires_ms),) = taken
        wait_until(
            lambda: (rdb.zscore(slots, lease) or 0) > expires_ms or "response" in answer,
            message="the lease was never renewed",
        )
        assert "response" not in answer, "the wait ended before its lease was renewed"
        thread.join(10)
        assert answer["response"].status_code == 200
        assert rdb.zcard(slots) == 0
