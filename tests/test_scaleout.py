"""Many gateways and workers on one Redis, with no sticky sessions: a reader may land on any
gateway at any reconnect, and every job runs once at a time."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import redis
from httpx_sse import connect_sse

from jobstream import keys
from jobstream.demo import story_text
from tests.conftest import ALICE, LiveStack, create_job
from tests.helpers import wait_until
from tests.test_faults import start_story

pytestmark = pytest.mark.on_cluster


def test_reader_whenSwitchingGatewaysMidStream_thenExactSequence(
    make_stack: Callable[..., LiveStack], rdb: redis.Redis
) -> None:
    first, second = make_stack(with_worker=False), make_stack(with_worker=False)
    with first.client() as a, second.client() as b:
        job = create_job(a)
        events = [{"type": "delta", "data": {"text": f"w{i} "}} for i in range(60)]
        assert a.post(f"/v1/jobs/{job['id']}/events", json=events, headers=ALICE).status_code == 201
        b.post(f"/v1/jobs/{job['id']}/events", json={"type": "done", "data": {"status": "completed"}}, headers=ALICE)
        seen: list[str] = []
        # Five events at a time, SSE and polling in turn, each turn on the other gateway.
        for http, transport in itertools.cycle([(a, "sse"), (b, "sse"), (a, "poll"), (b, "poll")]):
            if transport == "sse":
                headers = {"Last-Event-ID": seen[-1]} if seen else {}
                url = job["links"]["events"]
                with connect_sse(http, "GET", url, params={"token": job["token"]}, headers=headers) as source:
                    if source.response.status_code == 204:
                        break
                    for event in source.iter_sse():
                        if event.data:
                            seen.append(event.id)
                        if len(seen) % 5 == 0 or event.event == "done":
                            break
            else:
                params = {"token": job["token"], "after": seen[-1] if seen else "0-0", "limit": 5}
                page = http.get(job["links"]["poll"], params=params).json()
                seen += [event["id"] for event in page["events"]]
                if page["done"]:
                    break
    stored = [entry_id for entry_id, _ in rdb.xrange(keys.events_key(job["id"]))]
    assert seen == stored


def test_workers_whenTwoTakeManyJobs_thenEachJobRunsOnce(make_stack: Callable[..., LiveStack]) -> None:
    gateways = [make_stack(demo=True), make_stack(demo=True)]  # each with its own worker
    with gateways[0].client() as http:
        jobs = [start_story(http, words=8, delay_ms=5) for _ in range(20)]
        for job in jobs:
            page = http.get(job["links"]["poll"], params={"token": job["token"], "wait": 10, "limit": 1000}).json()
            while not page["done"]:
                after = page["next"]
                more = http.get(job["links"]["poll"], params={"token": job["token"], "after": after, "wait": 10})
                page = {**more.json(), "events": page["events"] + more.json()["events"]}
            events = page["events"]
            assert [e["data"]["status"] for e in events if e["type"] == "status"] == ["running"]
            assert "".join(e["data"]["text"] for e in events if e["type"] == "delta") == story_text(job["id"], 8)
            assert events[-1]["data"] == {"status": "completed"}
    workers = [stack.worker for stack in gateways if stack.worker is not None]
    # A worker counts a job once its ending's write returns (the owner's index copied too), which
    # can be just after a reader has the job's `done`.
    wait_until(lambda: sum(worker.completed for worker in workers) >= 20)
    ran = [worker.completed for worker in workers]
    assert sum(ran) == 20 and all(count > 0 for count in ran)  # both took jobs, none ran twice
