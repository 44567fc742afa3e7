"""``POST /v1/read-tokens``: a read token for several of the caller's jobs, or for a tag."""

from __future__ import annotations

import time

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jobstream import archived
from jobstream.auth import require_user
from jobstream.errors import Forbidden, JobNotFound, ValidationFailed, pydantic_errors
from jobstream.models import ReadTokenCreate, iso
from jobstream.routes._common import is_job_id, read_json
from jobstream.services import services
from jobstream.store import NOT_YOURS


async def create_read_token(request: Request) -> Response:
    """201 with the token and when it expires. Every listed job must exist (else 404) and be the
    caller's (else 403), checked in one round trip (and one archive query for those Redis has
    forgotten); a tag's token covers the caller's jobs that carry it, present and future."""
    svc = services(request)
    principal = svc.auth.authenticate(request)
    require_user(principal)
    try:
        body = ReadTokenCreate.model_validate(await read_json(request, svc.settings.max_body_bytes))
    except ValidationError as exc:
        raise ValidationFailed("The read token request is not valid.", errors=pydantic_errors(exc)) from None
    job_ids = list(dict.fromkeys(body.jobs or ()))
    if not all(is_job_id(job_id) for job_id in job_ids):
        raise JobNotFound()
    owners = await svc.store.owners(job_ids)
    missing = [job_id for job_id, owner in zip(job_ids, owners, strict=True) if owner is None]
    if missing:
        found = await archived.owners(svc, missing)
        owners = [owner or found.get(job_id) for job_id, owner in zip(job_ids, owners, strict=True)]
    if any(owner is None for owner in owners):
        raise JobNotFound()
    if any(owner != principal.user for owner in owners):
        raise Forbidden(NOT_YOURS)
    expires_at = int(time.time()) + body.ttl
    token = svc.auth.issue_scoped_read_token(principal.user, job_ids=job_ids, tag=body.tag, expires_at=expires_at)
    return JSONResponse(
        {"token": token, "expires_at": iso(expires_at * 1000)}, status_code=201, headers={"Cache-Control": "no-store"}
    )
