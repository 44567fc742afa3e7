"""Prometheus metrics on a real gateway, worker and Redis: jobs finished and timed, the queue as
Redis has it, delivery lag, a worker's own endpoint, and a Grafana dashboard that asks only for
series that exist."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from jobstream.devredis import free_port
from tests.conftest import ALICE, LiveStack, create_job, read_sse
from tests.helpers import app_env, jobstream, kill_all, value, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _story(http: httpx.Client, words: int, delay_ms: int) -> dict[str, object]:
    return create_job(http, "demo.story", input={"words": words, "delay_ms": delay_ms})


def test_metrics_whenJobsQueueRunAndEnd_thenCountedTimedAndQueueReadFromRedis(
    make_stack: Callable[..., LiveStack],
) -> None:
    gateway = make_stack(with_worker=False, demo=True)
    with gateway.client() as http:
        before = http.get("/metrics").text
        waiting = [_story(http, 30, 20) for _ in range(3)]
        boom = create_job(http, "test.boom")
        time.sleep(0.3)  # on purpose: the oldest job waits a while, and its age shows it
        queued = http.get("/metrics").text
        assert value(queued, "jobstream_queue_depth", state="waiting") == 4
        assert value(queued, "jobstream_queue_depth", state="running") == 0
        assert value(queued, "jobstream_queue_oldest_waiting_age_seconds") >= 0.3

        make_stack(demo=True)  # a worker arrives
        for job in waiting:
            _, events = read_sse(http, job)  # type: ignore[arg-type]
            assert events[-1].json() == {"status": "completed"}
        read_sse(http, boom)
        wait_until(
            lambda: value(http.get("/metrics").text, "jobstream_queue_depth", state="running") == 0,
            timeout_s=20,
            interval_s=0.1,
            message="jobs still counted as running",
        )
        after = http.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("jobstream_jobs_finished_total", type="demo.story", status="completed") == 3
    assert delta("jobstream_jobs_finished_total", type="test.boom", status="failed") == 1
    assert delta("jobstream_job_duration_seconds_count", type="demo.story") == 3
    assert delta("jobstream_job_duration_seconds_sum", type="demo.story") >= 3 * 29 * 0.02
    assert value(after, "jobstream_queue_depth", state="waiting") == 0
    assert value(after, "jobstream_queue_oldest_waiting_age_seconds") == 0
    # 3 stories of 30 words read live: far more than one sampled batch in 16.
    assert delta("jobstream_delivery_lag_seconds_count", transport="sse") >= 1
    assert delta("jobstream_events_delivered_total", transport="sse") >= 3 * 32


def test_workerMetrics_whenListenSet_thenWorkerServesItsOwnCounters(
    redis_url: str, make_stack: Callable[..., LiveStack]
) -> None:
    metrics_port = free_port()
    env = app_env(
        redis_url,
        "key-alice",
        "unused",
        JOBSTREAM_WORKER_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        JOBSTREAM_DEMO="1",
    )
    worker = jobstream("worker", env=env)
    try:
        gateway = make_stack(with_worker=False, demo=True)
        with gateway.client() as http:
            job = create_job(http, "demo.story", input={"words": 3, "delay_ms": 0})
            _, events = read_sse(http, job)
            assert events[-1].json() == {"status": "completed"}

        def scraped() -> float:
            try:
                text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            except httpx.TransportError:
                return 0.0
            return value(text, "jobstream_jobs_finished_total", type="demo.story", status="completed")

        wait_until(
            lambda: scraped() == 1, timeout_s=20, interval_s=0.1, message="the worker's endpoint never counted the job"
        )
    finally:
        kill_all(worker)


def test_grafanaDashboard_whenLoaded_thenEveryQueriedSeriesIsExposed(client: httpx.Client) -> None:
    create_job(client, "external", headers=ALICE)
    exposed = set(re.findall(r"^# TYPE (\S+) ", client.get("/metrics").text, re.M))
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bjobstream_\w+", target["expr"])
    }
    assert len(dashboard["panels"]) >= 10
    for name in queried:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in exposed or base in exposed, f"the dashboard queries {name}, which nothing exposes"
