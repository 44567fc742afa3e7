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


def _v2(kept_ms: str) -> tuple[str, ...]:
    """When Redis lets each job go (listing.py lists from the archive only jobs Redis had let go
    when the listing began), filled for rows stored before it from their ``kept_ms`` (``kept_ms``:
    that field of ``fields`` as SQL); and what the listing's filters walk, newest first: per status,
    per type, and per tag (the tags table carries its job's owner and creation, so that a tag's
    jobs are found without visiting the owner's others)."""
    return (
        "ALTER TABLE jobs ADD COLUMN redis_until_ms BIGINT NOT NULL DEFAULT 0",
        f"UPDATE jobs SET redis_until_ms = CAST({kept_ms} AS BIGINT) WHERE {kept_ms} IS NOT NULL",
        "CREATE INDEX jobs_owner_status_created ON jobs (owner, status, created_ms DESC, job_id DESC)",
        "CREATE INDEX jobs_owner_type_created ON jobs (owner, type, created_ms DESC, job_id DESC)",
        "ALTER TABLE job_tags ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE job_tags ADD COLUMN created_ms BIGINT NOT NULL DEFAULT 0",
        "UPDATE job_tags SET owner = (SELECT j.owner FROM jobs j WHERE j.job_id = job_tags.job_id),"
        " created_ms = (SELECT j.created_ms FROM jobs j WHERE j.job_id = job_tags.job_id)",
        "CREATE INDEX job_tags_owner_tag_created ON job_tags (owner, tag, created_ms DESC, job_id DESC)",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, {"sqlite": _v1(" WITHOUT ROWID"), "postgresql": _v1("")}),
    # The kept_ms digits, as stored (PostgreSQL finds them in the text: see queries._field).
    Migration(
        2,
        {
            "sqlite": _v2("json_extract(fields, '$.kept_ms')"),
            "postgresql": _v2('substring(fields from \'[{,]"kept_ms":"([0-9]{1,18})"\')'),
        },
    ),
)


def pending(current: int, dialect: Dialect) -> list[tuple[int, tuple[str, ...]]]:
    """The migrations after version ``current``, in order, as (version, statements)."""
    return [(m.version, m.statements[dialect]) for m in MIGRATIONS if m.version > current]
