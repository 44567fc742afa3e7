"""``GET /v1/jobs``: the caller's jobs, newest first, filtered, a page at a time (those Redis holds,
then those only the archive holds: listing.py)."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from jobstream import listing
from jobstream.auth import require_user
from jobstream.errors import BadRequest
from jobstream.listing import ListCursor
from jobstream.models import TAG_PATTERN, JobStatus, to_json
from jobstream.services import services
from jobstream.store import ListQuery

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
#: No job type is longer (models.JobCreate): a longer one matches nothing, without asking Redis.
MAX_TYPE_CHARS = 128
_TAG = re.compile(TAG_PATTERN)
_STATUSES = frozenset(status.value for status in JobStatus)


async def list_jobs(request: Request) -> Response:
    svc = services(request)
    principal = svc.auth.authenticate(request)
    require_user(principal)
    query, cursor = _list_query(request)
    if query.job_type is not None and len(query.job_type) > MAX_TYPE_CHARS:
        return _page_response([], None)
    jobs, after = await listing.list_jobs(svc, principal.user, query, cursor)
    return _page_response([job.view_json() for job in jobs], after)


def _page_response(views: list[bytes], after: ListCursor | None) -> Response:
    cursor = to_json(None if after is None else after.encode())
    body = b'{"jobs":[' + b",".join(views) + b'],"next_cursor":' + cursor.encode() + b"}"
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


def _list_query(request: Request) -> tuple[ListQuery, ListCursor]:
    """The query, checked: 400 naming the parameter for an unknown status, a tag that breaks the
    tag pattern, a limit outside 1..100 or a cursor no listing gave out."""
    params = request.query_params
    errors: list[dict[str, object]] = []
    statuses: tuple[str, ...] = ()
    if (status := params.get("status")) is not None:
        statuses = tuple(dict.fromkeys(part.strip() for part in status.split(",")))
        unknown = [part for part in statuses if part not in _STATUSES]
        if unknown:
            known = ", ".join(sorted(_STATUSES))
            errors.append({"loc": ["query", "status"], "msg": f"unknown status {unknown[0][:64]!r}; known: {known}"})
    tag = params.get("tag")
    if tag is not None and not _TAG.match(tag):
        errors.append({"loc": ["query", "tag"], "msg": f"must match {TAG_PATTERN}"})
    limit = DEFAULT_LIMIT
    if (raw_limit := params.get("limit")) is not None:
        limit = int(raw_limit) if raw_limit.isdigit() and len(raw_limit) <= 4 else 0
        if not 1 <= limit <= MAX_LIMIT:
            errors.append({"loc": ["query", "limit"], "msg": f"must be an integer from 1 to {MAX_LIMIT}"})
    cursor = ListCursor()
    if (given := params.get("cursor")) is not None:
        try:
            cursor = ListCursor.decode(given)
        except ValueError:
            errors.append({"loc": ["query", "cursor"], "msg": "not a next_cursor of this listing"})
    if errors:
        raise BadRequest("Invalid query parameters.", errors=errors)
    return ListQuery(limit=limit, statuses=statuses, job_type=params.get("type"), tag=tag), cursor
