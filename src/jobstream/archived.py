"""Jobs only the archive holds (API.md, "Archive"): what the routes fall back to when Redis has no
such job, so that readers get the same ids, rules and bodies wherever the job is kept.

Only ever asked after Redis answered "no such job": reads of jobs Redis holds never touch the
archive, so its being down costs them nothing. One archive query per request (``Archive.read``
brings a job's fields and its first page of events together); an archived job has ended, so its
readers never join the hub: its history is read a page at a time, then the stream closes.
An archived job past the archive's retention end is gone, as an expired job is in Redis.
The archive down or slow (``BoundedArchive``) is 503 with Retry-After, as Redis down is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NoReturn

from jobstream.archive import Archive, ArchivedRead, ArchiveError, Before
from jobstream.cursor import NEWEST, is_before
from jobstream.errors import ArchiveUnavailable, Forbidden, JobEnded, JobNotFound
from jobstream.hub import HISTORY_PAGE
from jobstream.registry import EXTERNAL
from jobstream.services import Services
from jobstream.store import NOT_EXTERNAL, NOT_YOURS, JobRead, JobRecord, Snapshot, StoredEvent, now_ms
from jobstream.subscription import JobGone

logger = logging.getLogger("jobstream.archived")


@contextmanager
def _asked() -> Iterator[None]:
    """Around an archive call of a request: its failure is the request's 503."""
    try:
        yield
    except ArchiveError as exc:
        logger.warning("archive unavailable: %s", exc)
        raise ArchiveUnavailable() from exc


def live(fields: Mapping[str, str]) -> bool:
    """Not past the archive's retention end (the sweep deletes such jobs only now and then)."""
    return int(fields.get("expires_ms") or 0) > now_ms()


async def find(svc: Services, job_id: str) -> JobRecord | None:
    """The archived job (every field, as Redis held them), or None."""
    if svc.archive is None:
        return None
    with _asked():
        found = await svc.archive.get(job_id)
    return JobRecord(found.fields) if found is not None and live(found.fields) else None


def snapshot_of(fields: Mapping[str, str]) -> Snapshot | None:
    """The snapshot an archived job keeps, as Redis gave it (scripts._SNAPSHOT): None when it keeps
    none; one that covers no event when it covers none yet or its text was not whole (the
    archive keeps the text as ``output_text`` only when whole, and leaves an empty one out)."""
    if "output_max" not in fields:
        return None
    text = fields.get("output_text")
    if text is None and int(fields.get("output_len") or 0) == 0:
        text = ""
    last_event_id = fields.get("output_id")
    if not last_event_id or text is None:
        return Snapshot(None, "", "null")
    return Snapshot(last_event_id, text, _progress(fields))


def _progress(fields: Mapping[str, str]) -> str:
    return fields.get("output_progress") or fields.get("progress") or "null"


async def find_with_output(svc: Services, job_id: str) -> tuple[JobRecord, Snapshot | None] | None:
    """``JobStore.get_with_output`` for an archived job."""
    job = await find(svc, job_id)
    return None if job is None else (job, snapshot_of(job.fields))


async def read_job(
    svc: Services, job_id: str, cursor: str | None, limit: int, *, snapshot: bool = False
) -> JobRead | None:
    """``JobStore.read_job`` for an archived job, in one archive query: where reading starts (``$``
    resolved, the trimmed check made), up to ``limit`` events from there; with ``snapshot`` (and
    no cursor), its snapshot if it keeps a usable one, and the events after it. None: not archived."""
    if svc.archive is None:
        return None
    newest = cursor == NEWEST
    with _asked():
        found = await svc.archive.read(
            job_id, None if newest else cursor, 0 if newest else limit, snapshot=snapshot and cursor is None
        )
    return _job_read(found, cursor) if found is not None and live(found.job.fields) else None


async def read_jobs(svc: Services, positions: Sequence[tuple[str, str | None]], limit: int) -> dict[str, JobRead]:
    """``read_job`` for several jobs (job id, cursor: a stream id or None) in one archive query:
    those archived, by id."""
    if svc.archive is None or not positions:
        return {}
    with _asked():
        found = await svc.archive.read_many(positions, limit)
    cursors = dict(positions)
    return {job_id: _job_read(read, cursors[job_id]) for job_id, read in found.items() if live(read.job.fields)}


def _job_read(found: ArchivedRead, cursor: str | None) -> JobRead:
    """As store._job_read builds a reader's job from Redis's answer (scripts.READ)."""
    fields = found.job.fields
    job = JobRecord(fields)
    kept = None
    if found.snapshot_id is not None:
        kept = Snapshot(found.snapshot_id, fields.get("output_text", ""), _progress(fields))
    start = kept.last_event_id if kept is not None else cursor
    if cursor == NEWEST:
        # An ended job's last event is its newest: nothing follows it.
        return JobRead(job, job.last_event_id or "0-0", None, [], None, archived=True)
    # The oldest event kept is told only when the job's stream was trimmed (scripts.READ).
    oldest = found.first_id if start is not None and fields.get("trimmed") == "1" else None
    first_kept = oldest if oldest and start and is_before(start, oldest) else None
    return JobRead(job, start or "0-0", first_kept, found.job.events, kept, archived=True)


async def pages(archive: Archive, positions: Mapping[str, str], limit: int) -> dict[str, list[StoredEvent]]:
    """The next page (at most ``limit``) of each archived job's history after its position, in one
    query: those the archive holds (raises ArchiveError, for a stream already under way)."""
    found = await archive.read_many(list(positions.items()), limit)
    return {job_id: read.job.events for job_id, read in found.items()}


async def list_owner(
    svc: Services,
    owner: str,
    statuses: Sequence[str],
    job_type: str | None,
    tag: str | None,
    before: Before | None,
    limit: int,
    let_go_by: int,
) -> list[JobRecord]:
    """A page of the owner's archived jobs, newest first (by creation, then id), before ``before``
    (None: from the newest), filtered: those Redis had let go by ``let_go_by`` (epoch ms) and not
    past the archive's retention."""
    if svc.archive is None:
        return []
    with _asked():
        found = await svc.archive.list_owner(
            owner,
            status=set(statuses) or None,
            type=job_type,
            tag=tag,
            before=before,
            limit=limit,
            let_go_by=let_go_by,
            alive_at=now_ms(),
        )
    return [JobRecord(job.fields) for job in found]


async def owners(svc: Services, job_ids: Sequence[str]) -> dict[str, str]:
    """The owners of those of the jobs the archive holds, in one query."""
    reads = await read_jobs(svc, [(job_id, None) for job_id in job_ids], 0)
    return {job_id: read.job.owner for job_id, read in reads.items()}


async def refuse_write(svc: Services, job_id: str, owner: str, *, external_only: bool = False) -> NoReturn:
    """A cancel or append Redis found no job for: 404 if the archive holds none either, 403 if it is
    another's, else 409 (it has ended), in the order the write scripts answer for a job Redis holds."""
    job = await find(svc, job_id)
    if job is None:
        raise JobNotFound()
    if job.owner != owner:
        raise Forbidden(NOT_YOURS)
    if external_only and job.type != EXTERNAL:
        raise JobEnded(NOT_EXTERNAL)
    raise JobEnded(f"The job has already ended ({job.status.value}).")


async def delete(svc: Services, job_id: str, owner: str) -> None:
    """DELETE of a job Redis does not hold: 404 if the archive holds none either, 403 if it is
    another's, else it is deleted from the archive."""
    job = await find(svc, job_id)
    if job is None:
        raise JobNotFound()
    if job.owner != owner:
        raise Forbidden(NOT_YOURS)
    await forget(svc, job_id)


async def forget(svc: Services, job_id: str) -> None:
    """Delete a job from the archive (Redis deleted it, or never held it any more); the archive
    down is 503, so that the client retries rather than the job coming back."""
    if svc.archive is None:
        return
    with _asked():
        await svc.archive.delete(job_id)


class ArchivedFollower:
    """A reader of a job only the archive holds (a ``feed.Follower``, without the hub: the job has
    ended, so nothing live follows it): its history a page at a time, then JobGone, which ends the
    stream (after its `done`, the stream has ended already). A failed page read raises
    ArchiveError: the stream ends with a retry hint, and the reader resumes from its last id."""

    __slots__ = ("_after", "_archive", "_ended", "_job_id", "_page", "_page_size")

    def __init__(self, archive: Archive, job_id: str, page_size: int = HISTORY_PAGE) -> None:
        self._archive = archive
        self._job_id = job_id
        self._page_size = page_size
        self._after = "0-0"
        self._page: list[StoredEvent] | None = None
        self._ended = False

    @property
    def joined(self) -> bool:
        return True  # nothing to join

    async def join(self) -> None:
        return None

    def start(self, after: str, page: list[StoredEvent] | None) -> None:
        """Read from ``after``; ``page``: the first page after it, of ``page_size`` at most, if read."""
        self._after = after
        self._page = page

    async def next(self) -> list[StoredEvent]:
        page, self._page = self._page, None
        if page is None:
            if self._ended:
                raise JobGone()
            page = await self._archive.events(self._job_id, self._after, self._page_size)
        if len(page) < self._page_size:
            self._ended = True
        if not page:
            raise JobGone()
        self._after = page[-1].id
        return page

    def idle(self) -> None:
        return None

    def close(self) -> None:
        self._ended = True
        self._page = None
