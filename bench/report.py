"""Markdown tables from a results file of bench/matrix.sh, pairs.sh, polling.sh or manyjobs.sh (their median lines).

Usage: ``python -m bench.report bench/results/<run>.jsonl``
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def _fanout(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| jobs × readers | events/s in | target | appends | delivered/s (expected) | p50 / p99 / max ms | gaps "
        "| dups | server CPU ms per 1,000 | Redis CPU ms per 1,000 | deliveries per server CPU-s | Redis conns "
        "| loadgen CPU-s | other processes' cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lat = r["latency_ms"]
        out.append(
            f"| {r['jobs']} × {r['readers']} | {r['rate']:g} | {r['target']} | {_publish(r)} "
            f"| {r['deliveries_per_s']:,.0f} ({r['expected_deliveries_per_s']:,.0f}) "
            f"| {lat['p50']} / {lat['p99']} / {lat['max']} | {r['gaps']} | {r['duplicates']} "
            f"| {r['server_cpu_ms_per_1000']} | {r['redis_cpu_ms_per_1000']} | {r['deliveries_per_server_cpu_s']:,.0f} "
            f"| {r['redis_connections']} | {r['loadgen_cpu_s']} | {r.get('other_cores_busy', '—')} |"
        )
    return out


def _readers(r: dict[str, Any]) -> str:
    per = r.get("jobs_per_connection", 1)
    connections = r.get("reader_connections", r["jobs"] * r["readers"] // per)
    if per == 1:
        return f"{connections:,} × `GET /v1/jobs/{{id}}/events` (1 job each)"
    return f"{connections:,} × `GET /v1/events?jobs=` ({per} jobs each)"


def _many_row(label: str, r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return (
        f"| {label} | {_readers(r)} | {r['deliveries_per_s']:,.0f} ({r['expected_deliveries_per_s']:,.0f}) "
        f"| {lat['p50']} / {lat['p99']} / {lat['max']} | {r['gaps']:g} / {r['duplicates']:g} "
        f"| {r['silent_job_streams']:g} | {r['cursor_mismatches']:g} | {r['server_cpu_ms_per_1000']:.2f} "
        f"| {r['redis_cpu_ms_per_1000']:.2f} "
        f"| {r['server_rss_kib_before'] / 1024:.1f} → {r['server_rss_kib'] / 1024:.1f} "
        f"| {r['loadgen_cpu_s']:.2f} | {r['other_cores_busy']:.2f} |"
    )


def _medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each measured figure's median over the runs (what all runs share, such as the options, as is)."""
    merged: dict[str, Any] = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, dict):
            merged[key] = _medians([r[key] for r in rows])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if any(r[key] != value for r in rows):
                merged[key] = round(statistics.median(r[key] for r in rows), 2)
    return merged


def _many(rows: list[dict[str, Any]]) -> list[str]:
    """bench/manyjobs.sh: every run in order, then each kind of reader's medians over its runs."""
    out = [
        f"Events appended: {_publish(rows[0])}, {rows[0]['rate']:g}/s over {rows[0]['jobs']} jobs, "
        f"{rows[0]['readers']} readers per job, {rows[0]['seconds']:g} s per run.",
        "",
        "| run | readers | delivered/s (expected) | p50 / p99 / max ms | gaps / dups | (connection, job) pairs "
        "silent | cursor mismatches | gateway CPU ms per 1,000 | Redis CPU ms per 1,000 "
        "| gateway RSS MiB, before → with readers | loadgen CPU-s | other processes' cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    kinds: dict[int, list[dict[str, Any]]] = {}
    for index, r in enumerate(rows, 1):
        kinds.setdefault(r.get("jobs_per_connection", 1), []).append(r)
        out.append(_many_row(str(index), r))
    for _, selected in sorted(kinds.items()):
        out.append(_many_row(f"**median of {len(selected)}**", _medians(selected)))
    return out


def _publish(r: dict[str, Any]) -> str:
    """How events were appended: results from before ``--publish`` appended the hub's and the naive
    reader's straight into Redis, and Nchan's over HTTP."""
    publish = r.get("publish") or ("http" if r["target"] == "nchan" else "direct")
    return "HTTP POST" if publish == "http" else "direct to Redis"


def _poll_interval(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| clients (jobs) | every | events/s in | target | appends | requests/s | request p50 / p99 / max ms "
        "| events delivered/s | gaps / dups | non-2xx/304 | server CPU µs per poll | per HTTP request "
        "| per 1,000 events (ms) | Redis CPU µs per poll | other processes' cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lat = r["latency_ms"]
        out.append(
            f"| {r['clients']:,} ({r['jobs']}) | {r['interval']:g} s | {r['rate']:g} | {r['target']} | {_publish(r)} "
            f"| {r['requests_per_s']:,} | {lat['p50']} / {lat['p99']} / {lat['max']} | {r['deliveries_per_s']:,} "
            f"| {r['gaps']} / {r['duplicates']} | {r['errors']} | {r['server_cpu_us_per_request']} "
            f"| {r['server_cpu_us_per_http_request']} | {r['server_cpu_ms_per_1000_events']} "
            f"| {r['redis_cpu_us_per_request']} | {r.get('other_cores_busy', '—')} |"
        )
    return out


def _idle(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| target | connections | server RSS before → after (KiB) | RSS per connection (KiB) "
        "| Redis connections before → after |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['target']} | {r['connections']:,} | {r['rss_kib_before']:,} → {r['rss_kib_after']:,} "
            f"| {r['rss_kib_per_connection']} | {r['redis_connections_before']} → {r['redis_connections_after']} |"
        )
    return out


def _poll(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| clients | wait | requests/s | non-200 answers | server CPU ms per request | loadgen CPU-s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['clients']:,} | {r['wait']:g} s | {r['requests_per_s']:,} | {r['errors']} "
            f"| {r['server_cpu_ms_per_request']} | {r['loadgen_cpu_s']} |"
        )
    return out


def _create(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| creates/s asked | creates/s done | p50 / p99 / max ms | non-201 | server CPU ms per create |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lat = r["latency_ms"]
        out.append(
            f"| {r['rate']:g} | {r['requests_per_s']} | {lat['p50']} / {lat['p99']} / {lat['max']} "
            f"| {r['errors']} | {r['server_cpu_ms_per_request']} |"
        )
    return out


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    rows = [r for r in rows if "median_of" in r]
    many = [r for r in rows if r["scenario"] == "fanout" and r.get("jobs_per_connection", 1) > 1]
    if many:
        # manyjobs.sh: one run per line, both kinds of readers alternating.
        print("#### fanout, many jobs per connection and one (each run, then medians)\n")
        print("\n".join(_many([r for r in rows if r["scenario"] == "fanout"])) + "\n")
        rows = [r for r in rows if r["scenario"] != "fanout"]
    for title, scenario, render in (
        ("fanout", "fanout", _fanout),
        ("idle", "idle", _idle),
        ("poll", "poll", _poll),
        ("poll-interval", "poll-interval", _poll_interval),
        ("create", "create", _create),
    ):
        selected = [r for r in rows if r["scenario"] == scenario]
        if selected:
            print(f"#### {title} (median of {selected[0]['median_of']})\n")
            print("\n".join(render(selected)) + "\n")


if __name__ == "__main__":
    main()
