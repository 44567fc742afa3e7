"""Helpers shared by test modules: waiting for a condition, reading /metrics, checking problem answers.

A test that needs something to have happened waits for that very thing with ``wait_until`` (or
``wait_until_async`` inside an event loop) rather than sleeping for a while and hoping: it goes
on as soon as the condition holds, and fails with ``message`` if it never does. A fixed sleep is
left only where time passing is what the test is about (a quiet period, a slow client).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, overload

import httpx
import uvicorn
from uvicorn.server import ServerState

from jobstream.httplimits import GatewayHttpProtocol

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout_s: float = 10,
    interval_s: float = 0.02,
    message: str = "the condition was never met",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that; raise AssertionError
    with ``message`` if it has not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (within {timeout_s:g} s)")
        time.sleep(interval_s)


@overload
async def wait_until_async(
    predicate: Callable[[], Awaitable[T]], *, timeout_s: float = ..., interval_s: float = ..., message: str = ...
) -> T: ...


@overload
async def wait_until_async(
    predicate: Callable[[], T], *, timeout_s: float = ..., interval_s: float = ..., message: str = ...
) -> T: ...


async def wait_until_async(
    predicate: Callable[[], Any],
    *,
    timeout_s: float = 10,
    interval_s: float = 0.02,
    message: str = "the condition was never met",
) -> Any:
    """``wait_until`` inside an event loop: sleeps without blocking it, and ``predicate`` may be a
    coroutine function."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (within {timeout_s:g} s)")
        await asyncio.sleep(interval_s)


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` of an exposition (labels in any order), 0 when absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, number = line.rpartition(" ")
        found_name, _, label_text = series.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if found_name == name and found == labels:
            return float(number)
    return 0.0


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    """``response`` is an RFC 9457 problem with ``status``; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert {"type", "title", "status", "detail"} <= body.keys()
    return body


# ---- the README's code examples, run as written

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading_text: str, language: str = "python") -> str:
    """The first ```<language> block of README.md after the line that starts with ``heading_text``."""
    text = README.read_text()
    start = text.index(heading_text)
    match = re.search(rf"```{re.escape(language)}\n(.*?)```", text[start:], re.S)
    assert match, f"no {language} block after {heading_text!r}"
    return match.group(1)


def load_module(name: str, source: str, tmp_path: Path) -> ModuleType:
    """``source`` imported as the module ``name`` (from a file in ``tmp_path``)."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- jobstream as real processes


def wait_ready(http: httpx.Client, timeout_s: float = 20) -> None:
    def ready() -> bool:
        try:
            return http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout_s=timeout_s, interval_s=0.05, message="the gateway never became ready")


def jobstream(*args: str, env: dict[str, str], **popen: Any) -> subprocess.Popen[bytes]:
    """`python -m jobstream <args>` as a real process."""
    return subprocess.Popen([sys.executable, "-m", "jobstream", *args], env=env, **popen)


def kill_all(*processes: subprocess.Popen[bytes] | None) -> None:
    """Test cleanup: kill whatever is still running (a passing test has already stopped them)."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    return {**env, **extra}


def app_env(redis_url: str, api_key: str, token_secret: str, **extra: str) -> dict[str, str]:
    """The environment of a gateway or worker process on ``redis_url`` with the test handlers,
    one API key (for user alice) and a shared token secret."""
    return clean_env(
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
        JOBSTREAM_REDIS_URL=redis_url,
        JOBSTREAM_API_KEYS=f"{api_key}=alice",
        JOBSTREAM_TOKEN_SECRET=token_secret,
        JOBSTREAM_APP="tests.handlers",
        **extra,
    )


def scrape(port: int, name: str, **labels: str) -> float:
    """One series of /metrics, over a new connection (so that any process may answer)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as fresh:
        return value(fresh.get("/metrics").text, name, **labels)


#: Commands a connection sends for itself rather than for a request (set-up, health, pub/sub).
CONNECTION_COMMANDS = ("ping", "hello", "client", "select", "subscribe", "unsubscribe")


def redis_commands_of(rdb: Any, request: Callable[[], Any], *, warm_up: bool = True) -> list[str]:
    """The commands one request sends to Redis (MONITOR), one per round trip unless pipelined,
    without those its scripts run inside Redis and a connection's own. ``warm_up`` makes the
    request once before (scripts are loaded by then)."""
    if warm_up:
        request()
    marker = uuid.uuid4().hex
    sent: list[str] = []
    with rdb.monitor() as monitor:
        request()
        rdb.echo(marker)
        while (command := monitor.next_command())["command"] != f"ECHO {marker}":
            name = command["command"].split(" ", 1)[0].lower()
            if command["client_type"] != "lua" and not name.startswith(CONNECTION_COMMANDS):
                sent.append(name)
    return sent


# ---- one request through the gateway's HTTP protocol, without a socket


class RecordingTransport:
    """The part of an asyncio transport that uvicorn's protocol uses, recording each write."""

    def __init__(self, peer: tuple[Any, ...] = ("127.0.0.1", 50000)) -> None:
        self.peer = peer
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        pass


def serve_one(
    app: Any,
    request: bytes,
    *,
    until: bytes,
    peer: tuple[Any, ...] = ("127.0.0.1", 50000),
    access_logger: Any = None,
    **config: Any,
) -> list[bytes]:
    """``request`` through GatewayHttpProtocol as uvicorn runs it, until the bytes written end with
    ``until``; the writes, each as made. ``access_logger`` replaces the protocol's own."""

    async def scenario() -> list[bytes]:
        settings = uvicorn.Config(app, log_config=None, lifespan="off", proxy_headers=False, **config)
        protocol = GatewayHttpProtocol(settings, ServerState(), {}, asyncio.get_running_loop())
        if access_logger is not None:
            protocol.access_logger = access_logger
        transport = RecordingTransport(peer)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(request)
        await wait_until_async(lambda: b"".join(transport.writes).endswith(until), timeout_s=30)
        protocol.connection_lost(None)
        return transport.writes

    return asyncio.run(scenario())
