"""SQL and row shapes shared by the stores: one schema, so one way to read and write it.

Statements are written with ``{}`` where a parameter goes; each store fills in its own
placeholder style (``?`` for SQLite, ``$n`` for PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from jobstream.archive import ArchivedJob, ArchivedRead, Before, Dialect, Position
from jobstream.store import StoredEvent, now_ms

#: A placeholder for the n-th parameter (1-based).
Placeholder = Callable[[int], str]

UPSERT_JOB = (
    "INSERT INTO jobs (job_id, owner, status, type, created_ms, expires_ms, fields, redis_until_ms)"
    " VALUES ({}, {}, {}, {}, {}, {}, {}, {})"
    " ON CONFLICT (job_id) DO UPDATE SET owner = excluded.owner, status = excluded.status,"
    " type = excluded.type, created_ms = excluded.created_ms, expires_ms = excluded.expires_ms,"
    " fields = excluded.fields, redis_until_ms = excluded.redis_until_ms"
)
DELETE_TAGS = "DELETE FROM job_tags WHERE job_id = {}"
#: A tag carries its job's owner and creation: the listing's tag filter walks them (migrations v2).
INSERT_TAG = "INSERT INTO job_tags (job_id, tag, owner, created_ms) VALUES ({}, {}, {}, {}) ON CONFLICT DO NOTHING"
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
#: The largest integer either store keeps (BIGINT). A cursor beyond it reads as it: no stream id
#: comes near (its milliseconds would be 292 million years away).
MAX_BIGINT = 2**63 - 1


def fill(statement: str, placeholder: Placeholder) -> str:
    return statement.format(*(placeholder(n) for n in range(1, statement.count("{}") + 1)))


def split_id(event_id: str) -> tuple[int, int]:
    """A stream id "<ms>-<seq>" as integers, so that ids sort as Redis sorts them."""
    ms, sep, seq = event_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"expected a stream id '<ms>-<seq>', got {event_id!r}")
    return int(ms), int(seq)


def cursor_of(after: str | None) -> tuple[int, int]:
    """Where reading starts, as (ms, seq) to read after: (-1, -1) from the start; ids past what the
    stores hold clamped (the parser lets ids up to 2^64-1 through, as Redis does)."""
    if after is None:
        return -1, -1
    ms, seq = split_id(after)
    return (MAX_BIGINT, MAX_BIGINT) if ms > MAX_BIGINT else (ms, min(seq, MAX_BIGINT))


def job_row(job: ArchivedJob) -> tuple[str, str, str, str, int, int, str, int]:
    """The jobs table's columns for ``job``: the indexed ones, the whole hash as compact JSON (a
    flat object of strings, which ``_field`` relies on), and when Redis lets the job go."""
    return (
        job.id,
        job.owner,
        job.status,
        job.type,
        job.created_ms,
        job.expires_ms,
        json.dumps(job.fields, ensure_ascii=False, separators=(",", ":")),
        redis_until_ms(job.fields),
    )


def redis_until_ms(fields: Mapping[str, str]) -> int:
    """When Redis lets the job go, as far as the archive can know: its ``kept_ms``, or now if that
    has passed (the archiver marks the job, which drops it from Redis, right after storing it);
    0 when it has none (stored by an older archiver: counted as let go)."""
    kept = fields.get("kept_ms")
    if not kept or not kept.isdigit():
        return 0
    return min(max(int(kept), now_ms()), MAX_BIGINT)


def tag_rows(job: ArchivedJob) -> list[tuple[str, str, str, int]]:
    return [(job.id, tag, job.owner, job.created_ms) for tag in job.tags]


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
    let_go_by: int | None = None,
    alive_at: int | None = None,
) -> tuple[str, list[object]]:
    """The owner's jobs newest first (by created_ms, then job id), filtered; with ``let_go_by``,
    only those Redis had let go by then; with ``alive_at``, only those whose retention runs past it.

    Each filter walks an index in the listing's order and stops at ``limit`` (migrations v2): a tag
    walks job_tags (owner, tag, created_ms, job_id) and looks up each job; else each status its own
    (owner, status, ...) range, the ranges merged (a union of at most one per status); else a type
    its (owner, type, ...) range; else the owner's (owner, created_ms, job_id)."""
    args: list[object] = []

    def param(value: object) -> str:
        args.append(value)
        return placeholder(len(args))

    def branch(one_status: str | None) -> str:
        if tag is not None:
            source = f"job_tags t JOIN jobs j ON j.job_id = t.job_id WHERE t.owner = {param(owner)}"
            source += f" AND t.tag = {param(tag)}"
            order = "t.created_ms DESC, t.job_id DESC"
            key = "(t.created_ms, t.job_id)"
        else:
            source = f"jobs j WHERE j.owner = {param(owner)}"
            order = "j.created_ms DESC, j.job_id DESC"
            key = "(j.created_ms, j.job_id)"
        where = [source]
        if one_status is not None:
            where.append(f"j.status = {param(one_status)}")
        elif status:
            where.append(f"j.status IN ({', '.join(param(s) for s in sorted(status))})")
        if type is not None:
            where.append(f"j.type = {param(type)}")
        if let_go_by is not None:
            where.append(f"j.redis_until_ms <= {param(let_go_by)}")
        if alive_at is not None:
            where.append(f"j.expires_ms > {param(alive_at)}")
        if before is not None:
            where.append(f"{key} < ({param(before[0])}, {param(before[1])})")
        return (
            f"SELECT j.fields, j.created_ms, j.job_id FROM {' AND '.join(where)} ORDER BY {order} LIMIT {param(limit)}"
        )

    if tag is None and status and len(status) > 1:
        # One ordered range per status, merged: an IN over the status index would sort them all.
        parts = [f"SELECT * FROM ({branch(one)}) AS s{i}" for i, one in enumerate(sorted(status))]
        union = " UNION ALL ".join(parts)
        sql = f"SELECT fields FROM ({union}) AS u ORDER BY created_ms DESC, job_id DESC LIMIT {param(limit)}"
    else:
        sql = branch(None)  # its first column: the fields
    return sql, args


def _field(dialect: Dialect, name: str) -> str:
    """A field of the job's hash (column ``f``) as SQL text, NULL when absent. PostgreSQL's JSON
    functions refuse a document holding a \\u0000 anywhere (a job's input or text may), so there
    it is found in the text: ``job_row`` writes a flat object of strings, compactly, where a key
    is the one place a quote follows ``{`` or ``,`` (a quote inside a string is escaped). Only
    for fields whose values need no escaping (digits, stream ids)."""
    if dialect == "sqlite":
        return f"json_extract(f, '$.{name}')"
    return f'substring(f from \'[{{,]"{name}":"([^"]*)"\')'


def _has_field(dialect: Dialect, name: str) -> str:
    """Whether the hash has the field, without decoding its value (the snapshot's text may be large)."""
    if dialect == "sqlite":
        return f"json_type(f, '$.{name}') IS NOT NULL"
    return f"f ~ '[{{,]\"{name}\":'"


def _id_part(dialect: Dialect, expr: str, part: int) -> str:
    """The milliseconds (part 1) or sequence (part 2) of the stream id ``expr``, as an integer."""
    if dialect == "postgresql":
        return f"split_part({expr}, '-', {part})::bigint"
    if part == 1:
        return f"CAST(substr({expr}, 1, instr({expr}, '-') - 1) AS INTEGER)"
    return f"CAST(substr({expr}, instr({expr}, '-') + 1) AS INTEGER)"


def _snapshot_id(dialect: Dialect) -> str:
    """The id of the last event the job's snapshot covers, when it keeps one whose text is whole
    (as Redis reads it: scripts._SNAPSHOT; the archive keeps the text as ``output_text``, absent
    when it was not all there, or when it is empty), else NULL. Over ``f``, the fields as JSON."""
    return (
        f"CASE WHEN {_field(dialect, 'output_max')} IS NOT NULL"
        f" AND ({_has_field(dialect, 'output_text')} OR COALESCE({_field(dialect, 'output_len')}, '0') = '0')"
        f" THEN NULLIF({_field(dialect, 'output_id')}, '') END"
    )


def read_jobs(
    placeholder: Placeholder, dialect: Dialect, positions: Sequence[Position], limit: int, *, snapshot: bool = False
) -> tuple[str, list[object]]:
    """One statement for readers of jobs: a row per archived job (part 0: its id, its oldest
    event's ms and seq, its snapshot's id when asked for, its fields), then each job's events
    after its position (part 1: job id, ms, seq, type, data), at most ``limit`` each. With
    ``snapshot`` (one job only), its events start after its snapshot if it keeps a usable one."""
    if snapshot and len(positions) != 1:
        raise ValueError("a snapshot is read for one job at a time")
    args: list[object] = []

    def param(value: object) -> str:
        args.append(value)
        return placeholder(len(args))

    sql = ""
    if snapshot:
        sql = (
            f"WITH snap AS (SELECT {_snapshot_id(dialect)} AS id"
            f" FROM (SELECT fields AS f FROM jobs WHERE job_id = {param(positions[0][0])}) AS j) "
        )
    oldest = "FROM events e WHERE e.job_id = jobs.job_id ORDER BY e.ms, e.seq LIMIT 1"
    sql += (
        f"SELECT 0 AS part, job_id, (SELECT e.ms {oldest}) AS ms, (SELECT e.seq {oldest}) AS seq,"
        f" {'(SELECT id FROM snap)' if snapshot else 'CAST(NULL AS TEXT)'} AS type, fields AS data"
        f" FROM jobs WHERE job_id IN ({', '.join(param(job_id) for job_id, _ in positions)})"
    )
    if limit <= 0:
        return sql, args
    for index, (job_id, after) in enumerate(positions):
        ms, seq = cursor_of(after)
        branch = f"SELECT 1 AS part, job_id, ms, seq, type, data FROM events WHERE job_id = {param(job_id)}"
        if snapshot:
            # After the snapshot's id, if usable, else after the cursor.
            start_ms = f"COALESCE({_id_part(dialect, 'id', 1)}, {param(ms)})"
            start_seq = f"COALESCE({_id_part(dialect, 'id', 2)}, {param(seq)})"
            branch += f" AND (ms, seq) > (SELECT {start_ms}, {start_seq} FROM snap)"
        else:
            branch += f" AND (ms, seq) > ({param(ms)}, {param(seq)})"
        sql += f" UNION ALL SELECT * FROM ({branch} ORDER BY ms, seq LIMIT {param(limit)}) AS page{index}"
    return sql, args


def read_rows(rows: Iterable[Sequence[Any]]) -> dict[str, ArchivedRead]:
    """What ``read_jobs`` returned, by job id (events in stream id order, whatever order the
    branches of the union came back in)."""
    jobs: dict[str, tuple[str, str | None, str | None]] = {}
    events: dict[str, list[tuple[int, int, str, str]]] = {}
    for part, job_id, ms, seq, kind, data in rows:
        if part == 0:
            jobs[job_id] = (data, None if ms is None else f"{ms}-{seq}", kind)
        else:
            events.setdefault(job_id, []).append((ms, seq, kind, data))
    found: dict[str, ArchivedRead] = {}
    for job_id, (fields_json, first_id, snapshot_id) in jobs.items():
        page = [StoredEvent(f"{ms}-{seq}", kind, data) for ms, seq, kind, data in sorted(events.get(job_id, ()))]
        found[job_id] = ArchivedRead(ArchivedJob(json.loads(fields_json), page), first_id, snapshot_id)
    return found
