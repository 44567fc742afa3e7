"""The archive's schema, versioned: both stores apply the same list, in order, once each.

A migration is never edited once released; a change is a new version. Each version holds its
statements per dialect (the same tables; SQLite keeps the composite-key tables WITHOUT ROWID).
Stream ids are kept as two integers (ms, seq) so that they sort as Redis sorts them; the job's
hash and each event's data stay TEXT (not jsonb), so the bytes read back are the bytes stored."""

from __future__ import annotations

from dataclasses import dataclass

from jobstream.archive import Dialect

#: Created by each store before the migrations, in the same transaction.
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)"


@dataclass(frozen=True)
class Migration:
    version: int
    statements: dict[Dialect, tuple[str, ...]]


def _v1(without_rowid: str) -> tuple[str, ...]:
    return (
        "CREATE TABLE jobs ("
        " job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, type TEXT NOT NULL,"
        " created_ms BIGINT NOT NULL, expires_ms BIGINT NOT NULL, fields TEXT NOT NULL)",
        "CREATE INDEX jobs_owner_created ON jobs (owner, created_ms DESC, job_id DESC)",
        "CREATE INDEX jobs_expires ON jobs (expires_ms)",
        "CREATE TABLE job_tags (job_id TEXT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (job_id, tag))" + without_rowid,
        "CREATE INDEX job_tags_tag ON job_tags (tag, job_id)",
        "CREATE TABLE events ("
        " job_id TEXT NOT NULL, ms BIGINT NOT NULL, seq BIGINT NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL,"
        " PRIMARY KEY (job_id, ms, seq))" + without_rowid,
    )


MIGRATIONS: tuple[Migration, ...] = (Migration(1, {"sqlite": _v1(" WITHOUT ROWID"), "postgresql": _v1("")}),)


def pending(current: int, dialect: Dialect) -> list[tuple[int, tuple[str, ...]]]:
    """The migrations after version ``current``, in order, as (version, statements)."""
    return [(m.version, m.statements[dialect]) for m in MIGRATIONS if m.version > current]
