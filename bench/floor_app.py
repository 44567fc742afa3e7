"""Floors for the idle scenario: what an open SSE connection costs before any gateway logic.

- ``asgi_app``: a bare ASGI app on uvicorn that answers headers and a ``retry:`` frame, then
  waits for the client to leave; the least any uvicorn-served stream can cost.
- ``starlette_app``: the same response behind a Starlette route (routing, the two exception
  middlewares, a ``Request``); the least any Starlette endpoint's stream can cost.

Run: ``uvicorn bench.floor_app:asgi_app`` (or ``:starlette_app``); any path streams.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def _hold(receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


async def asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await _hold(receive, send)


class _HeldStream(Response):
    def __init__(self) -> None:
        pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _hold(receive, send)


async def _events(request: Request) -> Response:
    return _HeldStream()


starlette_app = Starlette(routes=[Route("/events/{job_id}", _events)])
