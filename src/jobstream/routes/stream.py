"""Reading a job: server-sent events and polling, both resuming by the same cursor rules."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import sentry_sdk
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from jobstream import keys, metrics, sentry, sse
from jobstream.auth import Principal, possible_owner
from jobstream.cursor import NEWEST, is_before, resolve_cursor
from jobstream.errors import BadRequest, JobNotFound, RateLimited, pydantic_errors
from jobstream.models import JobStatus, to_json
from jobstream.ratelimit import ConnectionLeases
from jobstream.routes._common import authenticate, authorize, check_job
from jobstream.sendwatch import EventStreamResponse
from jobstream.services import Services, services
from jobstream.store import JobRead, JobRecord, StoredEvent
from jobstream.subscription import HubClosed, JobGone, SubscriberOverflow

logger = logging.getLogger("jobstream.stream")
SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}
RELEASE_TIMEOUT_S = 2.0
#: Events that move a job's status (their data is ``{"status": ...}``).
_STATUS_EVENTS = frozenset({"status", "done"})


def has_seen_end(job: JobRecord, cursor: str | None) -> bool:
    """True when the reader's cursor is at (or past) the job's final `done` event."""
    if not job.status.terminal or cursor is None or job.last_event_id is None:
        return False
    return cursor == NEWEST or not is_before(cursor, job.last_event_id)


async def read_job(svc: Services, principal: Principal, job_id: str, cursor: str | None, limit: int = 0) -> JobRead:
    """A reader's job in one round trip: its metadata, where reading starts (``$`` resolved, the
    trimmed check made) and, with ``limit``, the events from there; 404 if gone, then 403."""
    read = await svc.store.read_job(job_id, cursor, limit, reader=possible_owner(principal, job_id))
    if read is None:
        raise JobNotFound()
    authorize(principal, read.job)
    return read


async def stream_events(request: Request) -> Response:
    svc = services(request)
    job_id, principal = authenticate(request)
    try:
        cursor = resolve_cursor(request.headers.get("last-event-id"), request.query_params.get("last_event_id"))
    except BadRequest:
        await check_job(request, job_id, principal)  # 404 and 403 come before a bad id's 400
        raise
    read = await read_job(svc, principal, job_id, cursor)
    job = read.job
    if has_seen_end(job, cursor):
        # 204 is the one answer that makes EventSource stop reconnecting.
        return Response(status_code=204)
    if request.method == "HEAD":
        # Headers only: no stream starts, so no connection slot is taken.
        return Response(headers=SSE_HEADERS, media_type="text/event-stream")
    leases, holder = stream_slots(svc, principal, job.id)
    lease = await leases.acquire(holder)
    if lease is None:
        metrics.rate_limited.labels("sse").inc()
        whose = "per job for readers with its read token" if principal.read_only else "per user"
        raise RateLimited(
            f"At most {leases.limit} open event streams {whose}.",
            headers={"Retry-After": str(max(1, svc.settings.retry_ms // 1000))},
        )
    return EventStreamResponse(
        _frames(svc, job.id, leases, holder, lease, read.after, read.first_kept),
        headers=SSE_HEADERS,
        watch=svc.send_watch,
    )


def stream_slots(svc: Services, principal: Principal, job_id: str) -> tuple[ConnectionLeases, str]:
    """Whose connection slot an event stream takes: a reader with a job's read token takes one of
    that job's (JOBSTREAM_MAX_SSE_PER_TOKEN_JOB), so that a token shared with many readers cannot
    use up its owner's; a user's own credential takes one of the user's (JOBSTREAM_MAX_SSE_PER_USER)."""
    if principal.read_only:
        return svc.leases.counted_by(keys.token_sse_leases_key, svc.settings.max_sse_per_token_job), job_id
    return svc.leases, principal.user


async def _frames(
    svc: Services,
    job_id: str,
    leases: ConnectionLeases,
    holder: str,
    lease: str,
    after: str,
    first_kept: str | None,
) -> AsyncGenerator[bytes]:
    """The body of one SSE response: retry, history and live events, until `done`, deletion,
    the maximum lifetime or shutdown. Each batch is one write; idle streams ping on the hub's tick."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + svc.settings.sse_max_lifetime_s
    renew_every = leases.lease_s / 3
    next_renew = loop.time() + renew_every
    metrics.sse_open.inc()
    try:
        yield sse.retry(svc.settings.retry_ms)
        if first_kept is not None:
            yield sse.unnamed_frame("truncated", to_json({"first_id": first_kept}))
        # Set up (headers and retry written): the request's transaction ends here, however long
        # the job then stays silent.
        sentry.end_stream_transaction()
        async with contextlib.aclosing(svc.feed.follow(job_id, after)) as batches:
            async for batch in batches:
                if not batch:
                    yield sse.PING
                else:
                    chunk, finished = _encode_batch(batch)
                    metrics.deliveries.sse += len(batch)
                    yield chunk
                    metrics.lag.written(batch[-1].id, "sse")
                    if finished:
                        return
                now = loop.time()
                if now >= deadline or svc.shutdown.is_set():
                    return
                if now >= next_renew:
                    await leases.renew(holder, lease)
                    next_renew = now + renew_every
    except SubscriberOverflow:
        # Too far behind: close with a retry hint; the reader resumes from its last id, from Redis.
        yield sse.retry(svc.settings.retry_ms)
    except (JobGone, HubClosed):
        return
    except (RedisError, TimeoutError, OSError) as exc:
        # Redis is unreachable: the reader retries after the hint and resumes from its last id.
        logger.warning("event stream of job %s ended by a redis error: %s", job_id, type(exc).__name__)
        yield sse.retry(svc.settings.retry_ms)
    finally:
        metrics.sse_open.dec()
        await _release(leases, holder, lease)


async def _release(leases: ConnectionLeases, holder: str, lease: str) -> None:
    # Runs inside a cancelled scope when the client left: shield the release, bounded. If Redis is
    # down the lease lapses by itself.
    with anyio.move_on_after(RELEASE_TIMEOUT_S, shield=True), contextlib.suppress(RedisError, OSError):
        await leases.release(holder, lease)


def _encode_batch(batch: list[StoredEvent]) -> tuple[bytes, bool]:
    """Frames of a batch up to and including `done`, and whether `done` was among them."""
    for index, event in enumerate(batch):
        if event.is_done:
            return b"".join(e.frame for e in batch[: index + 1]), True
    return b"".join(event.frame for event in batch), False


class PollQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    after: str | None = None
    limit: int = Field(100, ge=1, le=1000)
    #: Bounded by the gateway's JOBSTREAM_POLL_MAX_WAIT_S, checked in `_poll_query`.
    wait: float = Field(0, ge=0)


def _poll_query(request: Request, max_wait_s: float) -> PollQuery:
    try:
        query = PollQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise BadRequest("Invalid query parameters.", errors=pydantic_errors(exc)) from None
    if query.wait > max_wait_s:
        raise BadRequest(
            "Invalid query parameters.", errors=[{"loc": ["wait"], "msg": f"must be at most {max_wait_s:g}"}]
        )
    return query


async def poll_events(request: Request) -> Response:
    """One round trip for a short poll, or a long-poll answered at once: the job, ``after=$``
    resolved, the trimmed check and the events together. A long-poll that waits takes a slot,
    waits, and (answered) tells the status its events leave the job in, without reading it again."""
    svc = services(request)
    job_id, principal = authenticate(request)
    try:
        query = _poll_query(request, svc.settings.poll_max_wait_s)
        cursor = resolve_cursor(None, query.after)
    except BadRequest:
        await check_job(request, job_id, principal)  # 404 and 403 come before a bad query's 400
        raise
    read = await read_job(svc, principal, job_id, cursor, query.limit)
    job, after, events = read.job, read.after, read.events
    status = job.status
    if not events and query.wait > 0 and not status.terminal:
        metrics.polls.labels("long").inc()
        # A span of its own: the wait is the client's choice, not the gateway's latency.
        with sentry_sdk.start_span(op="long_poll.wait", name="wait for events"):
            events = (await _wait_for_events(request, svc, principal.user, job_id, after, query.wait))[: query.limit]
        if events:
            metrics.lag.written(events[-1].id, "poll")
            # Every change of status is written with its event (`status`, `done`) in the same step.
            status = _status_after(status, events)
        else:
            # Nothing came: the job may have gone meanwhile (404), or ended.
            refreshed = await svc.store.get(job_id)
            if refreshed is None:
                raise JobNotFound()
            job, status = refreshed, refreshed.status
    else:
        metrics.polls.labels("short").inc()
    metrics.deliveries.poll += len(events)
    done = events[-1].is_done if events else has_seen_end(job, cursor)
    body = _poll_body(status, events, after, done, read.first_kept)
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


def _status_after(status: JobStatus, events: list[StoredEvent]) -> JobStatus:
    """The job's status once ``events`` are written, from ``status`` before them."""
    for event in events:
        if event.type in _STATUS_EVENTS:
            status = JobStatus(json.loads(event.data)["status"])
    return status


async def _wait_for_events(
    request: Request, svc: Services, user: str, job_id: str, after: str, wait_s: float
) -> list[StoredEvent]:
    """A long-poll's wait, holding one of the user's long-poll slots meanwhile: renewed while it
    waits, and freed as soon as the wait ends or its client hangs up."""
    lease = await svc.long_polls.acquire(user)
    if lease is None:
        metrics.rate_limited.labels("long_poll").inc()
        raise RateLimited(
            f"At most {svc.settings.max_long_polls_per_user} long-polls per user may wait at once.",
            headers={"Retry-After": "1"},
        )
    waiting = asyncio.create_task(svc.feed.wait(job_id, after, wait_s))
    gone = asyncio.create_task(_disconnect(request))
    try:
        while True:
            done, _ = await asyncio.wait(
                {waiting, gone}, timeout=svc.long_polls.lease_s / 3, return_when="FIRST_COMPLETED"
            )
            if waiting in done:
                return waiting.result()
            if gone in done:
                return []  # nobody left to answer
            await svc.long_polls.renew(user, lease)
    finally:
        _abandon(gone)
        _abandon(waiting)
        await _release(svc.long_polls, user, lease)


async def _disconnect(request: Request) -> None:
    """Returns when the client hangs up (a GET has no body: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _abandon(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` without waiting for it (a wait ends by its own deadline at the latest), and
    retrieve its outcome so that nothing is logged as never retrieved."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


def _poll_body(status: JobStatus, events: list[StoredEvent], after: str, done: bool, first_kept: str | None) -> bytes:
    """The poll answer, with each event's stored JSON spliced in as is rather than decoded and
    encoded again (ids are stream ids and types match a lowercase pattern: neither needs escaping)."""
    if done and events:
        status = JobStatus(json.loads(events[-1].data)["status"])
    items = ",".join(f'{{"id":"{e.id}","type":"{e.type}","data":{e.data}}}' for e in events)
    tail: dict[str, object] = {"next": events[-1].id if events else after, "status": status.value, "done": done}
    if first_kept is not None:
        tail["truncated"] = {"first_id": first_kept}
    return f'{{"events":[{items}],{to_json(tail)[1:]}'.encode()
