"""``GET /v1/jobs`` across Redis and the archive: first the jobs Redis holds (its index, newest
first, as without an archive), then, once that index is exhausted, the archive's jobs that Redis
had let go when the listing began (newest first by creation).

``as_of``, the time the listing's first page was asked for, is taken before Redis is read and
carried in every cursor: the archive's part lists only jobs whose ``redis_until_ms`` (when Redis
lets them go: their ``kept_ms``) is at most ``as_of``, and Redis's part, read at ``as_of`` or
later, only jobs Redis still holds then. So no job is listed twice, and pages are full while more
match (no job is looked up in Redis to be passed over). A job Redis lets go after ``as_of`` but
before the Redis page that would have listed it is listed by neither part (it is in the next
listing): the listing never repeats a job, and misses only such a job.

Cursors (base64url): Redis's part is ``l2:<as_of>:<seq>``; the archive's ``a2:<as_of>`` (its
start) or ``a2:<as_of>:<created_ms>:<job id>`` (after that job). Cursors given out before (Redis's
``j1:<seq>``, also given without an archive; the archive's ``a1:...``) still work, as of the page
they ask for.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, replace

from jobstream import archived
from jobstream.archive import Before
from jobstream.archive.queries import MAX_BIGINT
from jobstream.errors import ArchiveUnavailable
from jobstream.jobindex import decode_cursor, encode_cursor
from jobstream.services import Services
from jobstream.store import JobRecord, ListQuery, now_ms

_NUMBER = "([0-9]{1,19})"
_AFTER = f"(?::{_NUMBER}:([0-9a-f-]{{36}}))?"
_REDIS_CURSOR = re.compile(f"l2:{_NUMBER}:([0-9]{{1,18}})")
_ARCHIVE_CURSOR = re.compile(f"a2:{_NUMBER}{_AFTER}")
_OLD_ARCHIVE_CURSOR = re.compile(f"a1:(?:{_NUMBER}:([0-9a-f-]{{36}}))?")


@dataclass(frozen=True, slots=True)
class ListCursor:
    """Where a listing continues: in Redis's index after ``seq`` (None: from the newest), or, with
    ``in_archive``, in the archive before ``before`` (None: from its newest); ``as_of``: when the
    listing began (None: at this page; always None without an archive)."""

    seq: int | None = None
    in_archive: bool = False
    before: Before | None = None
    as_of: int | None = None

    def encode(self) -> str:
        if not self.in_archive:
            assert self.seq is not None, "Redis's part continues after a sequence"
            if self.as_of is None:
                return encode_cursor(self.seq)
            text = f"l2:{self.as_of}:{self.seq}"
        else:
            assert self.as_of is not None, "the archive's part is as of the listing's start"
            text = f"a2:{self.as_of}" + ("" if self.before is None else f":{self.before[0]}:{self.before[1]}")
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> ListCursor:
        """A cursor a listing gave out; ValueError for anything else (numbers the stores cannot
        hold included: no listing gave them out)."""
        try:
            return cls(seq=decode_cursor(text))
        except ValueError:
            pass
        if not 1 <= len(text) <= 160:
            raise ValueError("bad cursor")
        try:
            plain = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ValueError("bad cursor") from None
        if match := _REDIS_CURSOR.fullmatch(plain):
            as_of, seq = (_bigint(part) for part in match.groups())
            return cls(seq=seq, as_of=as_of)
        if match := _ARCHIVE_CURSOR.fullmatch(plain):
            as_of_digits, created_ms, job_id = match.groups()
            return cls(in_archive=True, before=_before(created_ms, job_id), as_of=_bigint(as_of_digits))
        if match := _OLD_ARCHIVE_CURSOR.fullmatch(plain):
            created_ms, job_id = match.groups()
            return cls(in_archive=True, before=_before(created_ms, job_id))
        raise ValueError("bad cursor")


def _bigint(digits: str) -> int:
    value = int(digits)
    if value > MAX_BIGINT:
        raise ValueError("bad cursor")
    return value


def _before(created_ms: str | None, job_id: str | None) -> Before | None:
    return None if created_ms is None or job_id is None else (_bigint(created_ms), job_id)


async def list_jobs(
    svc: Services, user: str, query: ListQuery, cursor: ListCursor
) -> tuple[list[JobRecord], ListCursor | None]:
    """A page of ``user``'s jobs that pass ``query`` (its ``after_seq`` aside: ``cursor`` says where),
    and the next page's cursor (None: no more)."""
    if svc.archive is None:
        jobs, next_seq = await svc.store.list_jobs(user, replace(query, after_seq=cursor.seq))
        return jobs, None if next_seq is None else ListCursor(seq=next_seq)
    # Taken before Redis is read: a job Redis held then is listed from Redis, or not at all.
    as_of = now_ms() if cursor.as_of is None else cursor.as_of
    if cursor.in_archive:
        return await _archive_page(svc, user, query, as_of, cursor.before, query.limit)
    jobs, next_seq = await svc.store.list_jobs(user, replace(query, after_seq=cursor.seq))
    if next_seq is not None:
        return jobs, ListCursor(seq=next_seq, as_of=as_of)
    try:
        # Redis's index is exhausted: the archive's jobs fill the page (or tell whether any follow).
        more, after = await _archive_page(svc, user, query, as_of, None, query.limit - len(jobs))
    except ArchiveUnavailable:
        if not jobs:
            raise
        # The jobs Redis holds are listed all the same; the archive's follow on the next page.
        return jobs, ListCursor(in_archive=True, as_of=as_of)
    return jobs + more, after


async def _archive_page(
    svc: Services, user: str, query: ListQuery, as_of: int, before: Before | None, limit: int
) -> tuple[list[JobRecord], ListCursor | None]:
    """Up to ``limit`` of the jobs Redis had let go by ``as_of``, newest first, after ``before``;
    and the cursor after the last one when more follow (one job more is asked for, to know)."""
    rows = await archived.list_owner(svc, user, query.statuses, query.job_type, query.tag, before, limit + 1, as_of)
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, ListCursor(in_archive=True, before=_key(page[-1]) if page else before, as_of=as_of)


def _key(job: JobRecord) -> Before:
    return int(job.fields["created_ms"]), job.id
