"""Prometheus metrics of a gateway or worker process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

jobs_created = Counter("jobstream_jobs_created_total", "Jobs created.", ["type"])
rate_limited = Counter("jobstream_rate_limited_total", "Create requests refused by the rate limit.")
sse_open = Gauge("jobstream_sse_connections", "Open SSE connections.")
events_delivered = Counter("jobstream_events_delivered_total", "Events written to readers.", ["transport"])
polls = Counter("jobstream_polls_total", "Poll requests.", ["kind"])
