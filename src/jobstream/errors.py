"""Errors that become RFC 9457 problem+json responses, and the handlers that render them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from jobstream import metrics, observability
from jobstream.connection import UNAVAILABLE

logger = logging.getLogger("jobstream.errors")

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: nginx's status for a request its client abandoned; never sent (there is no one to send it to).
CLIENT_CLOSED_REQUEST = 499


class ProblemError(Exception):
    """An error with an HTTP status; ``detail`` is shown to the client, so it must hold no internals."""

    status = 500
    title = "Internal Server Error"
    slug = "internal"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = dict(headers or {})
        self.errors = list(errors) if errors is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, detail={self.detail!r})"


class BadRequest(ProblemError):
    status, title, slug = 400, "Bad Request", "bad-request"


class Unauthorized(ProblemError):
    status, title, slug = 401, "Unauthorized", "unauthorized"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="jobstream"'})


class Forbidden(ProblemError):
    status, title, slug = 403, "Forbidden", "forbidden"


class JobNotFound(ProblemError):
    status, title, slug = 404, "Not Found", "not-found"

    def __init__(self, detail: str = "No such job (it may have expired).") -> None:
        super().__init__(detail)


class JobEnded(ProblemError):
    status, title, slug = 409, "Conflict", "job-ended"


class NoSnapshot(ProblemError):
    status, title, slug = 409, "Conflict", "no-snapshot"


class PayloadTooLarge(ProblemError):
    status, title, slug = 413, "Content Too Large", "too-large"


class UnsupportedMediaType(ProblemError):
    status, title, slug = 415, "Unsupported Media Type", "unsupported-media-type"


class ValidationFailed(ProblemError):
    status, title, slug = 422, "Unprocessable Content", "validation"


class RateLimited(ProblemError):
    status, title, slug = 429, "Too Many Requests", "rate-limited"


class ArchiveUnavailable(ProblemError):
    """The archive is down or slow, and the request needs it (a job Redis no longer holds): as
    Redis being down is answered, 503 with Retry-After."""

    status, title, slug = 503, "Service Unavailable", "unavailable"

    def __init__(self) -> None:
        super().__init__("The archive of ended jobs is unavailable; retry shortly.", headers={"Retry-After": "2"})


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    slug: str | None = None,
    headers: Mapping[str, str] | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
) -> Response:
    title = title or HTTPStatus(status).phrase
    body: dict[str, Any] = {
        "type": f"https://jobstream.dev/problems/{slug or HTTPStatus(status).phrase.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = list(errors)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_MEDIA_TYPE)


def pydantic_errors(exc: Any) -> list[dict[str, Any]]:
    """Field errors of a pydantic ValidationError, without echoing the input back."""
    return [{"loc": list(err["loc"]), "msg": err["msg"]} for err in exc.errors(include_url=False, include_input=False)]


async def handle_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem_response(
        exc.status, exc.detail, title=exc.title, slug=exc.slug, headers=exc.headers, errors=exc.errors
    )


async def handle_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = {404: "No route matches this path.", 405: "This method is not allowed here."}.get(
        exc.status_code, HTTPStatus(exc.status_code).phrase
    )
    return problem_response(exc.status_code, detail, headers=exc.headers)


async def handle_redis_down(request: Request, exc: Exception) -> Response:
    metrics.redis_errors.labels("request").inc()
    logger.warning("redis unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return problem_response(
        503, "The job store is unavailable; retry shortly.", slug="unavailable", headers={"Retry-After": "2"}
    )


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """The client hung up before its request was read (mobile clients do, all day): not an
    error, nothing to report, and no one to answer. One quiet line."""
    logger.info("client disconnected before its request was read: %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Starlette's ServerErrorMiddleware calls this, answers with it, then re-raises for the server
    to log: the line here carries the request's context, so the server's own is skipped
    (observability.SkipLoggedErrors). Sentry reports the re-raised exception once."""
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    observability.mark_logged(exc)
    return problem_response(500, "An unexpected error occurred.", slug="internal")


ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]

EXCEPTION_HANDLERS: dict[type[Exception], ExceptionHandler] = {
    ProblemError: handle_problem,
    HTTPException: handle_http,
    ClientDisconnect: handle_client_disconnect,
    **dict.fromkeys(UNAVAILABLE, handle_redis_down),
    Exception: handle_unexpected,
}
