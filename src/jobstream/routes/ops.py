"""Operations endpoints and the demo page."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisClusterException, RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from jobstream import metrics
from jobstream.connection import ping
from jobstream.errors import problem_response
from jobstream.openapi import openapi_document
from jobstream.outbox import ARCHIVE_CONSUMER, WEBHOOK_CONSUMER
from jobstream.queue import queue_stats
from jobstream.services import services


def static_dir() -> Path:
    """``static/`` inside an installed wheel, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "static", here.parent.parent / "static"):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"static files not found next to {here}")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await ping(services(request).redis)
    except (RedisError, RedisClusterException, OSError):
        return problem_response(503, "Redis is not reachable.", slug="unavailable", headers={"Retry-After": "2"})
    return JSONResponse({"status": "ready"})


async def metrics_endpoint(request: Request) -> Response:
    try:
        queue = await queue_stats(services(request).redis)
        svc = services(request)
        # The archive's backlog where one is configured; the webhooks' always (any job may have one).
        consumers = [WEBHOOK_CONSUMER] + ([ARCHIVE_CONSUMER] if svc.settings.archive_url else [])
        backlogs = await svc.store.outbox.stats(consumers)
    except (RedisError, RedisClusterException, OSError):
        queue, backlogs = None, None  # the process's own metrics still answer; redis_errors tells why
        metrics.redis_errors.labels("metrics").inc()
    return Response(metrics.exposition(queue, backlogs), media_type=CONTENT_TYPE_LATEST)


@cache
def _openapi(max_wait_s: float) -> dict[str, object]:
    return openapi_document(max_wait_s)


async def openapi(request: Request) -> Response:
    return JSONResponse(_openapi(services(request).settings.poll_max_wait_s))


async def dev_info(request: Request) -> Response:
    """The dev credential for the demo page: only the key `jobstream dev` made up, never a configured one."""
    dev_key = services(request).dev_key
    if dev_key is None:
        return problem_response(404, "No route matches this path.")
    return JSONResponse({"api_key": dev_key}, headers={"Cache-Control": "no-store"})


async def index(request: Request) -> Response:
    return FileResponse(static_dir() / "index.html", headers={"Cache-Control": "no-cache"})
