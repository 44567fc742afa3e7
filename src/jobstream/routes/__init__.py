"""The route table, nothing else."""

from __future__ import annotations

from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from jobstream.routes import jobs, ops, stream

_JOB = "/v1/jobs/{job_id}"


# One endpoint per path, so that a 405 lists every allowed method in its Allow header.
class JobResource(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        return await jobs.get_job(request)

    async def delete(self, request: Request) -> Response:
        return await jobs.delete_job(request)


class JobEvents(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        return await stream.stream_events(request)

    async def post(self, request: Request) -> Response:
        return await jobs.append_events(request)


def build_routes() -> list[Route | Mount]:
    return [
        Route("/v1/jobs", jobs.create_job, methods=["POST"]),
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
        Mount("/static", StaticFiles(directory=ops.static_dir()), name="static"),
    ]
