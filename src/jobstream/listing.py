"""``GET /v1/jobs`` across Redis and the archive: first the jobs Redis holds (its index, newest
first, as without an archive), then, once that index is exhausted, the jobs only the archive holds
(newest first by creation). A job both hold is listed once, from Redis. The opaque cursor says
which part the next page continues, and where.

Cursors: Redis's part is jobindex's (``j1:<seq>``), so a cursor given out before an archive was
configured still works; the archive's is ``a1:`` (its start) or ``a1:<created_ms>:<job id>`` (after
that job), in base64url as well.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from dataclasses import dataclass, replace

from jobstream import archived
from jobstream.archive import Before
from jobstream.errors import ArchiveUnavailable
from jobstream.jobindex import decode_cursor, encode_cursor
from jobstream.services import Services
from jobstream.store import JobRecord, ListQuery

logger = logging.getLogger("jobstream.listing")

#: Archive pages one listing reads at most when jobs Redis still holds (listed already) or jobs past
#: the archive's retention left a page short; past them the page answers with a cursor.
ARCHIVE_ROUNDS = 4
_ARCHIVE_CURSOR = re.compile(r"a1:(?:([0-9]{1,19}):([0-9a-f-]{36}))?")


@dataclass(frozen=True, slots=True)
class ListCursor:
    """Where a listing continues: in Redis's index after ``seq`` (None: from the newest), or, with
    ``in_archive``, in the archive before ``before`` (None: from its newest)."""

    seq: int | None = None
    in_archive: bool = False
    before: Before | None = None

    def encode(self) -> str:
        if not self.in_archive:
            assert self.seq is not None, "Redis's part continues after a sequence"
            return encode_cursor(self.seq)
        text = "a1:" if self.before is None else f"a1:{self.before[0]}:{self.before[1]}"
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> ListCursor:
        """A cursor a listing gave out; ValueError for anything else."""
        try:
            return cls(seq=decode_cursor(text))
        except ValueError:
            pass
        if not 1 <= len(text) <= 128:
            raise ValueError("bad cursor")
        try:
            plain = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ValueError("bad cursor") from None
        match = _ARCHIVE_CURSOR.fullmatch(plain)
        if match is None:
            raise ValueError("bad cursor")
        created_ms, job_id = match.groups()
        return cls(in_archive=True, before=None if job_id is None else (int(created_ms), job_id))


async def list_jobs(
    svc: Services, user: str, query: ListQuery, cursor: ListCursor
) -> tuple[list[JobRecord], ListCursor | None]:
    """A page of ``user``'s jobs that pass ``query`` (its ``after_seq`` aside: ``cursor`` says where),
    and the next page's cursor (None: no more)."""
    if cursor.in_archive:
        return await _archive_page(svc, user, query, cursor.before, query.limit)
    jobs, next_seq = await svc.store.list_jobs(user, replace(query, after_seq=cursor.seq))
    if next_seq is not None:
        return jobs, ListCursor(seq=next_seq)
    if svc.archive is None:
        return jobs, None
    try:
        # Redis's index is exhausted: the archive's jobs fill the page (or tell whether any follow).
        more, after = await _archive_page(svc, user, query, None, query.limit - len(jobs))
    except ArchiveUnavailable:
        if not jobs:
            raise
        # The jobs Redis holds are listed all the same; the archive's follow on the next page.
        return jobs, ListCursor(in_archive=True)
    return jobs + more, after


async def _archive_page(
    svc: Services, user: str, query: ListQuery, before: Before | None, limit: int
) -> tuple[list[JobRecord], ListCursor | None]:
    """Up to ``limit`` of the jobs only the archive holds, newest first, after ``before``; and the
    cursor after the last one when more follow. Each archive page asks for one job more than is
    missing, to know whether more follow; jobs Redis still holds (one round trip to know) and jobs
    past the archive's retention are passed over."""
    taken: list[JobRecord] = []
    for _ in range(ARCHIVE_ROUNDS):
        asked = limit - len(taken) + 1
        rows = await archived.list_owner(svc, user, query.statuses, query.job_type, query.tag, before, asked)
        held = await svc.store.exist([job.id for job in rows]) if rows else []
        for job, in_redis in zip(rows, held, strict=True):
            if in_redis or not archived.live(job.fields):
                continue
            if len(taken) == limit:
                return taken, ListCursor(in_archive=True, before=_key(taken[-1]) if taken else before)
            taken.append(job)
        if len(rows) < asked:
            return taken, None
        before = _key(rows[-1])
    return taken, ListCursor(in_archive=True, before=before)


def _key(job: JobRecord) -> Before:
    return int(job.fields["created_ms"]), job.id
