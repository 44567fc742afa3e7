"""Fixtures: one real redis-server per session (flushed per test), and live gateways + workers
served by uvicorn on loopback ports, each in a thread with its own event loop.

Modules marked ``on_cluster`` run every test twice: on the single redis-server and on a local
Redis Cluster of 3 masters and 3 replicas (started once, when the first such test runs)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import hypothesis
import pytest
import redis
import uvicorn
from httpx_sse import ServerSentEvent, connect_sse
from redis.cluster import RedisCluster

import tests.handlers  # noqa: F401  (registers the test.* job types)
from jobstream import httplimits
from jobstream.app import create_app
from jobstream.connection import create_client
from jobstream.devredis import EmbeddedRedis, EmbeddedRedisCluster, free_port
from jobstream.registry import registry_for
from jobstream.settings import Settings
from jobstream.worker import Worker
from tests.pgserver import PostgresServer
from tests.webhook_receiver import Receiver

# In CI, property tests run the same examples every time: a landing is never blocked by chance.
# Locally they explore new ones on every run.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")

API_KEYS = {"key-alice": "alice", "key-bob": "bob"}
ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
JWT_SECRET = "jwt-secret-for-tests-0123456789abcdef"
TOKEN_SECRET = "token-secret-for-tests-0123456789abcdef"

#: What the ``rdb`` fixture gives: a client of the one server, or of the cluster.
SyncRedis = redis.Redis | RedisCluster

ROOT = Path(__file__).resolve().parent.parent

#: URLs of the Redis Clusters this session started: settings made for them turn cluster mode on.
CLUSTER_URLS: set[str] = set()


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "api_keys": API_KEYS,
        "jwt_secret": JWT_SECRET,
        "token_secret": TOKEN_SECRET,
        "create_rate": "1000/minute",
        "delta_flush_ms": 20,
        "shutdown_grace_s": 1,
        "redis_cluster": redis_url in CLUSTER_URLS,
        # As in production (whatever the shell running the tests sets): tests of the demo.* job
        # types turn them on, with demo=True.
        "demo": False,
    }
    values.update(overrides)
    return Settings(**values)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("on_cluster"):
        # Session scope: pytest groups the tests by backend, so the cluster starts once.
        metafunc.parametrize("redis_backend", ["single", "cluster"], scope="session")


@pytest.fixture(scope="session")
def redis_backend() -> str:
    """Which Redis a test runs on; modules marked ``on_cluster`` are parametrized over both."""
    return "single"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedRedisCluster]:
    with EmbeddedRedisCluster(masters=3, replicas=1) as cluster:
        CLUSTER_URLS.add(cluster.url)
        yield cluster
        CLUSTER_URLS.discard(cluster.url)


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_backend: str) -> str:
    if redis_backend == "cluster":
        cluster: EmbeddedRedisCluster = request.getfixturevalue("redis_cluster")
        for node in cluster.nodes:
            with redis.Redis.from_url(node.url) as client, contextlib.suppress(redis.ReadOnlyError):
                client.flushall()  # replicas refuse it and follow their masters
        return cluster.url
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    with redis.Redis.from_url(server.url) as client:
        client.flushall()
    return server.url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL (Debian's binaries; missing: the tests fail, saying how to install)."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def archive_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty archive database per test, on each store: a SQLite file, or a database of
    its own on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'archive.db'}"  # an absolute path: sqlite:////tmp/...
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex}"

    async def create() -> None:
        conn = await asyncpg.connect(server.url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return server.url_of(name)


@pytest.fixture
def rdb(redis_url: str) -> Iterator[SyncRedis]:
    """A plain synchronous client, for looking at what the gateway stored."""
    client: SyncRedis
    if redis_url in CLUSTER_URLS:
        client = RedisCluster.from_url(redis_url, decode_responses=True)
    else:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def server_nodes(rdb: SyncRedis) -> list[redis.Redis]:
    """Every server behind ``rdb``: itself, or each node of a cluster (where server-wide commands
    such as INFO or PUBSUB CHANNELS would otherwise ask one node only)."""
    if isinstance(rdb, RedisCluster):
        return [node.redis_connection for node in rdb.get_nodes() if node.redis_connection is not None]
    return [rdb]


def subscribed_channels(rdb: SyncRedis, pattern: str) -> list[str]:
    return sorted(channel for node in server_nodes(rdb) for channel in node.pubsub_channels(pattern))


@dataclass
class LiveStack:
    """A gateway (and optionally a worker) on a loopback port, run in a background thread."""

    settings: Settings
    with_worker: bool = True
    port: int = field(default_factory=free_port)
    worker: Worker | None = None
    #: Served to the demo page at /dev.json, as `jobstream dev` does.
    dev_key: str | None = None

    def __post_init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveStack:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("live stack did not start")
        return self

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=15, **kwargs)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        app = create_app(self.settings, registry_for(self.settings), dev_key=self.dev_key)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=1,
            lifespan="on",
            **httplimits.uvicorn_options(self.settings),  # as `serve` runs it
        )
        self._server = uvicorn.Server(config)
        worker_task = None
        if self.with_worker:
            client = create_client(self.settings, blocking_reads=True)
            self.worker = Worker(self.settings, registry_for(self.settings), client, concurrency=4)
            worker_task = asyncio.create_task(self.worker.run())
        serve = asyncio.create_task(self._server.serve())
        while not self._server.started and not serve.done():
            await asyncio.sleep(0.01)
        self._ready.set()
        await serve
        if self.worker is not None and worker_task is not None:
            self.worker.stop()
            await worker_task
            await self.worker.client.aclose()

    def stop(self) -> None:
        if self._server is not None and self._loop is not None:
            server, worker = self._server, self.worker

            def request_exit() -> None:
                server.should_exit = True
                if worker is not None:
                    worker.stop()

            self._loop.call_soon_threadsafe(request_exit)
        self._thread.join(15)


@pytest.fixture
def make_stack(redis_url: str) -> Iterator[Callable[..., LiveStack]]:
    stacks: list[LiveStack] = []

    def make(*, with_worker: bool = True, dev_key: str | None = None, **overrides: Any) -> LiveStack:
        settings = make_settings(redis_url, **overrides)
        stack = LiveStack(settings, with_worker=with_worker, dev_key=dev_key).start()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture
def stack(make_stack: Callable[..., LiveStack]) -> LiveStack:
    return make_stack()


@pytest.fixture
def client(stack: LiveStack) -> Iterator[httpx.Client]:
    with stack.client() as http:
        yield http


@pytest.fixture
def gateway(make_stack: Callable[..., LiveStack]) -> Iterator[httpx.Client]:
    """``client`` of a gateway alone: no worker, so jobs stay as a test leaves them and nothing but
    the requests talks to Redis."""
    with make_stack(with_worker=False).client() as http:
        yield http


@pytest.fixture
def demo_client(make_stack: Callable[..., LiveStack]) -> Iterator[httpx.Client]:
    """``client`` of a gateway and worker with the built-in demo.* job types on (JOBSTREAM_DEMO)."""
    with make_stack(demo=True).client() as http:
        yield http


@pytest.fixture
def worker_process(redis_url: str) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `jobstream worker` processes on the test's Redis, with the test handlers and ``env``;
    whatever is still running at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        environment = {
            **os.environ,
            # The tests' handlers, and this tree's own package whatever the environment installed.
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
            "JOBSTREAM_REDIS_URL": redis_url,
            "JOBSTREAM_REDIS_CLUSTER": str(redis_url in CLUSTER_URLS),
            "JOBSTREAM_APP": "tests.handlers",
            **env,
        }
        process = subprocess.Popen([sys.executable, "-m", "jobstream", "worker"], env=environment)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on a loopback port (answers 200 until told otherwise)."""
    server = Receiver().start()
    yield server
    server.stop()


def create_job(
    http: httpx.Client, job_type: str = "external", headers: dict[str, str] | None = None, **body: Any
) -> dict[str, Any]:
    response = http.post("/v1/jobs", json={"type": job_type, **body}, headers=headers or ALICE)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def append(http: httpx.Client, job: dict[str, Any], events: Any, headers: dict[str, str] | None = None) -> list[str]:
    response = http.post(f"/v1/jobs/{job['id']}/events", json=events, headers=headers or ALICE)
    assert response.status_code == 201, response.text
    ids: list[str] = response.json()["ids"]
    return ids


def read_sse(
    http: httpx.Client, job: dict[str, Any], *, headers: dict[str, str] | None = None, **params: str
) -> tuple[httpx.Response, list[ServerSentEvent]]:
    """Follow a job's event stream until the server closes it."""
    events: list[ServerSentEvent] = []
    with connect_sse(
        http,
        "GET",
        f"/v1/jobs/{job['id']}/events",
        params={"token": job["token"], **params},
        headers=dict(headers or {}),
    ) as source:
        if source.response.status_code == 200:
            events = [event for event in source.iter_sse() if event.event != "message" or event.data]
        return source.response, events


def poll_all(http: httpx.Client, job: dict[str, Any], after: str | None = None, **params: Any) -> list[dict[str, Any]]:
    """Poll until `done`, returning every event."""
    events: list[dict[str, Any]] = []
    for _ in range(1000):
        query = {"token": job["token"], **params, **({"after": after} if after else {})}
        body = http.get(f"/v1/jobs/{job['id']}/poll", params=query).json()
        events += body["events"]
        after = body["next"]
        if body["done"]:
            return events
    raise AssertionError("poll never reached done")
