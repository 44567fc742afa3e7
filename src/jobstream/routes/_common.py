"""Helpers every job endpoint shares: the job id check, loading with authorization, JSON bodies."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from jobstream.auth import Principal, authorize_read, authorize_write
from jobstream.errors import JobNotFound, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from jobstream.services import services
from jobstream.store import JobRecord

_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def job_id_of(request: Request) -> str:
    """The path's job id; anything but a lowercase uuid4 is 404 before Redis is touched."""
    job_id: str = request.path_params["job_id"]
    if not _JOB_ID.match(job_id):
        raise JobNotFound()
    return job_id


async def load_job(request: Request, *, write: bool = False) -> tuple[Principal, JobRecord]:
    """Authenticate, load and authorize: 404 for a bad id, 401, then 404 if gone, then 403."""
    job_id = job_id_of(request)
    svc = services(request)
    principal = svc.auth.authenticate(request, allow_query_token=not write)
    job = await svc.store.get(job_id)
    if job is None:
        raise JobNotFound()
    (authorize_write if write else authorize_read)(principal, job)
    return principal, job


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON: 415 for another media type, 413 past ``max_bytes``, 422 if not JSON."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"Send JSON ('Content-Type: application/json'), not {media_type[:100]!r}.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"The body is larger than {max_bytes} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"The body is larger than {max_bytes} bytes.")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed(
            "The body is not valid JSON.", errors=[{"loc": ["body"], "msg": "invalid JSON"}]
        ) from None
