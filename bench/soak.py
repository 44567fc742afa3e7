"""Soak: steady traffic across 3 gateways and 3 workers while processes are killed and restarted.

    python -m bench.soak --minutes 60 --rate 4

Starts its own redis-server, three `jobstream serve` and three `jobstream worker` processes on
127.0.0.1. Sessions arrive at ``--rate`` per second; each creates a `demo.story` job on a random
gateway and follows it to its end by SSE (resuming with Last-Event-ID on another gateway after
any break), by long-polling, or by SSE with a cancel half a second in. Every minute gateway and
worker 0 or 1 (in turn) are killed with SIGKILL and started again two seconds later; gateway and
worker 2 are never killed, so that their memory over the whole run shows whether a long-lived
process grows.

Every session is checked end to end: ids strictly increasing (no duplicate), the job ended, a
completed story's text exact (a story retried after its worker was killed re-emits its words
after a "retrying" log: then the text is a cut-off start followed by the whole story), and a
cancel answered 202 ended `cancelled`. Memory (RSS of each process, Redis's used_memory) is
sampled every 10 s. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from httpx_sse import aconnect_sse

from bench.run import proc_rss_kib, wait_http
from jobstream.demo import story_text
from jobstream.devredis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SESSION_TIMEOUT_S = 90.0


@dataclass
class Outcome:
    mode: str
    job_id: str = ""
    status: str = ""
    events: int = 0
    duplicates: int = 0
    reconnects: int = 0
    #: The cancel's answer (cancel sessions): 202 must end `cancelled`, 409 means it had ended.
    cancel_status: int = 0
    text_ok: bool = True
    retried: bool = False
    error: str = ""


@dataclass
class Cluster:
    redis_url: str
    gateway_ports: list[int]
    gateways: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            # This tree's code, whichever jobstream the interpreter has installed.
            "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
            "JOBSTREAM_REDIS_URL": self.redis_url,
            "JOBSTREAM_API_KEYS": f"{API_KEY}=soak",
            "JOBSTREAM_TOKEN_SECRET": "soak-token-secret-0123456789abcdef",
            "JOBSTREAM_CREATE_RATE": "1000000/minute",
            "JOBSTREAM_MAX_SSE_PER_USER": "100000",
            "JOBSTREAM_MAX_SSE_PER_TOKEN_JOB": "100000",
            "JOBSTREAM_MAX_LONG_POLLS_PER_USER": "100000",
            "JOBSTREAM_HEARTBEAT_S": "2",
            "JOBSTREAM_RETRY_MS": "300",
            "JOBSTREAM_SSE_LEASE_S": "8",
            "JOBSTREAM_WORKER_LEASE_S": "5",
            "JOBSTREAM_LOG_LEVEL": "WARNING",
            "JOBSTREAM_DEMO": "1",  # its sessions are demo.story jobs
        }

    def start_gateway(self, index: int) -> None:
        command = [sys.executable, "-m", "jobstream", "serve", "--port", str(self.gateway_ports[index])]
        process = subprocess.Popen(command, env=self.env(), cwd=ROOT)
        wait_http(self.gateway_ports[index])
        if index < len(self.gateways):
            self.gateways[index] = process
        else:
            self.gateways.append(process)

    def start_worker(self, index: int) -> None:
        command = [sys.executable, "-m", "jobstream", "worker", "--concurrency", "20"]
        process = subprocess.Popen(command, env=self.env(), cwd=ROOT)
        if index < len(self.workers):
            self.workers[index] = process
        else:
            self.workers.append(process)

    def stop(self) -> None:
        for process in [*self.gateways, *self.workers]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.gateways, *self.workers]:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _base(cluster: Cluster) -> str:
    # Every gateway, the long-lived one too: a load balancer spreads readers over all of them.
    return f"http://127.0.0.1:{random.choice(cluster.gateway_ports)}"


async def _create(cluster: Cluster, words: int, delay_ms: int) -> dict[str, Any]:
    body = {"type": "demo.story", "input": {"words": words, "delay_ms": delay_ms}}
    for _ in range(20):
        try:
            async with httpx.AsyncClient(base_url=_base(cluster), timeout=10) as http:
                response = await http.post("/v1/jobs", json=body, headers=AUTH)
                if response.status_code == 201:
                    created: dict[str, Any] = response.json()
                    return created
        except httpx.HTTPError:
            pass  # that gateway is down: another one
        await asyncio.sleep(0.2)
    raise RuntimeError("no gateway would create a job")


async def _follow_sse(
    cluster: Cluster, job: dict[str, Any], outcome: Outcome, cancel_after_s: float | None
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cancel_at = time.monotonic() + cancel_after_s if cancel_after_s is not None else None
    deadline = time.monotonic() + SESSION_TIMEOUT_S
    while time.monotonic() < deadline:
        headers = {"Last-Event-ID": events[-1]["id"]} if events else {}
        try:
            async with (
                httpx.AsyncClient(base_url=_base(cluster), timeout=httpx.Timeout(10, read=30)) as http,
                aconnect_sse(
                    http, "GET", job["links"]["events"], params={"token": job["token"]}, headers=headers
                ) as source,
            ):
                if source.response.status_code == 204:
                    return events
                if source.response.status_code == 200:
                    async for message in source.aiter_sse():
                        if not message.data:
                            continue  # the retry: block, pings
                        events.append({"id": message.id, "type": message.event, "data": message.json()})
                        if cancel_at is not None and time.monotonic() >= cancel_at:
                            cancel_at = None
                            outcome.cancel_status = (await http.post(job["links"]["cancel"], headers=AUTH)).status_code
                        if message.event == "done":
                            return events
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        outcome.reconnects += 1
        await asyncio.sleep(0.3)
    outcome.error = "no done before the session timeout"
    return events


async def _follow_poll(cluster: Cluster, job: dict[str, Any], outcome: Outcome) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = "0-0"
    deadline = time.monotonic() + SESSION_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(base_url=_base(cluster), timeout=20) as http:
                response = await http.get(
                    job["links"]["poll"], params={"token": job["token"], "after": after, "wait": 5}
                )
            if response.status_code == 200:
                body = response.json()
                events += body["events"]
                after = body["next"]
                if body["done"]:
                    return events
                continue
        except httpx.HTTPError:
            pass
        outcome.reconnects += 1
        await asyncio.sleep(0.3)
    outcome.error = "no done before the session timeout"
    return events


def _check(outcome: Outcome, events: list[dict[str, Any]], words: int) -> None:
    ids = [tuple(int(part) for part in event["id"].split("-")) for event in events]
    outcome.events = len(events)
    outcome.duplicates = len(ids) - len(set(ids)) + sum(1 for a, b in zip(ids, ids[1:], strict=False) if b <= a)
    done = [event for event in events if event["type"] == "done"]
    outcome.status = done[-1]["data"]["status"] if done else "not ended"
    outcome.retried = any(e["type"] == "log" and "retrying" in e["data"].get("message", "") for e in events)
    if outcome.status == "completed":
        text = "".join(event["data"]["text"] for event in events if event["type"] == "delta")
        whole = story_text(outcome.job_id, words)
        cut = text[: len(text) - len(whole)]
        outcome.text_ok = text == whole or (outcome.retried and text.endswith(whole) and whole.startswith(cut))


async def _session(cluster: Cluster, mode: str) -> Outcome:
    outcome = Outcome(mode)
    words, delay_ms = random.randint(20, 60), random.randint(20, 60)
    try:
        job = await _create(cluster, words, delay_ms)
        outcome.job_id = job["id"]
        if mode == "poll":
            events = await _follow_poll(cluster, job, outcome)
        else:
            events = await _follow_sse(cluster, job, outcome, 0.5 if mode == "cancel" else None)
        _check(outcome, events, words)
    except Exception as exc:  # recorded, not raised: the soak goes on
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


async def _chaos(cluster: Cluster, period_s: float, stop: asyncio.Event, log: list[dict[str, Any]]) -> None:
    turn = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), period_s)
            return
        except TimeoutError:
            pass
        index = turn % 2
        turn += 1
        cluster.gateways[index].kill()
        cluster.workers[index].kill()
        cluster.gateways[index].wait()
        cluster.workers[index].wait()
        log.append({"t": round(time.monotonic()), "killed": f"gateway {index}, worker {index}"})
        await asyncio.sleep(2)
        await asyncio.to_thread(cluster.start_gateway, index)
        cluster.start_worker(index)


async def _sample_memory(
    cluster: Cluster, rdb: redis.Redis, stop: asyncio.Event, samples: list[dict[str, Any]]
) -> None:
    started = time.monotonic()
    while not stop.is_set():
        samples.append(
            {
                "t_s": round(time.monotonic() - started),
                "gateway_rss_kib": [proc_rss_kib([p.pid]) if p.poll() is None else None for p in cluster.gateways],
                "worker_rss_kib": [proc_rss_kib([p.pid]) if p.poll() is None else None for p in cluster.workers],
                "redis_used_kib": int(rdb.info("memory")["used_memory"]) // 1024,
            }
        )
        try:
            await asyncio.wait_for(stop.wait(), 10)
        except TimeoutError:
            pass


async def soak(args: argparse.Namespace, cluster: Cluster, rdb: redis.Redis) -> dict[str, Any]:
    stop = asyncio.Event()
    kills: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    background = [
        asyncio.create_task(_chaos(cluster, 60, stop, kills)),
        asyncio.create_task(_sample_memory(cluster, rdb, stop, samples)),
    ]
    sessions: list[asyncio.Task[Outcome]] = []
    end = time.monotonic() + args.minutes * 60
    while time.monotonic() < end:
        mode = random.choices(["sse", "poll", "cancel"], weights=[7, 2, 1])[0]
        sessions.append(asyncio.create_task(_session(cluster, mode)))
        await asyncio.sleep(random.expovariate(args.rate))
    outcomes = await asyncio.gather(*sessions)
    stop.set()
    await asyncio.gather(*background)
    return _summary(outcomes, kills, samples)


def _summary(outcomes: list[Outcome], kills: list[dict[str, Any]], samples: list[dict[str, Any]]) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    for outcome in outcomes:
        by_status[outcome.status or "error"] = by_status.get(outcome.status or "error", 0) + 1
    return {
        "sessions": len(outcomes),
        "by_mode": {mode: sum(1 for o in outcomes if o.mode == mode) for mode in ("sse", "poll", "cancel")},
        "by_status": by_status,
        "events": sum(o.events for o in outcomes),
        "duplicates_or_disorder": sum(o.duplicates for o in outcomes),
        "text_mismatch": sum(1 for o in outcomes if not o.text_ok),
        "not_ended": sum(1 for o in outcomes if o.status in ("", "not ended")),
        "cancels_accepted": sum(1 for o in outcomes if o.cancel_status == 202),
        "cancels_refused_ended": sum(1 for o in outcomes if o.cancel_status == 409),
        "accepted_cancel_not_cancelled": sum(1 for o in outcomes if o.cancel_status == 202 and o.status != "cancelled"),
        "retried_after_worker_kill": sum(1 for o in outcomes if o.retried),
        "reconnects": sum(o.reconnects for o in outcomes),
        "errors": [o.error for o in outcomes if o.error][:10],
        "kills": kills,
        "memory": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=4, help="new sessions per second")
    args = parser.parse_args()
    with EmbeddedRedis().start() as embedded:
        cluster = Cluster(embedded.url, [free_port() for _ in range(3)])
        rdb = redis.Redis.from_url(embedded.url)
        try:
            for index in range(3):
                cluster.start_gateway(index)
                cluster.start_worker(index)
            result = asyncio.run(soak(args, cluster, rdb))
        finally:
            cluster.stop()
    print(json.dumps({"minutes": args.minutes, "rate": args.rate, **result}))


if __name__ == "__main__":
    main()
