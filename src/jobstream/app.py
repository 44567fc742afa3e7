"""create_app(settings) -> the Starlette gateway; the lifespan builds and tears down its services."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from jobstream import keys, metrics, requestid
from jobstream.archive import open_archive
from jobstream.archive.bounded import BoundedArchive
from jobstream.auth import Authenticator
from jobstream.connection import create_client
from jobstream.errors import EXCEPTION_HANDLERS
from jobstream.httplimits import HeaderLimit
from jobstream.hub import Hub
from jobstream.ratelimit import RATE_LIMIT_HEADERS, ConnectionLeases, CreateLimiter
from jobstream.registry import Registry, load_modules, registry_for
from jobstream.requestid import RequestId
from jobstream.routes import build_routes
from jobstream.routes.hotpath import HotRoutes
from jobstream.sendwatch import SendWatch
from jobstream.services import Services
from jobstream.settings import Settings
from jobstream.store import JobStore

#: How often the hot path's delivery counts reach the Prometheus counter.
METRICS_FLUSH_S = 1.0


def tune_gc() -> None:
    """Objects made at start-up live for good: keep them out of every later collection, and collect
    the young generation less often. Full collections over thousands of streams' objects otherwise
    stall the event loop for tens of milliseconds, which readers see as latency."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def begin_shutdown(app: Starlette) -> None:
    """The first step of every shutdown: open streams and waiting long-polls end now, so that their
    readers resume on another gateway (called on SIGTERM, before uvicorn's graceful shutdown)."""
    svc: Services | None = getattr(app.state, "services", None)
    if svc is not None:
        svc.begin_shutdown()


def build_services(settings: Settings, registry: Registry) -> Services:
    client = create_client(settings)
    store = JobStore(client, settings)
    # A lease outlives several heartbeat ticks, on which open streams renew it.
    lease_s = max(settings.sse_lease_s, math.ceil(4 * settings.heartbeat_s))
    return Services(
        settings=settings,
        registry=registry,
        redis=client,
        store=store,
        feed=Hub(client, store, tick_s=settings.heartbeat_s),
        auth=Authenticator(settings),
        limiter=CreateLimiter(client, settings.create_rate),
        leases=ConnectionLeases(client, settings.max_sse_per_user, lease_s),
        # A long-poll's lease only has to outlive its wait; a gateway that dies frees it soon after.
        long_polls=ConnectionLeases(
            client, settings.max_long_polls_per_user, math.ceil(settings.poll_max_wait_s) + 5, keys.long_poll_leases_key
        ),
        send_watch=SendWatch(settings.send_timeout_s),
        # Connected and migrated at start-up if it answers, else when a read first needs it.
        archive=BoundedArchive(open_archive(settings.archive_url)) if settings.archive_url else None,
    )


def cors_middleware(settings: Settings) -> list[Middleware]:
    """Cross-origin access for the configured origins only. Credentials are bearer tokens, never
    cookies, so credentialed CORS stays off and a configured "*" can never be combined with it."""
    if not settings.cors_origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "If-None-Match", "Last-Event-ID"],
            expose_headers=[*RATE_LIMIT_HEADERS, "Retry-After", "Location", "ETag", requestid.HEADER],
            allow_credentials=False,
            max_age=600,
        )
    ]


async def _flush_metrics() -> None:
    while True:
        await asyncio.sleep(METRICS_FLUSH_S)
        metrics.deliveries.flush()


def create_app(settings: Settings, registry: Registry | None = None, *, dev_key: str | None = None) -> Starlette:
    """The gateway. ``dev_key`` (from `jobstream dev` only) is served to the demo page at /dev.json."""
    if registry is None:
        load_modules(settings.app)
        registry = registry_for(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        svc = build_services(settings, registry)
        svc.dev_key = dev_key
        app.state.services = svc
        await svc.feed.start()
        await svc.send_watch.start()
        flusher = asyncio.create_task(_flush_metrics())
        # In the background: an archive that is down or slow never holds the gateway's start back.
        archive_start = asyncio.create_task(svc.archive.start()) if isinstance(svc.archive, BoundedArchive) else None
        try:
            yield
        finally:
            flusher.cancel()
            if archive_start is not None:
                archive_start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await archive_start
            metrics.deliveries.flush()
            svc.begin_shutdown()
            await svc.send_watch.close()
            await svc.feed.close()
            await svc.redis.aclose()
            if svc.archive is not None:
                await svc.archive.close()

    return Starlette(
        routes=build_routes(),
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            Middleware(HeaderLimit),
            *cors_middleware(settings),
            Middleware(HotRoutes),
            Middleware(RequestId),
        ],
        lifespan=lifespan,
    )
