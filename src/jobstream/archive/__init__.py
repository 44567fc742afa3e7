"""The archive: where ended jobs are kept after Redis has forgotten them (API.md, "Archive").

``Archive`` is the seam, like ``feed.Feed``: one small protocol, one module per store
(``sqlite``: embedded, for `jobstream dev` and small deployments; ``postgres``: production).
``open_archive`` picks the store from ``JOBSTREAM_ARCHIVE_URL``; stores connect on first use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

from jobstream.store import StoredEvent

Dialect = Literal["sqlite", "postgresql"]
#: What ``list_owner`` pages by: (created_ms, job id) of the last job of the previous page.
Before = tuple[int, str]
#: Where a reader stands in one job: its id, and the stream id to read after (None: from the start).
Position = tuple[str, str | None]


class ArchiveError(Exception):
    """The archive cannot be reached or used; the message is one line, fit for an operator."""


@dataclass(frozen=True)
class ArchivedJob:
    """A job as archived: its metadata hash as Redis holds it (kept as given) and, when stored,
    its events (``data`` exactly as appended, so readers get the same bytes from either place).

    ``fields["expires_ms"]`` is the archive's retention end, set by the caller."""

    fields: dict[str, str]
    events: list[StoredEvent] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.fields["id"]

    @property
    def owner(self) -> str:
        return self.fields["owner"]

    @property
    def status(self) -> str:
        return self.fields["status"]

    @property
    def type(self) -> str:
        return self.fields["type"]

    @property
    def created_ms(self) -> int:
        return int(self.fields["created_ms"])

    @property
    def expires_ms(self) -> int:
        return int(self.fields["expires_ms"])

    @property
    def tags(self) -> list[str]:
        stored = self.fields.get("tags")
        return cast(list[str], json.loads(stored)) if stored else []


@dataclass(frozen=True)
class ArchivedRead:
    """A job as one reader's query found it: its fields, with ``events`` the page after where the
    reader starts (not every event); the oldest event the archive holds of it (None: none); and,
    when the reader asked for its snapshot, the id of the last event that snapshot covers (reading
    then started after it; None: it keeps no usable snapshot, and reading started at the cursor)."""

    job: ArchivedJob
    first_id: str | None = None
    snapshot_id: str | None = None


class Archive(Protocol):
    async def migrate(self) -> None:
        """Bring the schema to the newest version; idempotent, safe from several processes at once."""
        ...

    async def close(self) -> None: ...

    async def store(self, jobs: Sequence[ArchivedJob]) -> None:
        """Write jobs and their events in one transaction; a retried batch duplicates nothing."""
        ...

    async def get(self, job_id: str) -> ArchivedJob | None:
        """The job's metadata (no events), or None."""
        ...

    async def events(self, job_id: str, after: str | None, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` events after the stream id ``after`` (exclusive; None: from the start),
        in stream id order."""
        ...

    async def read(self, job_id: str, after: str | None, limit: int, *, snapshot: bool = False) -> ArchivedRead | None:
        """The job and up to ``limit`` of its events after ``after`` (None: from the start; with
        ``snapshot``, after the job's snapshot when it keeps a usable one), with its oldest event's
        id, in one statement; None if it is not archived."""
        ...

    async def read_many(self, positions: Sequence[Position], limit: int) -> dict[str, ArchivedRead]:
        """``read`` (without snapshots) for several jobs in one statement: those archived, by id."""
        ...

    async def delete(self, job_id: str) -> bool:
        """Remove the job and its events; False if it was not archived."""
        ...

    async def delete_expired(self, now_ms: int, batch: int) -> int:
        """Remove every job whose retention ended at ``now_ms``, ``batch`` jobs (with their events)
        per transaction, so that no transaction grows with the backlog; how many were removed."""
        ...

    async def list_owner(
        self,
        owner: str,
        *,
        status: set[str] | None = None,
        type: str | None = None,
        tag: str | None = None,
        before: Before | None = None,
        limit: int = 50,
        let_go_by: int | None = None,
        alive_at: int | None = None,
    ) -> list[ArchivedJob]:
        """The owner's jobs, newest first (by created_ms, then id), older than ``before`` if given;
        with ``let_go_by`` (epoch ms), only those Redis had let go by then (its ``kept_ms``; a job
        stored without one counts as let go); with ``alive_at``, only those whose archive
        retention ends after it."""
        ...


def parse_url(url: str) -> tuple[Dialect, str]:
    """The store and its address: a file path for SQLite, the URL itself for PostgreSQL."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != "/":
            return "sqlite", path
    elif url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    raise ValueError(f"expected sqlite:///<relative path>, sqlite:////<absolute path> or postgresql://..., got {url!r}")


def open_archive(url: str) -> Archive:
    """The store that ``url`` names (not yet connected: it connects on first use)."""
    dialect, address = parse_url(url)
    if dialect == "sqlite":
        from jobstream.archive.sqlite import SqliteArchive

        return SqliteArchive(address)
    from jobstream.archive.postgres import PostgresArchive

    return PostgresArchive(address)
