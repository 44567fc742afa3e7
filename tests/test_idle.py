"""A gateway that sat idle longer than Redis's connection health-check interval.

redis-py PINGs a pooled connection that has been quiet for ``health_check_interval`` before its
next command, and reads the PONG from the task that sends. The hub's subscription connection is
read by its reader task all the time, so a health check there met that read: the first reader
after every quiet half-minute got a cut stream ("read() called while another coroutine is already
waiting for incoming data"). The interval is a setting, shortened here; the idle period is real.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from jobstream import keys
from jobstream.devredis import EmbeddedRedis
from tests.conftest import LiveStack, SyncRedis, append, create_job, make_settings, read_sse, server_nodes
from tests.helpers import wait_until
from tests.test_sentinel import MASTER_NAME, sentinel_setup  # noqa: F401  (the fixture)

HEALTH_CHECK_S = 1.0


def idle_past_health_check() -> None:
    # The quiet period is what this test is about: nothing happens, time passes.
    time.sleep(HEALTH_CHECK_S * 2.5)


def read_one_finished_job(http: httpx.Client) -> None:
    job = create_job(http)
    append(http, job, [{"type": "delta", "data": {"text": "hello"}}, {"type": "result", "data": {}}])
    response, events = read_sse(http, job)
    assert response.status_code == 200
    assert [event.event for event in events] == ["status", "delta", "result", "done"]


def numsub(rdb: SyncRedis, job_id: str) -> int:
    channel = keys.live_channel(job_id)
    return sum(int(dict(node.pubsub_numsub(channel)).get(channel, 0)) for node in server_nodes(rdb))


def long_poll_meets_an_append(http: httpx.Client, rdb: SyncRedis) -> None:
    job = create_job(http)
    first = append(http, job, {"type": "delta", "data": {"text": "a"}})[0]
    answer: dict[str, Any] = {}

    def poll() -> None:
        params = {"token": job["token"], "after": first, "wait": "10"}
        answer["response"] = http.get(f"/v1/jobs/{job['id']}/poll", params=params)

    waiting = threading.Thread(target=poll)
    waiting.start()
    wait_until(lambda: numsub(rdb, job["id"]) > 0 or not waiting.is_alive(), message="the long-poll never subscribed")
    second = append(http, job, {"type": "delta", "data": {"text": "b"}})[0]
    waiting.join(15)
    response: httpx.Response = answer["response"]
    assert response.status_code == 200, response.text
    assert [event["id"] for event in response.json()["events"]] == [second]


def check_idle_gateway(stack: LiveStack, rdb: SyncRedis) -> None:
    with stack.client() as http:
        read_one_finished_job(http)
        for _ in range(2):  # twice: every quiet period, not only the first
            idle_past_health_check()
            read_one_finished_job(http)
        idle_past_health_check()
        long_poll_meets_an_append(http, rdb)


@pytest.mark.on_cluster
def test_idleGateway_whenReadersArriveAfterHealthCheckInterval_thenStreamsAndLongPollsWork(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack(with_worker=False, redis_health_check_s=HEALTH_CHECK_S)
    check_idle_gateway(stack, rdb)


@pytest.mark.slow
def test_idleGateway_whenBehindSentinel_thenStreamsAndLongPollsWork(
    sentinel_setup: tuple[EmbeddedRedis, EmbeddedRedis, int],  # noqa: F811
) -> None:
    master, _, sentinel_port = sentinel_setup
    settings = make_settings(
        master.url,
        redis_sentinels=[f"127.0.0.1:{sentinel_port}"],
        redis_master_name=MASTER_NAME,
        redis_health_check_s=HEALTH_CHECK_S,
    )
    stack = LiveStack(settings, with_worker=False).start()
    try:
        with redis.Redis.from_url(master.url, decode_responses=True) as rdb:
            check_idle_gateway(stack, rdb)
    finally:
        stack.stop()
