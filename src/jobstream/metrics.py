"""Prometheus metrics of a gateway or worker process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

jobs_created = Counter("jobstream_jobs_created_total", "Jobs created.", ["type"])
rate_limited = Counter("jobstream_rate_limited_total", "Create requests refused by the rate limit.")
sse_open = Gauge("jobstream_sse_connections", "Open SSE connections.")
polls = Counter("jobstream_polls_total", "Poll requests.", ["kind"])


class _Deliveries(Collector):
    """Events written to readers, counted as plain integers on the hot path (a prometheus_client
    Counter takes a lock on every increment) and read out at scrape time."""

    def __init__(self) -> None:
        self.sse = 0
        self.poll = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("jobstream_events_delivered", "Events written to readers.", labels=["transport"])
        family.add_metric(["sse"], self.sse)
        family.add_metric(["poll"], self.poll)
        yield family


deliveries = _Deliveries()
REGISTRY.register(deliveries)
