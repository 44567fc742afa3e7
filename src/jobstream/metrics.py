"""Prometheus metrics of a gateway or worker process.

Under `jobstream serve --workers N` the processes share a directory (``PROMETHEUS_MULTIPROC_DIR``,
set by the CLI before they start) and every scrape, whichever process answers it, adds up all of
them: open connections count only live processes, counters keep what exited ones counted.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from jobstream.observability import job_transition

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

jobs_created = Counter("jobstream_jobs_created_total", "Jobs created.", ["type"])
rate_limited = Counter(
    "jobstream_rate_limited_total",
    "Requests refused with 429, by limit: create rate, open streams, long-polls.",
    ["limit"],
)
sse_open = Gauge("jobstream_sse_connections", "Open SSE connections.", multiprocess_mode="livesum")
polls = Counter("jobstream_polls_total", "Poll requests.", ["kind"])
_delivered = Counter("jobstream_events_delivered_total", "Events written to readers.", ["transport"])
redis_errors = Counter(
    "jobstream_redis_errors_total", "Redis unavailable: requests answered 503, writes retried.", ["where"]
)
# Endings: written by workers, and by gateways for a cancel of a job no worker holds (pending or
# external) and an external job's result or failure. Recorded by ``job_ended`` only.
jobs_finished = Counter(
    "jobstream_jobs_finished_total",
    "Jobs ended (by a worker, or by a gateway: cancels, external jobs).",
    ["type", "status"],
)
job_duration = Histogram(
    "jobstream_job_duration_seconds",
    "From a job's start (a worker taking it, an external job's first event) to its end; 0 if it never started.",
    ["type"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)


def job_ended(job_type: str, job: str, status: str, duration_s: float, **fields: Any) -> None:
    """Account for one ending of a job, by whoever wrote it (a worker; a gateway's cancel of a job
    no worker holds; a gateway appending an external job's result or failure): counted by type
    and status, timed, and its transition (`job.<status>`, with ``duration_s`` and ``fields``)
    logged and left as a Sentry breadcrumb. Every ending goes through here, once."""
    jobs_finished.labels(job_type, status).inc()
    job_duration.labels(job_type).observe(duration_s)
    job_transition(status, job, job_type=job_type, duration_s=round(duration_s, 3), **fields)


jobs_reclaimed = Counter("jobstream_jobs_reclaimed_total", "Jobs taken over from a lost or stopped worker.")
jobs_parked = Counter(
    "jobstream_jobs_parked_total",
    "Jobs held back off the queue because their owner had JOBSTREAM_MAX_RUNNING_PER_USER jobs running.",
)
webhook_deliveries = Counter(
    "jobstream_webhook_deliveries_total",
    "Webhook deliveries settled, by outcome: delivered (a 2xx answer), or gave_up (failing for a day).",
    ["outcome"],
)
webhook_attempts = Counter(
    "jobstream_webhook_attempts_total",
    "Webhook delivery attempts, by result: ok, http_error (not 2xx), timeout, connection_error, dns_error, refused,"
    " error (unexpected).",
    ["result"],
)
#: Sampled (one batch in LAG_SAMPLE_EVERY): observing every write would cost more than the write.
delivery_lag = Histogram(
    "jobstream_delivery_lag_seconds",
    "From an event's append in Redis to its write on a reader's connection (sampled).",
    ["transport"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LAG_SAMPLE_EVERY = 16


class _Deliveries:
    """Events written to readers, counted as plain integers on the hot path (a Counter takes a lock
    on every increment) and moved into the Counter by ``flush``: every second, and before a scrape."""

    def __init__(self) -> None:
        self.sse = 0
        self.poll = 0

    def flush(self) -> None:
        sse, poll, self.sse, self.poll = self.sse, self.poll, 0, 0
        if sse:
            _delivered.labels("sse").inc(sse)
        if poll:
            _delivered.labels("poll").inc(poll)


deliveries = _Deliveries()


class _LagSampler:
    """Observes the lag of one written batch in LAG_SAMPLE_EVERY, from its last event's stream id
    (whose first part is the append's time in Redis, in ms)."""

    def __init__(self) -> None:
        self._countdown = LAG_SAMPLE_EVERY
        self._sse = delivery_lag.labels("sse")
        self._poll = delivery_lag.labels("poll")

    def written(self, last_event_id: str, transport: str) -> None:
        self._countdown -= 1
        if self._countdown:
            return
        self._countdown = LAG_SAMPLE_EVERY
        appended_ms = int(last_event_id.partition("-")[0])
        lag_s = max(0.0, time.time() - appended_ms / 1000)
        (self._sse if transport == "sse" else self._poll).observe(lag_s)


lag = _LagSampler()


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The work queue as one scrape sees it."""

    waiting: int
    running: int
    oldest_waiting_age_s: float


@dataclass(frozen=True, slots=True)
class BacklogStats:
    """An outbox consumer's records not settled yet (webhook deliveries, archive copies), as one
    scrape sees them."""

    #: Jobs with records pending.
    pending_jobs: int
    oldest_pending_age_s: float


#: Each outbox consumer's backlog gauges: name prefix, and what its records are.
_BACKLOG_GAUGES = {
    "webhook": ("jobstream_webhook", "webhook deliveries"),
    "archive": ("jobstream_archive", "archive copies"),
}


class _QueueCollector(Collector):
    def __init__(self, stats: QueueStats, backlogs: dict[str, BacklogStats]) -> None:
        self._stats = stats
        self._backlogs = backlogs

    def collect(self) -> list[GaugeMetricFamily]:
        depth = GaugeMetricFamily("jobstream_queue_depth", "Jobs in the work queue.", labels=["state"])
        depth.add_metric(["waiting"], self._stats.waiting)
        depth.add_metric(["running"], self._stats.running)
        age = GaugeMetricFamily(
            "jobstream_queue_oldest_waiting_age_seconds", "Age of the oldest job no worker has taken yet (0: none)."
        )
        age.add_metric([], self._stats.oldest_waiting_age_s)
        families = [depth, age]
        for consumer, backlog in self._backlogs.items():
            prefix, what = _BACKLOG_GAUGES[consumer]
            pending = GaugeMetricFamily(f"{prefix}_pending_jobs", f"Jobs with {what} not settled yet.")
            pending.add_metric([], backlog.pending_jobs)
            oldest = GaugeMetricFamily(
                f"{prefix}_oldest_pending_age_seconds", f"Age of the oldest of the {what} not settled yet (0: none)."
            )
            oldest.add_metric([], backlog.oldest_pending_age_s)
            families += [pending, oldest]
        return families


def exposition(queue: QueueStats | None = None, backlogs: dict[str, BacklogStats] | None = None) -> bytes:
    """The text a scrape gets: this process's metrics, or every process's under --workers N, and
    the queue and the outbox consumers' backlogs read from Redis for this scrape (the same
    whichever process answers)."""
    deliveries.flush()
    if MULTIPROC_DIR_ENV not in os.environ:
        text = generate_latest(REGISTRY)
    else:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
    if queue is not None:
        extra = CollectorRegistry()
        extra.register(_QueueCollector(queue, backlogs or {}))
        text += generate_latest(extra)
    return text
