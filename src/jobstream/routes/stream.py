"""Reading a job: server-sent events and polling, both resuming by the same cursor rules."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import anyio
import sentry_sdk
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from jobstream import archived, keys, metrics, sentry, sse, uimessage
from jobstream.archive import ArchiveError
from jobstream.auth import Principal, possible_owner
from jobstream.cursor import NEWEST, is_before, resolve_cursor
from jobstream.errors import BadRequest, JobNotFound, RateLimited, pydantic_errors
from jobstream.feed import Follower
from jobstream.hub import HISTORY_PAGE
from jobstream.jobgroup import JobGroup
from jobstream.models import JobStatus, to_json
from jobstream.ratelimit import ConnectionLeases
from jobstream.routes._common import authenticate, authorize, check_job
from jobstream.sendwatch import EventStreamResponse
from jobstream.services import Services, services
from jobstream.store import JobRead, JobRecord, StoredEvent
from jobstream.subscription import HubClosed, JobGone, SubscriberOverflow
from jobstream.uimessage import UIMessageRenderer

logger = logging.getLogger("jobstream.stream")
SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}
RELEASE_TIMEOUT_S = 2.0
#: Events that move a job's status (their data is ``{"status": ...}``).
_STATUS_EVENTS = frozenset({"status", "done"})
T = TypeVar("T")


def has_seen_end(job: JobRecord, cursor: str | None) -> bool:
    """True when the reader's cursor is at (or past) the job's final `done` event."""
    if not job.status.terminal or cursor is None or job.last_event_id is None:
        return False
    return cursor == NEWEST or not is_before(cursor, job.last_event_id)


async def read_job(
    svc: Services, principal: Principal, job_id: str, cursor: str | None, limit: int = 0, *, snapshot: bool = False
) -> JobRead:
    """A reader's job in one round trip: its metadata, where reading starts (``$`` resolved, the
    trimmed check made) and, with ``limit``, the events from there; with ``snapshot`` (and no
    cursor), its snapshot, if it keeps one, and the events after it; 404 if gone, then 403.
    A job Redis has forgotten is read from the archive, in one query (``read.archived``)."""
    reader = possible_owner(principal, job_id)
    read = await svc.store.read_job(job_id, cursor, limit, reader=reader, snapshot=snapshot and cursor is None)
    if read is None:
        read = await archived.read_job(svc, job_id, cursor, limit, snapshot=snapshot)
    if read is None:
        raise JobNotFound()
    authorize(principal, read.job)
    return read


async def stream_events(request: Request) -> Response:
    svc = services(request)
    job_id, principal = authenticate(request)
    try:
        cursor = resolve_cursor(request.headers.get("last-event-id"), request.query_params.get("last_event_id"))
        snapshot = "snapshot" in request.query_params and _query(SnapshotQuery, request).snapshot
        renderer = _renderer(request.query_params.get("format"))
    except BadRequest:
        await check_job(request, job_id, principal)  # 404 and 403 come before a bad id's 400
        raise
    # The reader joins the hub before the job is read, so that the read's round trip brings the
    # first page of history too (gap-free: events published from here on reach the follower).
    follower: Follower | None = None if request.method == "HEAD" else await _joined(svc, job_id, cursor)
    try:
        page = HISTORY_PAGE if follower and follower.joined else 0
        # HEAD answers headers only: no snapshot to read for it.
        read = await read_job(svc, principal, job_id, cursor, page, snapshot=snapshot and follower is not None)
        if read.archived and follower is not None:
            # Ended, and kept by the archive alone: nothing live to follow, so out of the hub at once.
            follower.close()
            assert svc.archive is not None
            follower = archived.ArchivedFollower(svc.archive, job_id)
        job = read.job
        if has_seen_end(job, cursor):
            # 204 is the one answer that makes EventSource stop reconnecting.
            return Response(status_code=204)
        headers = SSE_HEADERS if renderer is None else {**SSE_HEADERS, **uimessage.HEADERS}
        if follower is None:
            # Headers only: no stream starts, so no connection slot is taken.
            return Response(headers=headers, media_type="text/event-stream")
        leases, holder = stream_slots(svc, principal, job.id)
        lease = await leases.acquire(holder)
        if lease is None:
            metrics.rate_limited.labels("sse").inc()
            whose = "per job for readers with its read token" if principal.read_only else "per user"
            raise RateLimited(
                f"At most {leases.limit} open event streams {whose}.",
                headers={"Retry-After": str(max(1, svc.settings.retry_ms // 1000))},
            )
        # An authorized reader owns the job, so the read brought its events (see possible_owner).
        # (Read with no page when the hub could not be joined: the follower reads it itself.)
        follower.start(read.after, read.events if page else None)
        head = _head(svc, read) if renderer is None else _ui_head(svc, read, renderer, cursor)
        stream = EventStream(svc, job.id, follower, leases, holder, lease, head, renderer)
        follower = None  # the stream's now
    finally:
        if follower is not None:
            follower.close()
    return EventStreamResponse(stream, headers=headers, watch=svc.send_watch)


def _renderer(format: str | None) -> UIMessageRenderer | None:
    """The stream's rendering: jobstream's own events (no ``format``), or an AI SDK UI message stream."""
    if format is None:
        return None
    if format == uimessage.FORMAT:
        return UIMessageRenderer()
    raise BadRequest(
        "Invalid query parameters.", errors=[{"loc": ["format"], "msg": f"must be '{uimessage.FORMAT}' or absent"}]
    )


class SnapshotQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    #: Start with the job's snapshot (``1``, ``true``, ...: a boolean as pydantic reads one), unless
    #: a resume point is given.
    snapshot: bool = False


_Query = TypeVar("_Query", bound=BaseModel)


def _query(model: type[_Query], request: Request) -> _Query:
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise BadRequest("Invalid query parameters.", errors=pydantic_errors(exc)) from None


def _head(svc: Services, read: JobRead) -> bytes:
    """What a stream opens with: the retry hint, the reader's snapshot, and the truncation notice
    (of events after the snapshot, when it starts from one)."""
    head = sse.retry(svc.settings.retry_ms)
    if read.snapshot is not None:
        head += read.snapshot.event(read.job.status).frame
    if read.first_kept is not None:
        head += sse.unnamed_frame("truncated", to_json({"first_id": read.first_kept}))
    return head


def _ui_head(svc: Services, read: JobRead, renderer: UIMessageRenderer, cursor: str | None) -> bytes:
    """``_head`` as a UI message stream: the retry hint, `start` when read from the job's start,
    its snapshot's text and the truncation notice as chunks."""
    head = sse.retry(svc.settings.retry_ms)
    if cursor is None:
        head += renderer.start(read.job.id)
    if read.snapshot is not None:
        head += renderer.event(read.snapshot.event(read.job.status))
    if read.first_kept is not None:
        head += renderer.notice("truncated", {"first_id": read.first_kept})
    return head


async def _joined(svc: Services, job_id: str, cursor: str | None) -> Follower:
    """A follower of the job, joined to the hub if the hub can say so now; if not (no link to
    Redis, shutting down, a join that timed out), the stream joins once its headers are out and
    ends there as it always has (a retry hint, or nothing on shutdown)."""
    follower = svc.feed.follower(job_id, cursor or "0-0")
    with contextlib.suppress(RedisError, TimeoutError, OSError, HubClosed):
        await follower.join()
    return follower


def stream_slots(svc: Services, principal: Principal, job_id: str) -> tuple[ConnectionLeases, str]:
    """Whose connection slot an event stream takes: a reader with a job's read token takes one of
    that job's (JOBSTREAM_MAX_SSE_PER_TOKEN_JOB), so that a token shared with many readers cannot
    use up its owner's; a user's own credential takes one of the user's (JOBSTREAM_MAX_SSE_PER_USER)."""
    if principal.read_only:
        return svc.leases.counted_by(keys.token_sse_leases_key, svc.settings.max_sse_per_token_job), job_id
    return svc.leases, principal.user


_HEAD, _SET_UP, _OPEN, _ENDED = 0, 1, 2, 3


class EventStream:
    """The body of one SSE response, as an async iterator of chunks: retry (and a truncation
    notice), history and live events, until `done`, deletion, the maximum lifetime or shutdown.
    Each batch is one write; idle streams ping on the hub's tick; the lease is renewed meanwhile
    and released by ``aclose``.

    A slotted object rather than an async generator: thousands are open at once, and a generator
    keeps its frame (every local), a ``weakref`` in the loop's registry and an ``aclosing``
    wrapper; while idle this one is suspended in its follower's wait alone.
    """

    __slots__ = (
        "_deadline",
        "_follower",
        "_head",
        "_holder",
        "_job_id",
        "_lease",
        "_leases",
        "_next_renew",
        "_renderer",
        "_state",
        "_svc",
        "_written",
    )

    def __init__(
        self,
        svc: Services,
        job_id: str,
        follower: Follower | JobGroup,
        leases: ConnectionLeases,
        holder: str,
        lease: str,
        head: bytes,
        renderer: UIMessageRenderer | None = None,
    ) -> None:
        self._svc = svc
        #: None: jobstream's own events; else how they are rendered (an AI SDK UI message stream).
        self._renderer = renderer
        #: A single job's follower, or a group of jobs' (ManyStream).
        self._follower = follower
        self._job_id = job_id
        self._leases = leases
        self._holder = holder
        self._lease = lease
        self._head: bytes | None = head
        self._state = _HEAD
        self._deadline = 0.0
        self._next_renew = 0.0
        #: The last event id of the chunk last handed out, for the lag metric once it is written.
        self._written: str | None = None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> bytes:
        state = self._state
        if state == _HEAD:
            return self._start()
        if self._written is not None:  # the last chunk is written
            metrics.lag.written(self._written, "sse")
            self._written = None
        if state == _ENDED:
            raise StopAsyncIteration
        if state == _SET_UP:
            # Set up (headers and retry written): the request's transaction ends here, however
            # long the job then stays silent.
            sentry.end_stream_transaction()
            self._state = _OPEN
        try:
            await self._between_chunks()
            if self._state == _ENDED:
                raise StopAsyncIteration
            produced = await self._next_chunk()
        except SubscriberOverflow:
            # Too far behind: close with a retry hint; the reader resumes from its last id, from Redis.
            return self._last(sse.retry(self._svc.settings.retry_ms))
        except (JobGone, HubClosed):
            self._state = _ENDED
            raise StopAsyncIteration from None
        except (RedisError, TimeoutError, OSError, ArchiveError) as exc:
            # Redis (or, for an archived job, the archive) is unreachable: the reader retries after
            # the hint and resumes from its last id.
            logger.warning("event stream of job %s ended by a store's error: %s", self._job_id, type(exc).__name__)
            return self._last(sse.retry(self._svc.settings.retry_ms))
        if produced is None:
            return sse.PING
        chunk, finished = produced
        if finished:
            self._state = _ENDED
        return chunk

    async def _next_chunk(self) -> tuple[bytes, bool] | None:
        """The next batch's frames and whether they end the stream; None for a heartbeat tick."""
        follower = cast(Follower, self._follower)
        while (idle := follower.idle()) is not None:
            await idle
        batch = await follower.next()
        if not batch:
            return None
        metrics.deliveries.sse += len(batch)
        self._written = batch[-1].id
        return _encode_batch(batch) if self._renderer is None else self._renderer.encode(batch)

    def _start(self) -> bytes:
        now = asyncio.get_running_loop().time()
        self._deadline = now + self._svc.settings.sse_max_lifetime_s
        self._next_renew = now + self._leases.lease_s / 3
        metrics.sse_open.inc()
        self._state = _SET_UP
        head, self._head = self._head, None
        assert head is not None
        return head

    def _last(self, chunk: bytes) -> bytes:
        self._state = _ENDED
        return chunk

    async def _between_chunks(self) -> None:
        """After a chunk was written: the lifetime, shutdown and the lease's renewal."""
        now = asyncio.get_running_loop().time()
        if now >= self._deadline or self._svc.shutdown.is_set():
            self._state = _ENDED
            return
        if now >= self._next_renew:
            await self._leases.renew(self._holder, self._lease)
            self._next_renew = now + self._leases.lease_s / 3

    async def aclose(self) -> None:
        """Leave the hub and release the connection slot (once)."""
        self._state = _ENDED
        lease = self._lease
        if not lease:
            return
        self._lease = ""
        if self._head is None:  # started
            metrics.sse_open.dec()
        self._follower.close()
        await _release(self._leases, self._holder, lease)


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


class PollQuery(SnapshotQuery):
    after: str | None = None
    limit: int = Field(100, ge=1, le=1000)
    #: Bounded by the gateway's JOBSTREAM_POLL_MAX_WAIT_S, checked in `poll_query`.
    wait: float = Field(0, ge=0)


def poll_query(request: Request, max_wait_s: float) -> PollQuery:
    query = _query(PollQuery, request)
    if query.wait > max_wait_s:
        raise BadRequest(
            "Invalid query parameters.", errors=[{"loc": ["wait"], "msg": f"must be at most {max_wait_s:g}"}]
        )
    return query


async def poll_events(request: Request) -> Response:
    """One round trip for a short poll, or a long-poll answered at once: the job, ``after=$``
    resolved, the trimmed check and the events (after the snapshot, with one) together. A long-poll
    that waits takes a slot, waits, and (answered) tells the status its events leave the job in,
    without reading it again."""
    svc = services(request)
    job_id, principal = authenticate(request)
    try:
        query = poll_query(request, svc.settings.poll_max_wait_s)
        cursor = resolve_cursor(None, query.after)
    except BadRequest:
        await check_job(request, job_id, principal)  # 404 and 403 come before a bad query's 400
        raise
    read = await read_job(svc, principal, job_id, cursor, query.limit, snapshot=query.snapshot)
    job, after, events = read.job, read.after, read.events
    if read.snapshot is not None:
        # The answer's first event, one of its limit.
        events = [read.snapshot.event(job.status), *events[: query.limit - 1]]
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
    """A long-poll's wait for one job's events (see ``wait_for_slot``)."""
    return await wait_for_slot(request, svc, user, svc.feed.wait(job_id, after, wait_s))


async def wait_for_slot(request: Request, svc: Services, user: str, wait: Coroutine[Any, Any, list[T]]) -> list[T]:
    """A long-poll's ``wait`` (which ends by its own deadline), holding one of the user's long-poll
    slots meanwhile: renewed while it waits, and freed as soon as the wait ends or its client
    hangs up (then: [])."""
    lease = await svc.long_polls.acquire(user)
    if lease is None:
        wait.close()
        metrics.rate_limited.labels("long_poll").inc()
        raise RateLimited(
            f"At most {svc.settings.max_long_polls_per_user} long-polls per user may wait at once.",
            headers={"Retry-After": "1"},
        )
    waiting = asyncio.create_task(wait)
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
