"""`GET /v1/jobs/{id}/events` served in front of Starlette's router.

An open event stream keeps every frame of the chain that called it suspended for as long as the
reader stays, thousands at once. Behind the router that chain is ten coroutines and two request
objects deep (exception middleware, router, route, endpoint wrappers), 5.7 KiB per connection
measured in bench/RESULTS.md before the gateway does anything. This middleware matches the one
long-lived route itself and calls the same endpoint, with the same exception handlers; every
other request, and every other method on this path, goes through the router as usual.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from jobstream import requestid, sentry
from jobstream.errors import EXCEPTION_HANDLERS, ExceptionHandler
from jobstream.routes.stream import stream_events

_EVENTS_PATH = re.compile(r"^/v1/jobs/([^/]+)/events$")
#: The name its requests have in traces, as the router would give it.
EVENTS_ROUTE = "/v1/jobs/{job_id}/events"
#: Exceptions the router's ExceptionMiddleware would map; anything else goes on to Starlette's
#: ServerErrorMiddleware (outside this one), which answers 500 and logs it.
_HANDLERS = {cls: handler for cls, handler in EXCEPTION_HANDLERS.items() if cls is not Exception}


def _handler_for(exc: Exception) -> ExceptionHandler | None:
    for cls in type(exc).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is not None:
            return handler
    return None


class EventStreamRoute:
    """Plain ASGI middleware: answers GET/HEAD on a job's events path, passes everything else on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _EVENTS_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        scope["path_params"] = {"job_id": match.group(1)}
        request_id = requestid.assign(scope)
        sentry.name_transaction(EVENTS_ROUTE)
        del match  # a frame that stays suspended for hours keeps its locals
        request = Request(scope, receive)
        try:
            response = await stream_events(request)
        except Exception as exc:
            handler = _handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        response.headers[requestid.HEADER] = request_id
        await response(scope, receive, send)
