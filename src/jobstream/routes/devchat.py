"""The app side of a chat for the demo page, under `jobstream dev` only (404 elsewhere).

/static/ai-sdk.js's JobstreamChatTransport calls three routes of the app that holds the API key;
`jobstream dev` has no app, so the gateway stands in, at ``/dev/chat`` (as the README's FastAPI
routes do, for the caller's own jobs, with the caller's credential):

    POST /dev/chat                   {id: chatId, messages, ...} -> a demo.chat job, tagged chat:<id>
    GET  /dev/chat/{chat_id}/job     -> {id, token, links} of the chat's latest job, or 204
    POST /dev/chat/{chat_id}/cancel  -> 204, the chat's pending and running jobs cancelled
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jobstream.auth import Principal, require_user
from jobstream.errors import JobEnded, JobNotFound, ValidationFailed, pydantic_errors
from jobstream.models import JobStatus
from jobstream.routes._common import read_json
from jobstream.routes.jobs import links, request_cancel, start_job
from jobstream.services import Services, services
from jobstream.store import ListQuery

JOB_TYPE = "demo.chat"
TAG_PREFIX = "chat:"
#: A chat id: what may follow ``chat:`` in a tag (models.TAG_PATTERN).
CHAT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,122}$"
#: The most jobs of one chat a cancel looks at (a chat has one reply at a time).
MAX_CANCELLED = 100
_OPEN = (JobStatus.pending.value, JobStatus.running.value)
_CHAT_ID = re.compile(CHAT_ID_PATTERN)


class ChatRequest(BaseModel):
    """What the transport POSTs: the chat's id and UI messages (``trigger``, ``messageId`` and the
    rest are not needed here)."""

    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, Field(pattern=CHAT_ID_PATTERN)]
    messages: list[dict[str, JsonValue]] = Field(max_length=1000)


def _caller(request: Request) -> tuple[Services, Principal]:
    """404 (as for a path no route knows) unless the gateway runs `jobstream dev`; then the caller:
    401 without a credential, 403 for a read token."""
    svc = services(request)
    if svc.dev_key is None:
        raise HTTPException(404)
    principal = svc.auth.authenticate(request)
    require_user(principal)
    return svc, principal


def _chat_tag(request: Request) -> str:
    """The tag of the path's chat; 404 for what cannot be a chat id."""
    chat_id: str = request.path_params["chat_id"]
    if not _CHAT_ID.match(chat_id):
        raise JobNotFound("No such chat: a chat id is 1 to 123 letters, digits, '_', '.', ':' or '-'.")
    return TAG_PREFIX + chat_id


async def reply(request: Request) -> Response:
    """POST /dev/chat: a demo.chat job answering the messages, as POST /v1/jobs answers (201)."""
    svc, principal = _caller(request)
    raw = await read_json(request, svc.settings.max_body_bytes)
    try:
        chat = ChatRequest.model_validate(raw)
    except ValidationError as exc:
        raise ValidationFailed("The chat request is not valid.", errors=pydantic_errors(exc)) from None
    create: dict[str, Any] = {
        "type": JOB_TYPE,
        "input": {"messages": chat.messages},
        "tags": [TAG_PREFIX + chat.id],
    }
    body, headers = await start_job(svc, principal.user, create)
    return JSONResponse(body, status_code=201, headers={"Location": body["links"]["self"], **headers})


async def latest_job(request: Request) -> Response:
    """GET /dev/chat/{chat_id}/job: the chat's latest job with a read token, or 204."""
    svc, principal = _caller(request)
    tag = _chat_tag(request)
    jobs, _ = await svc.store.list_jobs(principal.user, ListQuery(limit=1, tag=tag))
    if not jobs:
        return Response(status_code=204, headers={"Cache-Control": "no-store"})
    job_id = jobs[0].id
    body = {"id": job_id, "token": svc.auth.issue_read_token(job_id, principal.user), "links": links(job_id)}
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


async def cancel(request: Request) -> Response:
    """POST /dev/chat/{chat_id}/cancel: the chat's pending and running jobs cancelled (204; one that
    has just ended, or was just deleted, is passed over)."""
    svc, principal = _caller(request)
    tag = _chat_tag(request)
    jobs, _ = await svc.store.list_jobs(principal.user, ListQuery(limit=MAX_CANCELLED, statuses=_OPEN, tag=tag))
    for job in jobs:
        try:
            await request_cancel(svc, job.id, principal.user)
        except (JobEnded, JobNotFound):
            pass
    return Response(status_code=204)
