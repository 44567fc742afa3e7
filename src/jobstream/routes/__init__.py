"""The route table, nothing else."""

from __future__ import annotations

from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from jobstream.routes import devchat, jobs, lists, many, ops, stream, tokens

_JOB = "/v1/jobs/{job_id}"


# One endpoint per path, so that a 405 lists every allowed method in its Allow header.
class JobResource(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        return await jobs.get_job(request)

    async def delete(self, request: Request) -> Response:
        return await jobs.delete_job(request)


class Jobs(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        return await lists.list_jobs(request)

    async def post(self, request: Request) -> Response:
        return await jobs.create_job(request)


class JobEvents(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        return await stream.stream_events(request)

    async def post(self, request: Request) -> Response:
        return await jobs.append_events(request)


class NoRoute(Mount):
    """The last route: 404 for any path that no other route knows.

    Without it Starlette's router answers such a path, when the same path with a trailing slash
    added or removed matches (``/v1/jobs/``, ``/v1/jobs/{id}/events/``, ``/static``), with a
    redirect to an absolute URL built from the request's ``Host`` header, query (read token)
    included: a forged ``Host`` sends the reader, token and all, elsewhere. Starlette() takes no
    ``redirect_slashes`` switch, so the router must never get that far: this catch-all mount
    takes every path, but only as a partial match, so that a route that knows the path and not
    the method still answers 405.
    """

    def __init__(self) -> None:
        super().__init__("", app=_not_found)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return (Match.PARTIAL, {}) if scope["type"] == "http" else (Match.NONE, {})


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    raise HTTPException(404)  # the same problem+json 404 as the router's own


def build_routes() -> list[Route | Mount]:
    return [
        Route("/v1/jobs", Jobs),
        Route("/v1/read-tokens", tokens.create_read_token, methods=["POST"]),
        Route("/v1/events", many.stream_many, methods=["GET"]),
        Route("/v1/poll", many.poll_many, methods=["GET"]),
        Route(_JOB, JobResource),
        Route(f"{_JOB}/events", JobEvents),
        Route(f"{_JOB}/poll", stream.poll_events, methods=["GET"]),
        Route(f"{_JOB}/cancel", jobs.cancel_job, methods=["POST"]),
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/metrics", ops.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", ops.openapi, methods=["GET"]),
        Route("/", ops.index, methods=["GET"]),
        Route("/dev.json", ops.dev_info, methods=["GET"]),
        Route("/dev/chat", devchat.reply, methods=["POST"]),
        Route("/dev/chat/{chat_id}/job", devchat.latest_job, methods=["GET"]),
        Route("/dev/chat/{chat_id}/cancel", devchat.cancel, methods=["POST"]),
        Mount("/static", StaticFiles(directory=ops.static_dir()), name="static"),
        NoRoute(),
    ]
