"""Job resources: create, status, cancel, append, delete. Thin endpoints over store, auth and limits."""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jobstream import archived, keys, metrics, sentry
from jobstream.auth import require_user
from jobstream.errors import (
    BadRequest,
    JobEnded,
    JobNotFound,
    NoSnapshot,
    ProblemError,
    RateLimited,
    ValidationFailed,
    pydantic_errors,
)
from jobstream.models import (
    DEFAULT_WEBHOOK_EVENTS,
    TERMINAL_EVENT,
    WEBHOOK_EVENTS,
    EventIn,
    JobCreate,
    JobStatus,
    to_json,
)
from jobstream.observability import job_transition
from jobstream.ratelimit import RateDecision
from jobstream.registry import EXTERNAL
from jobstream.routes._common import authenticate, authorize, check_job, load_job, read_json
from jobstream.services import Services, services
from jobstream.store import NOT_EXTERNAL, JobRecord, OutgoingEvent, done_event, now_ms
from jobstream.webhook_targets import TargetRefused, check_at_create

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
MAX_EVENTS_PER_APPEND = 1000
_events_adapter: TypeAdapter[EventIn | list[EventIn]] = TypeAdapter(EventIn | list[EventIn])


def links(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "poll": f"{base}/poll", "cancel": f"{base}/cancel"}


async def create_job(request: Request) -> Response:
    svc = services(request)
    principal = svc.auth.authenticate(request)
    require_user(principal)
    payload = _validate_create(svc, await read_json(request, svc.settings.max_body_bytes))
    webhook = await _webhook_of(svc, payload)
    idem_key = _idempotency_key(request, principal.user)
    fingerprint = _fingerprint(payload) if idem_key is not None else ""
    if idem_key is not None and (earlier := await svc.store.recall_idempotent(idem_key)) is not None:
        if (await svc.store.exist([earlier["body"]["id"]]))[0]:
            return _replay(earlier, fingerprint)
        # Its job was deleted: the key is free again, as if it had never been used.
        await svc.store.forget_idempotent(idem_key)

    decision = await _rate_limit(svc, principal.user)
    record, body = _new_job(svc, principal.user, payload, webhook)
    if idem_key is not None:
        ttl_s = payload.ttl or svc.settings.job_ttl_s
        earlier = await svc.store.remember_idempotent(idem_key, {"fingerprint": fingerprint, "body": body}, ttl_s)
        if earlier is not None:  # a concurrent retry won the race
            return _replay(earlier, fingerprint)
    try:
        await svc.store.create(record)
    except BaseException:
        if idem_key is not None:
            await svc.store.forget_idempotent(idem_key)
        raise
    _created(record.id, payload.type)
    headers = {"Location": body["links"]["self"], **decision.headers()}
    return JSONResponse(body, status_code=201, headers=headers)


async def start_job(svc: Services, user: str, raw: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """A job created for ``user`` from ``raw``, a create request's body, as POST /v1/jobs creates
    one (422 when not valid, 429 past the rate limit), without its Idempotency-Key: the create
    answer's body, and the rate limit's headers."""
    payload = _validate_create(svc, raw)
    webhook = await _webhook_of(svc, payload)
    decision = await _rate_limit(svc, user)
    record, body = _new_job(svc, user, payload, webhook)
    await svc.store.create(record)
    _created(record.id, payload.type)
    return body, decision.headers()


async def _rate_limit(svc: Services, user: str) -> RateDecision:
    decision = await svc.limiter.hit(user)
    if not decision.allowed:
        metrics.rate_limited.labels("create").inc()
        raise RateLimited("Too many jobs created; retry after the time in Retry-After.", headers=decision.headers())
    return decision


def _new_job(
    svc: Services, user: str, payload: JobCreate, webhook: tuple[str, list[str]]
) -> tuple[JobRecord, dict[str, Any]]:
    """The record of a new job of ``user``'s, and the body of its create answer."""
    job_id = str(uuid.uuid4())
    webhook_url, webhook_statuses = webhook
    record = JobRecord.new(
        job_id=job_id,
        owner=user,
        job_type=payload.type,
        input=payload.input,
        ttl_s=payload.ttl or svc.settings.job_ttl_s,
        tags=payload.tags,
        metadata=payload.metadata,
        output_max=svc.settings.snapshot_max_bytes,
        webhook_url=webhook_url,
        webhook_statuses=webhook_statuses,
        archived=svc.settings.archive_url is not None,
    )
    # The worker that runs the job continues this request's trace.
    record = JobRecord({**record.fields, **sentry.trace_fields()})
    body = {**record.created_view(), "token": svc.auth.issue_read_token(job_id, user), "links": links(job_id)}
    return record, body


def _created(job_id: str, job_type: str) -> None:
    metrics.jobs_created.labels(job_type).inc()
    job_transition("created", job_id, job_type=job_type)
    if job_type != EXTERNAL:
        job_transition("queued", job_id, job_type=job_type)


async def _webhook_of(svc: Services, payload: JobCreate) -> tuple[str, list[str]]:
    """The job's webhook URL ('' = the operator's) and the statuses it is told of (none: no
    webhook). A job's own URL must pass the target checks (webhook_targets.py): else 422."""
    if payload.webhook is None:
        if svc.settings.webhook_url is None:
            return "", []
        return "", [WEBHOOK_EVENTS[name].value for name in DEFAULT_WEBHOOK_EVENTS]
    try:
        url = await check_at_create(payload.webhook.url, svc.settings.webhook_allowed_hosts)
    except TargetRefused as exc:
        raise ValidationFailed(
            f"The webhook URL {exc}.", errors=[{"loc": ["webhook", "url"], "msg": str(exc)}]
        ) from None
    return url, [WEBHOOK_EVENTS[name].value for name in payload.webhook.events]


def _fingerprint(payload: JobCreate) -> str:
    """What a retried create with the same Idempotency-Key must repeat: its body, as validated."""
    return hashlib.sha256(to_json(payload.model_dump(mode="json")).encode()).hexdigest()


def _validate_create(svc: Services, raw: Any) -> JobCreate:
    try:
        payload = JobCreate.model_validate(raw)
    except ValidationError as exc:
        raise ValidationFailed("The job request is not valid.", errors=pydantic_errors(exc)) from None
    if not svc.registry.knows(payload.type):
        known = ", ".join([*svc.registry.names(), EXTERNAL])
        raise ValidationFailed(
            f"Unknown job type {payload.type[:128]!r}.",
            errors=[{"loc": ["type"], "msg": f"unknown job type; known types: {known}"}],
        )
    if payload.ttl is not None and payload.ttl > svc.settings.max_ttl_s:
        raise ValidationFailed(
            "The ttl is above the server's maximum.",
            errors=[{"loc": ["ttl"], "msg": f"must be at most {svc.settings.max_ttl_s}"}],
        )
    spec = svc.registry.get(payload.type)
    if spec is not None:
        spec.parse_input(payload.input)
    return payload


def _idempotency_key(request: Request, user: str) -> str | None:
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not _IDEMPOTENCY_KEY.match(value):
        raise BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters.")
    return keys.idempotency_key(user, value)


def _replay(earlier: dict[str, Any], fingerprint: str) -> Response:
    if earlier.get("fingerprint") != fingerprint:
        raise ValidationFailed(
            "This Idempotency-Key was used with a different request body.",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "reused with a different body"}],
        )
    body = earlier["body"]
    return JSONResponse(body, status_code=200, headers={"Location": body["links"]["self"]})


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _matches(if_none_match: str, etag: str) -> bool:
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


async def get_job(request: Request) -> Response:
    """One round trip; the status document is encoded once, and its ETag is a hash of those bytes."""
    if request.scope["query_string"] and "include" in request.query_params:
        return await _get_job_with_output(request)
    _, job = await load_job(request)
    return _status_document(request, job.view_json())


async def _get_job_with_output(request: Request) -> Response:
    """``?include=output``: the status document with the job's snapshot as ``output``, read in the
    same round trip. 409 for a job that keeps none (created with JOBSTREAM_SNAPSHOT_MAX_BYTES=0)."""
    job_id, principal = authenticate(request)
    if request.query_params.getlist("include") != ["output"]:
        await check_job(request, job_id, principal)  # 404 and 403 come before a bad query's 400
        raise BadRequest("Invalid query parameters.", errors=[{"loc": ["include"], "msg": "the one value is 'output'"}])
    svc = services(request)
    found = await svc.store.get_with_output(job_id) or await archived.find_with_output(svc, job_id)
    job = authorize(principal, found[0] if found else None)
    snapshot = found[1] if found else None
    if snapshot is None:
        raise NoSnapshot("This job keeps no snapshot of its output (snapshots were off when it was created).")
    body = job.view_json()[:-1] + b',"output":' + snapshot.output_json().encode() + b"}"
    return _status_document(request, body)


def _status_document(request: Request, body: bytes) -> Response:
    """The status document ``body`` with its ETag, or 304 when the client has that one."""
    etag = _etag(body)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, headers=headers, media_type="application/json")


async def cancel_job(request: Request) -> Response:
    """202 once the cancel is accepted, which is atomic in Redis: from then on the job can only end
    `cancelled`. A job no worker holds (pending, or external) ends at once; a running one when its
    worker stops it. 409 once the job has ended. One round trip: the cancel script checks that the
    job exists (404) and is the caller's (403) before it changes anything."""
    job_id, principal = authenticate(request, write=True)
    if principal.read_only:
        await check_job(request, job_id, principal, write=True)  # 404, else 403: a read token never cancels
    svc = services(request)
    try:
        await request_cancel(svc, job_id, principal.user)
    except JobNotFound:
        await archived.refuse_write(svc, job_id, principal.user)  # 404, 403, or 409: an archived job has ended
    return JSONResponse({"status": "cancelling"}, status_code=202)


async def request_cancel(svc: Services, job_id: str, owner: str) -> None:
    """Accept a cancel of ``owner``'s job (raises JobEnded once it has ended, JobNotFound if it is
    gone, Forbidden if it is not ``owner``'s)."""
    ended = await svc.store.request_cancel(job_id, owner=owner)
    if ended is not None:
        # Ended here, not by a worker: accounted here, as a worker accounts for the endings it writes.
        run_time_s = _run_time_s(ended.started_ms)
        metrics.job_ended(ended.job_type, job_id, JobStatus.cancelled.value, run_time_s, ending="cancelled_by_gateway")


def _run_time_s(started_ms: int | None) -> float:
    """How long the job has run, as of now: from its start (an external job's first event) when it
    started, else 0 (it ends without having started)."""
    return max(0, now_ms() - started_ms) / 1000 if started_ms else 0.0


async def append_events(request: Request) -> Response:
    """One round trip: the append script checks, in the API's order, that the job exists (404), is
    the caller's (403) and `external` (409), and has not ended (409), before it writes anything."""
    svc = services(request)
    job_id, principal = authenticate(request, write=True)
    if principal.read_only:
        await check_job(request, job_id, principal, write=True)  # 404, else 403: a read token never appends
    try:
        events = _validate_events(await read_json(request, svc.settings.max_body_bytes))
    except ProblemError:
        # A bad body (413, 415, 422) is answered after the job's own checks, as when it was read after them.
        if (await check_job(request, job_id, principal, write=True)).type != EXTERNAL:
            raise JobEnded(NOT_EXTERNAL) from None
        raise
    outgoing = [OutgoingEvent(event.type, to_json(event.data)) for event in events]
    try:
        appended = await svc.store.write(
            job_id, outgoing + _implied_done(events), owner=principal.user, external_only=True
        )
    except JobNotFound:
        await archived.refuse_write(svc, job_id, principal.user, external_only=True)
    if appended.status.terminal:  # this append ended it (one to a job already ended answers 409)
        metrics.job_ended(EXTERNAL, job_id, appended.status.value, _run_time_s(appended.started_ms), ending="external")
    return JSONResponse({"ids": appended.ids[: len(outgoing)]}, status_code=201)


def _validate_events(raw: Any) -> list[EventIn]:
    try:
        parsed = _events_adapter.validate_python(raw)
    except ValidationError as exc:
        raise ValidationFailed("The events are not valid.", errors=pydantic_errors(exc)) from None
    events = parsed if isinstance(parsed, list) else [parsed]
    if not 1 <= len(events) <= MAX_EVENTS_PER_APPEND:
        raise ValidationFailed(
            f"Send 1 to {MAX_EVENTS_PER_APPEND} events.", errors=[{"loc": ["body"], "msg": "wrong number of events"}]
        )
    for index, event in enumerate(events):
        if event.type == TERMINAL_EVENT and index != len(events) - 1:
            raise ValidationFailed(
                "'done' must be the last event.", errors=[{"loc": [index, "type"], "msg": "'done' must be last"}]
            )
    return events


def _implied_done(events: list[EventIn]) -> list[OutgoingEvent]:
    """A result or failure ends the job; add the `done` a producer left out, so readers see the end."""
    if events[-1].type == TERMINAL_EVENT:
        return []
    for event in reversed(events):
        if event.type == "result":
            return [done_event(JobStatus.completed)]
        if event.type == "failure":
            return [done_event(JobStatus.failed)]
    return []


async def delete_job(request: Request) -> Response:
    """One round trip: the delete script checks that the job exists (404) and is the caller's (403),
    and tells whether the archive holds it. With an archive: a job it holds ("1") is deleted from
    it too, and the archive down is 503 (the job would come back; the retry finds it only there); a
    job not yet archived needs no archive call (the archiver, finding it gone when it marks it,
    deletes what it stored). When Redis no longer holds the job, the archive answers 404 and 403."""
    job_id, principal = authenticate(request, write=True)
    if principal.read_only:
        await check_job(request, job_id, principal, write=True)  # 404, else 403: a read token never deletes
    svc = services(request)
    try:
        flag = await svc.store.delete(job_id, owner=principal.user)
    except JobNotFound:
        if svc.archive is None:
            raise
        await archived.delete(svc, job_id, principal.user)
    else:
        if flag == "1":
            await archived.forget(svc, job_id)
    return Response(status_code=204)
