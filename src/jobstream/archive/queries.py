"""SQL and row shapes shared by the stores: one schema, so one way to read and write it.

Statements are written with ``{}`` where a parameter goes; each store fills in its own
placeholder style (``?`` for SQLite, ``$n`` for PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import cast

from jobstream.archive import ArchivedJob, Before

#: A placeholder for the n-th parameter (1-based).
Placeholder = Callable[[int], str]

UPSERT_JOB = (
    "INSERT INTO jobs (job_id, owner, status, type, created_ms, expires_ms, fields)"
    " VALUES ({}, {}, {}, {}, {}, {}, {})"
    " ON CONFLICT (job_id) DO UPDATE SET owner = excluded.owner, status = excluded.status,"
    " type = excluded.type, created_ms = excluded.created_ms, expires_ms = excluded.expires_ms,"
    " fields = excluded.fields"
)
DELETE_TAGS = "DELETE FROM job_tags WHERE job_id = {}"
INSERT_TAG = "INSERT INTO job_tags (job_id, tag) VALUES ({}, {}) ON CONFLICT DO NOTHING"
INSERT_EVENT = "INSERT INTO events (job_id, ms, seq, type, data) VALUES ({}, {}, {}, {}, {}) ON CONFLICT DO NOTHING"
GET_JOB = "SELECT fields FROM jobs WHERE job_id = {}"
#: Events after (ms, seq); the first page passes (-1, -1).
EVENTS = "SELECT ms, seq, type, data FROM events WHERE job_id = {} AND (ms, seq) > ({}, {}) ORDER BY ms, seq LIMIT {}"
#: A job's rows, events and tags first (PostgreSQL deletes many at once with ANY, in its module).
DELETE_JOB = (
    "DELETE FROM events WHERE job_id = {}",
    "DELETE FROM job_tags WHERE job_id = {}",
    "DELETE FROM jobs WHERE job_id = {}",
)
EXPIRED = "SELECT job_id FROM jobs WHERE expires_ms <= {} ORDER BY expires_ms LIMIT {}"


def fill(statement: str, placeholder: Placeholder) -> str:
    return statement.format(*(placeholder(n) for n in range(1, statement.count("{}") + 1)))


def split_id(event_id: str) -> tuple[int, int]:
    """A stream id "<ms>-<seq>" as integers, so that ids sort as Redis sorts them."""
    ms, sep, seq = event_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"expected a stream id '<ms>-<seq>', got {event_id!r}")
    return int(ms), int(seq)


def job_row(job: ArchivedJob) -> tuple[str, str, str, str, int, int, str]:
    """The jobs table's columns for ``job``: the indexed ones, then the whole hash as JSON."""
    return (
        job.id,
        job.owner,
        job.status,
        job.type,
        job.created_ms,
        job.expires_ms,
        json.dumps(job.fields, ensure_ascii=False, separators=(",", ":")),
    )


def from_fields(fields_json: str) -> ArchivedJob:
    return ArchivedJob(cast(dict[str, str], json.loads(fields_json)))


def list_owner(
    placeholder: Placeholder,
    owner: str,
    *,
    status: set[str] | None,
    type: str | None,
    tag: str | None,
    before: Before | None,
    limit: int,
) -> tuple[str, list[object]]:
    """The owner's jobs newest first, filtered: walks the (owner, created_ms, job_id) index."""
    args: list[object] = [owner]
    where = [f"owner = {placeholder(1)}"]

    def param(value: object) -> str:
        args.append(value)
        return placeholder(len(args))

    if status:
        where.append(f"status IN ({', '.join(param(s) for s in sorted(status))})")
    if type is not None:
        where.append(f"type = {param(type)}")
    if tag is not None:
        where.append(f"EXISTS (SELECT 1 FROM job_tags t WHERE t.job_id = jobs.job_id AND t.tag = {param(tag)})")
    if before is not None:
        where.append(f"(created_ms, job_id) < ({param(before[0])}, {param(before[1])})")
    sql = (
        f"SELECT fields FROM jobs WHERE {' AND '.join(where)}"
        f" ORDER BY created_ms DESC, job_id DESC LIMIT {param(limit)}"
    )
    return sql, args
