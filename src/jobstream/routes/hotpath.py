"""The requests clients make all day, served in front of Starlette's router.

Event streams, status reads, polls, appends, creates and `/healthz` are most of a gateway's
traffic. Behind the router each request passes ten coroutines and two request objects (exception
middleware, router, every route's match, the route's wrapper, an endpoint class, the request id's
send wrapper): a sizeable share of a plain request's CPU (bench/RESULTS.md), and for an event
stream 5.7 KiB of suspended frames per connection, held for as long as the reader stays. This
middleware matches these paths itself and calls the same endpoints with the same exception
handlers; any other path, or another method on these paths (405 with its Allow header), goes
through the router as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from jobstream import requestid, sentry
from jobstream.errors import EXCEPTION_HANDLERS, ExceptionHandler
from jobstream.routes import jobs, ops, stream

Endpoint = Callable[[Request], Awaitable[Response]]

_JOBS = "/v1/jobs"
_JOB_PREFIX = "/v1/jobs/"
#: Route templates: what requests are named in traces, as the router would name them.
EVENTS_ROUTE = "/v1/jobs/{job_id}/events"
JOB_ROUTE = "/v1/jobs/{job_id}"
POLL_ROUTE = "/v1/jobs/{job_id}/poll"
#: Exceptions the router's ExceptionMiddleware would map; anything else goes on to Starlette's
#: ServerErrorMiddleware (outside this one), which answers 500 and logs it.
_HANDLERS = {cls: handler for cls, handler in EXCEPTION_HANDLERS.items() if cls is not Exception}


def _handler_for(exc: Exception) -> ExceptionHandler | None:
    for cls in type(exc).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is not None:
            return handler
    return None


def _read(endpoint: Endpoint) -> dict[str, Endpoint]:
    # HEAD is answered as GET is (uvicorn leaves the body out), as Starlette's routes do.
    return {"GET": endpoint, "HEAD": endpoint}


#: Paths without a job id: path -> (template, method -> endpoint).
_FIXED: dict[str, tuple[str, dict[str, Endpoint]]] = {
    _JOBS: (_JOBS, {"POST": jobs.create_job}),
    "/healthz": ("/healthz", _read(ops.healthz)),
}
#: Paths under a job: what follows the id ('' for the job itself) -> (template, method -> endpoint).
#: Event streams are looked up by ``stream_events`` at call time, so tests can replace it.
_UNDER_JOB: dict[str, tuple[str, dict[str, Endpoint]]] = {
    "": (JOB_ROUTE, _read(jobs.get_job)),
    "events": (EVENTS_ROUTE, {"POST": jobs.append_events}),
    "poll": (POLL_ROUTE, _read(stream.poll_events)),
}


async def stream_events(request: Request) -> Response:
    return await stream.stream_events(request)


def _match(path: str, method: str) -> tuple[str, Endpoint, str | None] | None:
    """(template, endpoint, job id) for a hot path and method, else None."""
    if path.startswith(_JOB_PREFIX):
        job_id, slash, rest = path[len(_JOB_PREFIX) :].partition("/")
        if not job_id or "/" in rest or (slash and not rest):
            return None  # the router answers 404 (no trailing-slash redirects)
        if rest == "events" and method in ("GET", "HEAD"):
            return EVENTS_ROUTE, stream_events, job_id
        found = _UNDER_JOB.get(rest)
        if found is None:
            return None
    else:
        found = _FIXED.get(path)
        job_id = None
        if found is None:
            return None
    template, endpoints = found
    endpoint = endpoints.get(method)
    return None if endpoint is None else (template, endpoint, job_id)


class HotRoutes:
    """Plain ASGI middleware: answers the hot paths' methods, passes everything else on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _match(scope["path"], scope["method"]) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        template, endpoint, job_id = found
        del found  # an event stream's frame stays suspended for hours, with its locals
        if job_id is not None:
            scope["path_params"] = {"job_id": job_id}
        request_id = requestid.assign(scope)
        sentry.name_transaction(template)
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = _handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        response.headers[requestid.HEADER] = request_id
        # Answered: nothing of the request is needed while the response runs, which for an event
        # stream is hours (the request holds its parsed query, token included, and headers).
        del request, endpoint
        await response(scope, receive, send)
