"""Floors: what the web stack costs before any gateway logic.

For the idle scenario (``bench/run.py idle``), an open SSE connection:

- ``asgi_app``: a bare ASGI app on uvicorn that answers headers and a ``retry:`` frame, then
  waits for the client to leave; the least any uvicorn-served stream can cost.
- ``starlette_app``: the same response behind a Starlette route (routing, the two exception
  middlewares, a ``Request``); the least any Starlette endpoint's stream can cost.

For plain requests (``bench/requests.py``), one small JSON answer, the body of jobstream's
``GET /healthz`` (``{"status":"ok"}``):

- ``asgi_json_app``: a bare ASGI app that answers every request with it (run with and without
  uvicorn's access log);
- ``starlette_json_app``: one Starlette route, ``GET /``, returning it as a ``JSONResponse``.

Run: ``uvicorn bench.floor_app:asgi_app`` (or ``:starlette_app``, ``:asgi_json_app``,
``:starlette_json_app``); the bare apps answer any path.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_OK = b'{"status":"ok"}'
_OK_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_OK)).encode())]


async def _lifespan(receive: Receive, send: Send) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def _hold(receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


async def asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await _hold(receive, send)


async def asgi_json_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": _OK_HEADERS})
    await send({"type": "http.response.body", "body": _OK})


class _HeldStream(Response):
    def __init__(self) -> None:
        pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _hold(receive, send)


async def _events(request: Request) -> Response:
    return _HeldStream()


async def _ok(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


starlette_app = Starlette(routes=[Route("/events/{job_id}", _events)])
starlette_json_app = Starlette(routes=[Route("/", _ok)])
