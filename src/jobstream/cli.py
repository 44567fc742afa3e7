"""`jobstream serve | worker | dev | tail | submit | archive migrate`: parse arguments, build
Settings, hand over to the app or worker."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Coroutine

import prometheus_client
import uvicorn
from uvicorn.config import STARTUP_FAILURE

from jobstream import __version__, httplimits, metrics, sentry, supervisor
from jobstream.app import create_app, tune_gc
from jobstream.archive import ArchiveError, open_archive
from jobstream.client import commands as client_commands
from jobstream.connection import create_client, wait_for_redis
from jobstream.devredis import EmbeddedRedis, EmbeddedRedisUnavailable
from jobstream.observability import configure_logging
from jobstream.registry import load_modules, registry_for
from jobstream.server import GatewayServer
from jobstream.settings import Settings, SettingsError, default_data_dir, load_settings
from jobstream.worker import Worker

logger = logging.getLogger("jobstream.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobstream", description="SSE gateway over Redis for long-running jobs.")
    parser.add_argument("--version", action="version", version=f"jobstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("serve", "run one gateway"), ("dev", "gateway + worker + embedded Redis")):
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument("--host", default="127.0.0.1")
        cmd.add_argument("--port", type=int, default=8000)
        cmd.add_argument("--app", action="append", default=[], help="module with job handlers (repeatable)")
    commands.choices["serve"].add_argument(
        "--workers", type=int, default=1, help="gateway processes sharing the port (default 1)"
    )
    worker = commands.add_parser("worker", help="run jobs from the queue")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--app", action="append", default=[], help="module with job handlers (repeatable)")
    archive = commands.add_parser("archive", help="manage the archive of ended jobs")
    archive_commands = archive.add_subparsers(dest="archive_command", required=True)
    migrate = archive_commands.add_parser("migrate", help="create or update the archive's schema")
    migrate.add_argument("--url", default=None, help="archive URL (default: JOBSTREAM_ARCHIVE_URL)")
    client_commands.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in client_commands.COMMANDS:
        sys.exit(client_commands.run(args))  # a client of a gateway: no server settings to load
    if args.command == "archive":
        sys.exit(_archive_migrate(args.url or os.environ.get("JOBSTREAM_ARCHIVE_URL")))
    try:
        settings = load_settings()
        if args.app:
            settings = settings.model_copy(update={"app": [*settings.app, *args.app]})
        configure_logging(settings.log_level, settings.log_format)
        load_modules(settings.app)
    except (SettingsError, ImportError) as exc:
        sys.exit(f"jobstream: {exc}")
    if args.command == "serve":
        _warn_about_serve_settings(settings)
    try:
        if args.command == "serve" and args.workers > 1:
            _serve_processes(settings, args.host, args.port, args.workers)
        elif args.command == "serve":
            _run(_serve(settings, args.host, args.port, with_worker=False))
        elif args.command == "worker":
            _run(_work(settings, args.concurrency or settings.worker_concurrency))
        else:
            _dev(settings, args.host, args.port)
    except EmbeddedRedisUnavailable as exc:
        sys.exit(f"jobstream dev: {exc}")
    except OSError as exc:
        sys.exit(f"jobstream {args.command}: {exc}")


def _archive_migrate(url: str | None) -> str | None:
    """`jobstream archive migrate`: the archive's schema up to date (None: done, else why not)."""
    if not url:
        return "jobstream archive migrate: no archive: set JOBSTREAM_ARCHIVE_URL or pass --url"
    try:
        store = open_archive(url)
    except ValueError as exc:
        return f"jobstream archive migrate: {exc}"

    async def migrate() -> None:
        try:
            await store.migrate()
        finally:
            await store.close()

    try:
        asyncio.run(migrate())
    except ArchiveError as exc:
        return f"jobstream archive migrate: {exc}"
    print(f"jobstream archive migrate: the archive's schema is up to date ({_redacted(url)})")
    return None


def _redacted(url: str) -> str:
    """``url`` without its password, for a line that may end up in logs."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _run(main: Coroutine[None, None, None]) -> None:
    """Run on uvloop when it is installed (uvicorn[standard] brings it), else on asyncio's loop."""
    tune_gc()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    with_worker: bool,
    dev_key: str | None = None,
    sockets: list[socket.socket] | None = None,
) -> None:
    sentry.init(settings, "gateway+worker" if with_worker else "gateway")
    app = create_app(settings, registry_for(settings), dev_key=dev_key)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # Logging is configured once, by main() (or _gateway_process): applied again here, every
        # filter would be added twice.
        log_config=None,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        proxy_headers=True,
        # Bounded request heads, a deadline per request, the keep-alive timeout (httplimits).
        **httplimits.uvicorn_options(settings),
    )
    worker = _make_worker(settings, settings.worker_concurrency) if with_worker else None
    gateway = GatewayServer(config, app, on_exit=worker.stop if worker is not None else None)
    worker_task = asyncio.create_task(worker.run()) if worker is not None else None
    try:
        await gateway.serve(sockets=sockets)
    finally:
        if worker is not None and worker_task is not None:
            worker.stop()
            await worker_task
            await worker.client.aclose()
    if not gateway.started:
        raise SystemExit(STARTUP_FAILURE)


def _warn_about_serve_settings(settings: Settings) -> None:
    if "token_secret" not in settings.model_fields_set:
        logger.warning(
            "JOBSTREAM_TOKEN_SECRET is not set: read tokens are signed with a random per-process secret, "
            "so they stop working on restart and on other gateways"
        )
    if not settings.api_keys and not settings.jwt_secret:
        logger.warning("neither JOBSTREAM_API_KEYS nor JOBSTREAM_JWT_SECRET is set: every request will get 401")


def _serve_processes(settings: Settings, host: str, port: int, workers: int) -> None:
    """Several gateway processes on one port, each with its own hub, run like `serve` itself."""
    # ...with a directory where their metrics meet, so that any one of them answers for all.
    own_dir = metrics.MULTIPROC_DIR_ENV not in os.environ
    if own_dir:
        os.environ[metrics.MULTIPROC_DIR_ENV] = tempfile.mkdtemp(prefix="jobstream-metrics-")
    try:
        listener = supervisor.bind(host, port)
        logger.info("gateway processes: %d on http://%s:%d", workers, host, port)
        start = functools.partial(supervisor.spawn, _gateway_process, settings, host, port, listener, os.getpid())
        supervisor.supervise(start, workers, settings.shutdown_grace_s)
    finally:
        if own_dir:
            shutil.rmtree(os.environ.pop(metrics.MULTIPROC_DIR_ENV), ignore_errors=True)


def _gateway_process(settings: Settings, host: str, port: int, listener: socket.socket, supervisor_pid: int) -> None:
    """One process of `serve --workers N` (in a fresh interpreter): `serve` on the shared socket."""
    supervisor.become_child(supervisor_pid)
    configure_logging(settings.log_level, settings.log_format)
    load_modules(settings.app)
    _run(_serve(settings, host, port, with_worker=False, sockets=[listener]))


def _make_worker(settings: Settings, concurrency: int) -> Worker:
    client = create_client(settings, blocking_reads=True)
    return Worker(settings, registry_for(settings), client, concurrency=concurrency)


async def _work(settings: Settings, concurrency: int) -> None:
    sentry.init(settings, "worker")
    if settings.worker_metrics_listen:
        host, _, port = settings.worker_metrics_listen.rpartition(":")
        prometheus_client.start_http_server(int(port), addr=host or "0.0.0.0")
    worker = _make_worker(settings, concurrency)
    try:
        await wait_for_redis(worker.client)
        await worker.run(handle_signals=True)
    finally:
        await worker.client.aclose()


def _dev(settings: Settings, host: str, port: int) -> None:
    # The demo job types, for the demo page: on here, and in the environment of anything this starts.
    os.environ["JOBSTREAM_DEMO"] = "1"
    updates: dict[str, object] = {"demo": True}
    # Only a key made up here is shown to the demo page; configured keys stay the operator's.
    dev_key = None if settings.api_keys else f"dev-{secrets.token_urlsafe(12)}"
    if dev_key is not None:
        updates["api_keys"] = {dev_key: "dev"}
    embedded: EmbeddedRedis | None = None
    if settings.redis_url is None:
        embedded = EmbeddedRedis().start()
        updates["redis_url"] = embedded.url
    if settings.archive_url is None:
        updates["archive_url"] = _dev_archive(settings)
    settings = settings.model_copy(update=updates)
    try:
        _print_banner(settings, host, port, embedded)
        _run(_serve(settings, host, port, with_worker=True, dev_key=dev_key))
    finally:
        if embedded is not None:
            embedded.stop()


def _dev_archive(settings: Settings) -> str:
    """`jobstream dev` archives to archive.db in its data directory (made if missing)."""
    folder = os.path.abspath(settings.data_dir or default_data_dir())
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.join(folder, 'archive.db')}"


def _print_banner(settings: Settings, host: str, port: int, embedded: EmbeddedRedis | None) -> None:
    key = next(iter(settings.api_keys))
    base = f"http://{host}:{port}"
    redis_line = f"embedded Redis on {embedded.url}" if embedded else f"Redis at {settings.effective_redis_url}"
    print(
        f"""
jobstream dev: gateway + worker + {redis_line}
  demo page  {base}/
  API key    {key}

  curl -s -X POST {base}/v1/jobs -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' -d '{{"type": "demo.story", "input": {{"words": 30}}}}'
  curl -N '{base}/v1/jobs/<id>/events?token=<token>'

Ctrl-C stops everything.
""",
        flush=True,
    )
