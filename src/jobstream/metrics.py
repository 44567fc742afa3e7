"""Prometheus metrics of a gateway or worker process.

Under `jobstream serve --workers N` the processes share a directory (``PROMETHEUS_MULTIPROC_DIR``,
set by the CLI before they start) and every scrape, whichever process answers it, adds up all of
them: open connections count only live processes, counters keep what exited ones counted.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, generate_latest, multiprocess

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

jobs_created = Counter("jobstream_jobs_created_total", "Jobs created.", ["type"])
rate_limited = Counter("jobstream_rate_limited_total", "Create requests refused by the rate limit.")
sse_open = Gauge("jobstream_sse_connections", "Open SSE connections.", multiprocess_mode="livesum")
polls = Counter("jobstream_polls_total", "Poll requests.", ["kind"])
_delivered = Counter("jobstream_events_delivered_total", "Events written to readers.", ["transport"])


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


def exposition() -> bytes:
    """The text a scrape gets: this process's metrics, or every process's under --workers N."""
    deliveries.flush()
    if MULTIPROC_DIR_ENV not in os.environ:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
