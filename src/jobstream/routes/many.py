"""Many jobs on one connection: ``GET /v1/events`` (one SSE stream) and ``GET /v1/poll``.

A request names its jobs (``jobs=<id>,...``, at most 100) or a tag (``tag=``: the caller's jobs
with it, the newest 100, and on an event stream those created while it is open). Where each job
stands is one opaque cursor (multicursor.JobsCursor): every event's SSE ``id:``, every poll's
``cursor``. Each event is sent as the job's own type, its data wrapped with the job it belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.requests import Request
from starlette.responses import Response

from jobstream import archived, keys, metrics, sse
from jobstream.auth import Principal
from jobstream.cursor import parse_id
from jobstream.errors import ArchiveUnavailable, BadRequest, Forbidden, JobNotFound, RateLimited
from jobstream.hub import HISTORY_PAGE
from jobstream.jobgroup import Batch, JobGroup
from jobstream.models import TAG_PATTERN, to_json
from jobstream.multicursor import BadCursor, JobsCursor
from jobstream.ratelimit import ConnectionLeases
from jobstream.routes._common import is_job_id
from jobstream.routes.stream import SSE_HEADERS, EventStream, PollQuery, poll_query, wait_for_slot
from jobstream.sendwatch import EventStreamResponse
from jobstream.services import Services, services
from jobstream.store import NOT_YOURS, JobRead, StoredEvent, now_ms
from jobstream.subscription import HubClosed, SubscriberOverflow

#: Jobs one request follows at most: those listed, or a tag's newest.
MAX_JOBS = 100
_TAG = re.compile(TAG_PATTERN)
#: Events one poll reads of each job at most (a poll answers up to `limit` of all jobs together).
POLL_PAGE_PER_JOB = 100
#: History one step of a many-jobs stream reads of all its jobs together, and at least per job.
HISTORY_PER_STEP = 5000
MIN_PAGE_PER_JOB = 50
#: Events one write of a many-jobs stream carries at most (each frame's id is the whole cursor).
MAX_CHUNK_EVENTS = 1000


@dataclass(frozen=True, slots=True)
class Selection:
    """The jobs a request names: listed (in the given order, without duplicates), or by tag."""

    job_ids: tuple[str, ...] | None = None
    tag: str | None = None


@dataclass(slots=True)
class Opened:
    """The jobs a request follows, read: the first page of each (authorized), in the cursor's terms;
    of those the archive alone holds, those with more history than that page (id -> its last id)."""

    cursor: JobsCursor
    reads: dict[str, JobRead] = field(default_factory=dict)
    more_archived: dict[str, str] = field(default_factory=dict)
    #: Jobs the cursor names that only the archive, down now, could answer for: left as they stand.
    unresolved: set[str] = field(default_factory=set)


def selection(request: Request) -> Selection:
    params = request.query_params
    jobs, tag = params.get("jobs"), params.get("tag")
    if (jobs is None) == (tag is None):
        raise BadRequest("Name the jobs: either jobs=<id>,<id>,... or tag=<tag>.")
    if tag is not None:
        if not _TAG.match(tag):
            raise BadRequest(
                "Invalid query parameters.", errors=[{"loc": ["query", "tag"], "msg": f"must match {TAG_PATTERN}"}]
            )
        return Selection(tag=tag)
    assert jobs is not None
    job_ids = tuple(dict.fromkeys(part.strip() for part in jobs.split(",") if part.strip()))
    if not 1 <= len(job_ids) <= MAX_JOBS:
        raise BadRequest(
            "Invalid query parameters.", errors=[{"loc": ["query", "jobs"], "msg": f"list 1 to {MAX_JOBS} job ids"}]
        )
    return Selection(job_ids=job_ids)


def check_scope(principal: Principal, chosen: Selection) -> None:
    """A read token reads its own jobs or tag only: 403 for a request beyond them (a tag token
    listing jobs is checked job by job once they are read: each must carry the tag)."""
    if not principal.read_only:
        return
    if chosen.tag is not None:
        if principal.tag != chosen.tag:
            raise Forbidden("This read token does not cover that tag.")
    elif principal.tag is None:
        assert chosen.job_ids is not None
        if not all(principal.may_read_id(job_id) for job_id in chosen.job_ids):
            raise Forbidden("This read token does not cover every listed job.")


def parse_cursor(value: str | None, name: str) -> JobsCursor:
    if value is None or not value.strip():
        return JobsCursor()
    try:
        return JobsCursor.decode(value.strip())
    except BadCursor:
        raise BadRequest(
            "Invalid query parameters.",
            errors=[{"loc": [name], "msg": "not a cursor of this stream (send it as given)"}],
        ) from None


def all_done(chosen: Selection, cursor: JobsCursor) -> bool:
    """A `jobs=` reader's cursor has seen every listed job's end (`tag=` never ends)."""
    return chosen.job_ids is not None and all(cursor.is_done(job_id) for job_id in chosen.job_ids)


async def followed_ids(svc: Services, principal: Principal, chosen: Selection) -> list[str]:
    if chosen.job_ids is not None:
        return list(chosen.job_ids)
    assert chosen.tag is not None
    page = await svc.store.index.page(principal.user, now_ms=now_ms(), after_seq=None, limit=MAX_JOBS, tag=chosen.tag)
    return page.job_ids


async def open_jobs(
    svc: Services,
    principal: Principal,
    chosen: Selection,
    cursor: JobsCursor,
    job_ids: list[str],
    limit: int,
    group: JobGroup | None = None,
) -> Opened:
    """Read every job to follow (with ``group``, joined to the hub first, so that nothing falls
    between its history and its live events), in one round trip. With ``jobs=``, an unknown id not
    named by the cursor is 404, then another user's (or one the token does not cover) 403; jobs
    the cursor followed that are gone now are skipped (marked ended in the cursor). Listed jobs
    Redis has forgotten are read from the archive (one query for them all), and leave the group."""
    cursor.keep_only(job_ids)
    wanted = [job_id for job_id in job_ids if not cursor.is_done(job_id)]
    listed = chosen.job_ids is not None
    if listed and not all(is_job_id(job_id) for job_id in wanted if job_id not in cursor):
        raise JobNotFound("No such job (it may have expired): one of the listed ids.")
    wanted = [job_id for job_id in wanted if is_job_id(job_id)]
    if group is not None:
        await _join(group, {job_id: cursor.after(job_id) for job_id in wanted})
    positions = [(job_id, cursor.after(job_id) if job_id in cursor else None) for job_id in wanted]
    reads = await svc.store.read_jobs(positions, limit, reader=principal.user)
    unresolved: set[str] = set()
    if listed:  # (a tag's jobs are those of Redis's index: an archived job is not among them)
        reads, unresolved = await _archived_reads(svc, positions, reads, limit, cursor)
    opened = Opened(cursor, unresolved=unresolved)
    if listed and any(read is None and job_id not in cursor for job_id, read in zip(wanted, reads, strict=True)):
        raise JobNotFound("No such job (it may have expired): one of the listed ids.")
    if listed and any(read is not None and not principal.may_read(read.job) for read in reads):
        raise Forbidden(NOT_YOURS)
    for job_id, read in zip(wanted, reads, strict=True):
        _opened(opened, job_id, read if read is not None and principal.may_read(read.job) else None, limit, group)
    return opened


def _opened(opened: Opened, job_id: str, read: JobRead | None, limit: int, group: JobGroup | None) -> None:
    """One job read (None: gone, or not the reader's), taken into ``opened``."""
    cursor = opened.cursor
    if read is None or job_id in opened.unresolved:
        # Gone: skipped from now on. Unresolved (only the archive, down, could answer): its
        # position stays as it was, not ended, for a later request to read it.
        if job_id in cursor and job_id not in opened.unresolved:
            cursor.advance(job_id, cursor.after(job_id), done=True)
        if group is not None:
            group.remove(job_id)
        return
    opened.reads[job_id] = read
    if job_id not in cursor:
        cursor.advance(job_id, read.after)
    if read.archived:
        _opened_archived(opened, job_id, read, limit, group)


async def _archived_reads(
    svc: Services,
    positions: list[tuple[str, str | None]],
    reads: list[JobRead | None],
    limit: int,
    cursor: JobsCursor,
) -> tuple[list[JobRead | None], set[str]]:
    """``reads`` with those Redis found no job for read from the archive, in one query; and the ids
    left unresolved because the archive is down. Those the cursor names are left for a later
    request (the jobs Redis holds are answered all the same); a newly listed one is the 503."""
    missing = [position for position, read in zip(positions, reads, strict=True) if read is None]
    if not missing or svc.archive is None:
        return reads, set()
    try:
        found = await archived.read_jobs(svc, missing, limit)
    except ArchiveUnavailable:
        if any(job_id not in cursor for job_id, _ in missing):
            raise
        return reads, {job_id for job_id, _ in missing}
    return [read or found.get(job_id) for (job_id, _), read in zip(positions, reads, strict=True)], set()


def _opened_archived(opened: Opened, job_id: str, read: JobRead, limit: int, group: JobGroup | None) -> None:
    """An archived job, read: it has ended, so it leaves the hub at once (its history is read from
    the archive, page by page). Nothing after the cursor: marked ended, as a job gone is (its
    `done` was delivered, or the archive holds none to wait for)."""
    if group is not None:
        group.remove(job_id)
    if limit > 0 and not read.events:
        opened.cursor.advance(job_id, read.after, done=True)
    elif limit > 0 and len(read.events) >= limit:
        opened.more_archived[job_id] = read.events[-1].id


async def _join(group: JobGroup, positions: dict[str, str]) -> None:
    try:
        await group.add(positions)
    except (TimeoutError, HubClosed) as exc:
        # No live subscription to be had now: the reader retries (503 with Retry-After).
        raise RedisConnectionError("the hub could not follow the jobs in time") from exc


def stream_slots(svc: Services, principal: Principal, chosen: Selection) -> tuple[ConnectionLeases, str]:
    """One connection slot, as a single job's stream takes: the user's for a user credential; for a
    read token, one counted per what the token covers (its job, its jobs, its tag)."""
    if not principal.read_only:
        return svc.leases, principal.user
    if principal.job_id is not None:
        holder = principal.job_id
    elif principal.tag is not None:
        holder = keys.user_feed(principal.user, principal.tag)
    else:
        covered = ",".join(sorted(principal.job_ids or ()))
        holder = "jobs:" + hashlib.sha256(covered.encode()).hexdigest()[:32]
    return svc.leases.counted_by(keys.token_sse_leases_key, svc.settings.max_sse_per_token_job), holder


def frames(batch: Batch, cursor: JobsCursor) -> bytes:
    """Each event's frame, its SSE id the cursor once it is delivered: the id line is each
    reader's own, the rest of the frame the same for every many-jobs reader of the event (made
    once, kept on the event)."""
    out = []
    for job_id, event in batch:
        cursor.advance(job_id, event.id, done=event.is_done)
        wrapped = event.wrapped
        if wrapped is None:
            wrapped = event.wrapped = _wrapped(job_id, event)
        out.append(f"id: {cursor.encode()}\n{wrapped}")
    return "".join(out).encode()


def _wrapped(job_id: str, event: StoredEvent) -> str:
    """A many-jobs frame's lines after ``id:``. Types are lowercase words and ids stream ids; data
    holding a line break (never compact JSON) goes through sse.frame, which splits it safely."""
    data = f'{{"job_id":"{job_id}","id":"{event.id}","data":{event.data}}}'
    if "\n" in data or "\r" in data:
        return sse.frame("", event.type, data).decode().partition("\n")[2]
    return f"event: {event.type}\ndata: {data}\n\n"


# ---- GET /v1/events


async def stream_many(request: Request) -> Response:
    svc = services(request)
    principal = svc.auth.authenticate(request, allow_query_token=True)
    chosen = selection(request)
    check_scope(principal, chosen)
    header = request.headers.get("last-event-id")
    cursor = parse_cursor(
        header if header and header.strip() else request.query_params.get("last_event_id"), "last_event_id"
    )
    if all_done(chosen, cursor):
        return Response(status_code=204)  # the one answer that makes EventSource stop reconnecting
    group = JobGroup(svc.feed)
    handed_over = False
    try:
        if chosen.tag is not None and request.method != "HEAD":
            await _follow_feed(group, svc, principal, chosen, cursor)
        job_ids = await followed_ids(svc, principal, chosen)
        group.page_size = history_page(len(job_ids))
        if request.method == "HEAD":  # the checks only: nothing is followed, nothing read
            await open_jobs(svc, principal, chosen, cursor, job_ids, 0)
            status = 204 if all_done(chosen, cursor) else 200
            return Response(status_code=status, headers=SSE_HEADERS, media_type="text/event-stream")
        opened = await open_jobs(svc, principal, chosen, cursor, job_ids, group.page_size, group)
        if all_done(chosen, cursor):
            return Response(status_code=204)
        leases, holder = stream_slots(svc, principal, chosen)
        lease = await leases.acquire(holder)
        if lease is None:
            metrics.rate_limited.labels("sse").inc()
            raise RateLimited(
                f"At most {leases.limit} open event streams {'per read token' if principal.read_only else 'per user'}.",
                headers={"Retry-After": str(max(1, svc.settings.retry_ms // 1000))},
            )
        first = _first_chunk(group, opened)
        stream = ManyStream(svc, group, leases, holder, lease, cursor, chosen, first, opened)
        handed_over = True  # the stream's now
    finally:
        if not handed_over:
            group.close()
    return EventStreamResponse(stream, headers=SSE_HEADERS, watch=svc.send_watch)


def history_page(job_count: int) -> int:
    """Events of history read per job and step: a step reads every job that needs it, so with
    many jobs each gets a smaller share (one step's reads and the chunk they make stay bounded)."""
    return max(MIN_PAGE_PER_JOB, min(HISTORY_PAGE, HISTORY_PER_STEP // max(1, job_count)))


async def _follow_feed(
    group: JobGroup, svc: Services, principal: Principal, chosen: Selection, cursor: JobsCursor
) -> None:
    """Join the tag's feed of new jobs (before the tag's jobs are listed)."""
    assert chosen.tag is not None

    async def relist() -> dict[str, str]:
        job_ids = await followed_ids(svc, principal, chosen)
        return {job_id: cursor.after(job_id) for job_id in job_ids if not cursor.is_done(job_id)}

    try:
        await group.follow_feed(keys.user_feed(principal.user, chosen.tag), relist)
    except (TimeoutError, HubClosed) as exc:
        raise RedisConnectionError("the hub could not follow the tag in time") from exc


def _first_chunk(group: JobGroup, opened: Opened) -> tuple[bytes, Batch]:
    """Truncation notices (unnamed events: they move no cursor) and the first history pages."""
    notices = b"".join(
        sse.unnamed_frame("truncated", to_json({"job_id": job_id, "first_id": read.first_kept}))
        for job_id, read in opened.reads.items()
        if read.first_kept is not None
    )
    batch: Batch = []
    for job_id, read in opened.reads.items():
        batch += [(job_id, event) for event in read.events] if read.archived else group.start(job_id, read.events)
    return notices, batch


class ManyStream(EventStream):
    """The body of a many-jobs SSE response: as a single job's (head, pings, lease, lifetime,
    shutdown), its batches from a JobGroup, each event's id the whole cursor. A `jobs=` stream ends
    once every listed job has sent `done` or is gone; a `tag=` stream at its lifetime's end."""

    __slots__ = ("_archived", "_chosen", "_cursor", "_pending", "_unresolved")

    def __init__(
        self,
        svc: Services,
        group: JobGroup,
        leases: ConnectionLeases,
        holder: str,
        lease: str,
        cursor: JobsCursor,
        chosen: Selection,
        first: tuple[bytes, Batch],
        opened: Opened | None = None,
    ) -> None:
        notices, pending = first
        super().__init__(svc, "(many)", group, leases, holder, lease, sse.retry(svc.settings.retry_ms) + notices)
        self._cursor = cursor
        self._chosen = chosen
        self._pending = pending
        #: Archived jobs with history left to read: id -> the last id read (they are not in the group).
        self._archived = dict(opened.more_archived if opened else {})
        #: Jobs left for a later connection (the archive was down): they keep no stream open.
        self._unresolved = frozenset(opened.unresolved if opened else ())

    async def _next_chunk(self) -> tuple[bytes, bool] | None:
        group = cast_group(self._follower)
        batch = self._pending or await self._archived_pages(group.page_size)
        if not batch and self._chosen.job_ids is not None and not len(group):
            # The jobs left are archived ones read to their end: nothing more can come.
            return b"", True
        batch = batch or await group.next()
        batch, self._pending = batch[:MAX_CHUNK_EVENTS], batch[MAX_CHUNK_EVENTS:]
        for job_id in group.take_gone():
            self._cursor.advance(job_id, self._cursor.after(job_id), done=True)
        if not batch:
            return (b"", True) if self._ended() else None
        metrics.deliveries.sse += len(batch)
        self._written = batch[-1][1].id
        if self._chosen.tag is not None:
            self._make_room(group, {job_id for job_id, _ in batch if job_id not in self._cursor})
        chunk = frames(batch, self._cursor)
        return chunk, self._ended()

    def _ended(self) -> bool:
        """Every listed job has sent `done`, is gone, or is left for a later connection."""
        job_ids = self._chosen.job_ids
        return job_ids is not None and all(
            self._cursor.is_done(job_id) or job_id in self._unresolved for job_id in job_ids
        )

    async def _archived_pages(self, page_size: int) -> Batch:
        """The next page of each archived job with history left, in one archive query (a failure
        raises ArchiveError: the stream ends with a retry hint). A job the archive no longer holds
        is skipped from now on, as a job gone from Redis is."""
        positions = self._archived
        if not positions:
            return []
        assert self._svc.archive is not None
        pages = await archived.pages(self._svc.archive, positions, page_size)
        batch: Batch = []
        for job_id, after in list(positions.items()):
            page = pages.get(job_id)
            if page is None:
                self._cursor.advance(job_id, after, done=True)
            batch += [(job_id, event) for event in page or ()]
            if page is None or len(page) < page_size:
                del positions[job_id]
            else:
                positions[job_id] = page[-1].id
        return batch

    def _make_room(self, group: JobGroup, joining: set[str]) -> None:
        """Keep a tag's cursor bounded as jobs keep joining: past MAX_JOBS, the ended jobs that
        joined first leave it (and the group). A reconnect lists the tag's newest MAX_JOBS, which
        they are older than, so none is read again."""
        cursor = self._cursor
        excess = len(cursor) + len(joining) - MAX_JOBS
        for job_id in cursor.jobs():
            if excess <= 0:
                break
            if cursor.is_done(job_id):
                cursor.forget(job_id)
                group.remove(job_id)
                excess -= 1


def cast_group(follower: object) -> JobGroup:
    assert isinstance(follower, JobGroup)
    return follower


# ---- GET /v1/poll


async def poll_many(request: Request) -> Response:
    """One round trip for a short poll (the tag's index first with ``tag=``); a long-poll that
    finds nothing takes a long-poll slot and waits on the group of jobs."""
    svc = services(request)
    principal = svc.auth.authenticate(request, allow_query_token=True)
    chosen = selection(request)
    check_scope(principal, chosen)
    query = poll_query(request, svc.settings.poll_max_wait_s)
    cursor = parse_cursor(request.query_params.get("cursor"), "cursor")
    if all_done(chosen, cursor):
        return _poll_answer([], cursor, chosen)
    job_ids = await followed_ids(svc, principal, chosen)
    opened = await open_jobs(svc, principal, chosen, cursor, job_ids, min(query.limit, POLL_PAGE_PER_JOB))
    events = _merged(opened, min(query.limit, POLL_PAGE_PER_JOB), query.limit)
    if not events and query.wait > 0 and not all_done(chosen, cursor):
        metrics.polls.labels("long").inc()
        events = (await _wait_many(request, svc, principal, chosen, cursor, query))[: query.limit]
    else:
        metrics.polls.labels("short").inc()
    for job_id, event in events:
        cursor.advance(job_id, event.id, done=event.is_done)
    metrics.deliveries.poll += len(events)
    return _poll_answer(events, cursor, chosen, opened)


def _merged(opened: Opened, per_job: int, limit: int) -> Batch:
    """The jobs' events in id order, up to ``limit``: only up to the smallest last id of the jobs
    whose read was cut at ``per_job``, so that each job's events are a prefix of what is left."""
    horizon = min(
        (parse_id(read.events[-1].id) for read in opened.reads.values() if len(read.events) >= per_job),
        default=None,
    )
    events = [
        (job_id, event)
        for job_id, read in opened.reads.items()
        for event in read.events
        if horizon is None or parse_id(event.id) <= horizon
    ]
    events.sort(key=lambda item: parse_id(item[1].id))
    return events[:limit]


async def _wait_many(
    request: Request, svc: Services, principal: Principal, chosen: Selection, cursor: JobsCursor, query: PollQuery
) -> Batch:
    """A long-poll of many jobs: the first batch any of them has within ``wait`` (with ``tag=``,
    jobs created with the tag meanwhile included), holding one of the user's long-poll slots
    meanwhile, as a single job's long-poll does."""
    group = JobGroup(svc.feed, page_size=POLL_PAGE_PER_JOB)
    try:
        positions = {job_id: cursor.after(job_id) for job_id in cursor.jobs() if not cursor.is_done(job_id)}
        if chosen.tag is not None:
            await _follow_feed(group, svc, principal, chosen, cursor)
            # Listed again once the feed is joined: a job created since the poll's listing counts.
            positions = {job_id: cursor.after(job_id) for job_id in await followed_ids(svc, principal, chosen)}
            positions = {job_id: after for job_id, after in positions.items() if not cursor.is_done(job_id)}
        await _join(group, positions)
        return await wait_for_slot(request, svc, principal.user, _first_batch(group, query.wait))
    finally:
        group.close()


async def _first_batch(group: JobGroup, wait_s: float) -> Batch:
    """The group's first batch of events within ``wait_s`` ([] if none came, every job is gone,
    the reader fell behind or the gateway is shutting down: the next poll reads from Redis)."""
    with contextlib.suppress(TimeoutError, SubscriberOverflow, HubClosed):
        async with asyncio.timeout(wait_s):  # around futures and pipelined reads only
            while not (batch := await group.next()):
                if group.take_gone() and not len(group):
                    return []
            return batch
    return []


def _poll_answer(events: Batch, cursor: JobsCursor, chosen: Selection, opened: Opened | None = None) -> Response:
    """The answer, each event's stored JSON spliced in as is; with ``truncated`` (as a single job's
    poll has it) for the jobs whose resume point was trimmed away."""
    items = ",".join(
        f'{{"job_id":"{job_id}","id":"{event.id}","type":"{event.type}","data":{event.data}}}'
        for job_id, event in events
    )
    done = "true" if all_done(chosen, cursor) else "false"
    body = f'{{"events":[{items}],"cursor":"{cursor.encode()}","done":{done}'
    trimmed = [
        {"job_id": job_id, "first_id": read.first_kept}
        for job_id, read in (opened.reads.items() if opened else ())
        if read.first_kept is not None
    ]
    body += f',"truncated":{to_json(trimmed)}}}' if trimmed else "}"
    return Response(body.encode(), media_type="application/json", headers={"Cache-Control": "no-store"})
