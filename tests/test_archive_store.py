"""The archive's stores (SQLite file, real PostgreSQL) behind one protocol: schema migrations,
idempotent batches, events in stream id order with their bytes kept, listing, deletion, retention;
and `jobstream archive migrate` as an operator runs it."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from jobstream.archive import Archive, ArchivedJob, open_archive, parse_url, queries
from jobstream.devredis import free_port
from jobstream.settings import SettingsError, load_settings
from jobstream.store import StoredEvent
from tests.helpers import clean_env, wait_until_async

Scenario = Callable[[Archive], Awaitable[None]]


def run(url: str, scenario: Scenario) -> None:
    async def main() -> None:
        archive = open_archive(url)
        try:
            await archive.migrate()
            await scenario(archive)
        finally:
            await archive.close()

    asyncio.run(main())


def job(
    job_id: str,
    *,
    owner: str = "alice",
    status: str = "completed",
    type: str = "test.echo",
    created_ms: int = 1_000,
    expires_ms: int = 10_000,
    tags: str | None = None,
    events: list[StoredEvent] | None = None,
    **extra: str,
) -> ArchivedJob:
    fields = {
        "id": job_id,
        "owner": owner,
        "status": status,
        "type": type,
        "created_ms": str(created_ms),
        "expires_ms": str(expires_ms),
        **extra,
    }
    if tags is not None:
        fields["tags"] = tags
    return ArchivedJob(fields, events or [])


def ids(events: list[StoredEvent]) -> list[str]:
    return [event.id for event in events]


def schema_versions(url: str) -> list[int]:
    dialect, address = parse_url(url)
    if dialect == "sqlite":
        with sqlite3.connect(address) as db:
            return [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY version")]

    async def read() -> list[int]:
        conn = await asyncpg.connect(address)
        try:
            return [row[0] for row in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]
        finally:
            await conn.close()

    return asyncio.run(read())


def test_migrate_whenRunTwiceAndByTwoConnectionsAtOnce_thenEachVersionAppliesOnce(archive_url: str) -> None:
    async def scenario() -> None:
        first, second = open_archive(archive_url), open_archive(archive_url)
        try:
            await asyncio.gather(first.migrate(), second.migrate())
            await first.migrate()
            await second.store([job("j1")])
            assert (await first.get("j1")) == job("j1")
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())
    assert schema_versions(archive_url) == [1, 2]


def test_store_whenRead_thenFieldsComeBackExactlyAsGiven(archive_url: str) -> None:
    given = job(
        "j-ü",
        owner="ålice ✓",
        tags='["chat:1","b"]',
        input='{"prompt":"héllo \\u00e9 \\"quoted\\"","n":[1, 2]}',
        metadata='{"k": "v"}',
        note="line\nbreak\ttab 🎉",
    )

    async def scenario(archive: Archive) -> None:
        await archive.store([given])
        got = await archive.get("j-ü")
        assert got is not None and got.fields == given.fields and got.events == []
        assert (got.id, got.owner, got.status, got.type) == ("j-ü", "ålice ✓", "completed", "test.echo")
        assert (got.created_ms, got.expires_ms, got.tags) == (1_000, 10_000, ["chat:1", "b"])
        assert await archive.get("missing") is None

    run(archive_url, scenario)


def test_events_whenIdsDifferInDigits_thenNumericStreamOrderWithAfterExclusiveAndLimit(archive_url: str) -> None:
    unordered = ["10-0", "5-10", "9-0", "5-2", "100-1", "5-0"]
    events = [StoredEvent(event_id, "delta", f'{{"text":"{event_id}"}}') for event_id in unordered]

    async def scenario(archive: Archive) -> None:
        await archive.store([job("j1", events=events)])
        assert ids(await archive.events("j1", None, 100)) == ["5-0", "5-2", "5-10", "9-0", "10-0", "100-1"]
        assert ids(await archive.events("j1", "5-2", 2)) == ["5-10", "9-0"]
        assert ids(await archive.events("j1", "9-0", 100)) == ["10-0", "100-1"]
        assert ids(await archive.events("j1", "5-3", 1)) == ["5-10"]
        assert await archive.events("j1", "100-1", 10) == []
        assert await archive.events("other", None, 10) == []
        assert (await archive.events("j1", "9-0", 1))[0] == StoredEvent("10-0", "delta", '{"text":"10-0"}')

    run(archive_url, scenario)


def test_store_whenABatchIsRetried_thenNothingIsStoredTwice(archive_url: str) -> None:
    first = [StoredEvent("1-0", "delta", '{"text":"a"}'), StoredEvent("2-0", "done", '{"status":"completed"}')]
    batch = [job("j1", tags='["x"]', events=first), job("j2", created_ms=2_000)]

    async def scenario(archive: Archive) -> None:
        await archive.store(batch)
        await archive.store(batch)
        # A retry that overlaps what is stored, and a job whose status changed since.
        await archive.store(
            [job("j1", status="failed", tags='["x"]', events=[*first, StoredEvent("3-0", "log", "{}")])]
        )
        assert ids(await archive.events("j1", None, 100)) == ["1-0", "2-0", "3-0"]
        assert [j.id for j in await archive.list_owner("alice")] == ["j2", "j1"]
        assert [j.id for j in await archive.list_owner("alice", tag="x")] == ["j1"]
        stored = await archive.get("j1")
        assert stored is not None and stored.status == "failed"

    run(archive_url, scenario)


def test_events_whenDataHasOddSpacingAndUnicode_thenItComesBackByteForByte(archive_url: str) -> None:
    odd = '{"a": 1,  "b":"é"}'
    escaped = '{"b":"\\u00e9",   "c" : [ ]}'

    async def scenario(archive: Archive) -> None:
        await archive.store([job("j1", events=[StoredEvent("1-0", "result", odd), StoredEvent("1-1", "x", escaped)])])
        got = await archive.events("j1", None, 10)
        assert [event.data for event in got] == [odd, escaped]
        assert got[0].data.encode() == odd.encode()

    run(archive_url, scenario)


def test_listOwner_whenFiltered_thenNewestFirstWithStatusTypeTagAndLimit(archive_url: str) -> None:
    jobs = [
        job("a", created_ms=1_000, status="completed", type="t.one", tags='["red","blue"]'),
        job("b", created_ms=3_000, status="failed", type="t.two", tags='["red"]'),
        job("c", created_ms=2_000, status="cancelled", type="t.one"),
        job("d", created_ms=3_000, status="completed", type="t.one", tags='["blue"]'),
        job("e", created_ms=9_000, owner="bob", tags='["red"]'),
    ]

    async def scenario(archive: Archive) -> None:
        await archive.store(jobs)

        async def listed(**filters: object) -> list[str]:
            return [j.id for j in await archive.list_owner("alice", **filters)]  # type: ignore[arg-type]

        assert await listed() == ["d", "b", "c", "a"]
        assert await listed(limit=2) == ["d", "b"]
        assert await listed(before=(3_000, "b"), limit=2) == ["c", "a"]
        assert await listed(status={"completed", "cancelled"}) == ["d", "c", "a"]
        assert await listed(type="t.one") == ["d", "c", "a"]
        assert await listed(tag="red") == ["b", "a"]
        assert await listed(tag="blue", status={"completed"}, type="t.one", limit=1) == ["d"]
        assert await listed(tag="green") == []
        assert [j.id for j in await archive.list_owner("bob")] == ["e"]
        assert [j.id for j in await archive.list_owner("nobody")] == []

    run(archive_url, scenario)


def test_delete_whenJobIsArchived_thenItAndItsEventsAreGone(archive_url: str) -> None:
    async def scenario(archive: Archive) -> None:
        events = [StoredEvent("1-0", "delta", "{}")]
        await archive.store([job("j1", tags='["t"]', events=events), job("j2", events=events)])
        assert await archive.delete("j1") is True
        assert await archive.delete("j1") is False
        assert await archive.get("j1") is None and await archive.events("j1", None, 10) == []
        assert await archive.list_owner("alice", tag="t") == []
        assert ids(await archive.events("j2", None, 10)) == ["1-0"]

    run(archive_url, scenario)


def test_deleteExpired_whenManyExpired_thenRemovedInBatchesAndUnexpiredStay(archive_url: str) -> None:
    async def scenario(archive: Archive) -> None:
        expired = [job(f"old{i}", expires_ms=100 + i, events=[StoredEvent("1-0", "x", "{}")]) for i in range(7)]
        await archive.store([*expired, job("edge", expires_ms=500), job("new", expires_ms=501)])
        assert await archive.delete_expired(500, 3) == 8
        assert await archive.delete_expired(500, 3) == 0
        assert [j.id for j in await archive.list_owner("alice")] == ["new"]
        assert await archive.events("old0", None, 10) == []

    run(archive_url, scenario)


def test_openArchive_whenUrlsGiven_thenStoreAndAddressOrOneLineError() -> None:
    assert parse_url("sqlite:///data/archive.db") == ("sqlite", "data/archive.db")
    assert parse_url("sqlite:////var/lib/jobstream/archive.db") == ("sqlite", "/var/lib/jobstream/archive.db")
    assert parse_url("postgresql://u:p@db:5432/js") == ("postgresql", "postgresql://u:p@db:5432/js")
    assert parse_url("postgres://db/js") == ("postgresql", "postgres://db/js")
    assert type(open_archive("sqlite:///a.db")).__name__ == "SqliteArchive"
    assert type(open_archive("postgres://db/js")).__name__ == "PostgresArchive"
    for bad in ("mysql://db/js", "sqlite://a.db", "sqlite:///", "archive.db", ""):
        with pytest.raises(ValueError, match="expected sqlite:///") as caught:
            open_archive(bad)
        assert "\n" not in str(caught.value)


def test_settings_whenArchiveConfigured_thenUrlSchemeAndRetentionAreChecked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBSTREAM_ARCHIVE_URL", "sqlite:///archive.db")
    monkeypatch.setenv("JOBSTREAM_ARCHIVE_RETENTION_DAYS", "0.5")
    settings = load_settings()
    assert (settings.archive_url, settings.archive_retention_days) == ("sqlite:///archive.db", 0.5)
    monkeypatch.setenv("JOBSTREAM_ARCHIVE_URL", "mysql://db")
    with pytest.raises(SettingsError, match="JOBSTREAM_ARCHIVE_URL"):
        load_settings()
    monkeypatch.delenv("JOBSTREAM_ARCHIVE_URL")
    monkeypatch.setenv("JOBSTREAM_ARCHIVE_RETENTION_DAYS", "0")
    with pytest.raises(SettingsError, match="JOBSTREAM_ARCHIVE_RETENTION_DAYS"):
        load_settings()
    monkeypatch.delenv("JOBSTREAM_ARCHIVE_RETENTION_DAYS")
    assert (load_settings().archive_url, load_settings().archive_retention_days) == (None, 30)


def migrate_command(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobstream", "archive", "migrate", *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_migrateCommand_whenArchiveReachable_thenExitsZeroWithOneLine(archive_url: str) -> None:
    for _ in range(2):
        done = migrate_command(JOBSTREAM_ARCHIVE_URL=archive_url)
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.splitlines()) == 1 and "up to date" in done.stdout
    assert schema_versions(archive_url) == [1, 2]
    assert migrate_command("--url", archive_url).returncode == 0


def test_migrateCommand_whenUrlBadOrDatabaseUnreachable_thenOneLineErrorAndNonZeroExit(tmp_path: Path) -> None:
    cases = {
        "mysql://db/js": "expected sqlite:///",
        f"postgresql://postgres@127.0.0.1:{free_port()}/js": "cannot connect to the PostgreSQL archive",
        f"sqlite:///{tmp_path}/missing/dir/archive.db": "SQLite archive",
    }
    for url, message in cases.items():
        done = migrate_command("--url", url)
        assert done.returncode != 0, url
        assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("jobstream archive migrate: ") and message in done.stderr
        assert "Traceback" not in done.stderr
    done = migrate_command()
    assert done.returncode != 0 and "JOBSTREAM_ARCHIVE_URL" in done.stderr


def numbered(*event_ids: str) -> list[StoredEvent]:
    return [StoredEvent(event_id, "delta", f'{{"text":"{event_id}"}}') for event_id in event_ids]


def test_read_whenCursorAndLimitGiven_thenJobEventsAfterAndOldestIdInOneAnswer(archive_url: str) -> None:
    events = numbered("10-0", "5-10", "9-0", "5-2", "100-1")

    async def scenario(archive: Archive) -> None:
        await archive.store([job("j1", tags='["t"]', input='{"big":"x"}', events=events), job("j2")])
        first = await archive.read("j1", None, 2)
        assert first is not None and first.job.fields == job("j1", tags='["t"]', input='{"big":"x"}').fields
        assert (ids(first.job.events), first.first_id, first.snapshot_id) == (["5-2", "5-10"], "5-2", None)
        later = await archive.read("j1", "5-10", 100)
        assert later is not None and ids(later.job.events) == ["9-0", "10-0", "100-1"] and later.first_id == "5-2"
        assert later.job.events[0] == StoredEvent("9-0", "delta", '{"text":"9-0"}')
        fields_only = await archive.read("j1", None, 0)
        assert fields_only is not None and fields_only.job.events == [] and fields_only.first_id == "5-2"
        # Past the last event, and past anything a store's integers hold (a cursor may be 2^64-1): nothing.
        for beyond in ("100-1", "100-2", "18446744073709551615-0", "5-18446744073709551615"):
            found = await archive.read("j1", beyond, 10)
            assert found is not None and ids(found.job.events) == (["9-0", "10-0", "100-1"] if beyond[0] == "5" else [])
        empty = await archive.read("j2", None, 10)
        assert empty is not None and (empty.job.events, empty.first_id) == ([], None)
        assert await archive.read("missing", None, 10) is None
        assert ids(await archive.events("j1", "18446744073709551615-0", 10)) == []

    run(archive_url, scenario)


def test_read_whenSnapshotAsked_thenEventsStartAfterAUsableSnapshotElseAtTheCursor(archive_url: str) -> None:
    events = numbered("1-0", "2-0", "3-0", "4-0")
    # As archiver.archived_job keeps them: output_text only when the text was whole and not empty.
    snapshots = {
        "whole": {"output_max": "100", "output_id": "3-0", "output_len": "4", "output_text": "héé\x00"},
        "empty": {"output_max": "100", "output_id": "2-0", "output_len": "0"},
        "empty-no-len": {"output_max": "100", "output_id": "2-0"},
        "text-lost": {"output_max": "100", "output_id": "3-0", "output_len": "9"},
        "covers-nothing": {"output_max": "100"},
        "keeps-none": {"output_id": "3-0", "output_len": "0"},
        # Text that looks like the fields, in a job's input (as written, quotes and all), fools nothing.
        "lookalike": {"input": '{"x":"\\\\","output_max":"9","output_id":"1-0"}\\', "note": ',"output_id":"2-0"\x00'},
        "real-after-lookalike": {"a": ',"output_id":"1-0"', "output_max": "9", "output_id": "3-0", "output_len": "0"},
    }
    expected = {
        "whole": ("3-0", ["4-0"]),
        "empty": ("2-0", ["3-0", "4-0"]),
        "empty-no-len": ("2-0", ["3-0", "4-0"]),
        "text-lost": (None, ["1-0", "2-0", "3-0", "4-0"]),
        "covers-nothing": (None, ["1-0", "2-0", "3-0", "4-0"]),
        "keeps-none": (None, ["1-0", "2-0", "3-0", "4-0"]),
        "lookalike": (None, ["1-0", "2-0", "3-0", "4-0"]),
        "real-after-lookalike": ("3-0", ["4-0"]),
    }

    async def scenario(archive: Archive) -> None:
        await archive.store([job(name, events=events, **extra) for name, extra in snapshots.items()])
        for name, (snapshot_id, after) in expected.items():
            found = await archive.read(name, None, 10, snapshot=True)
            assert found is not None, name
            assert (found.snapshot_id, ids(found.job.events)) == (snapshot_id, after), name
            assert found.job.fields == job(name, events=events, **snapshots[name]).fields, name
            assert found.first_id == "1-0", name
            limited = await archive.read(name, None, 1, snapshot=True)
            assert limited is not None and ids(limited.job.events) == after[:1], name
            fields_only = await archive.read(name, None, 0, snapshot=True)
            assert fields_only is not None and fields_only.snapshot_id == snapshot_id, name
            plain = await archive.read(name, None, 10)
            assert plain is not None and (plain.snapshot_id, ids(plain.job.events)) == (None, ids(events)), name
        assert await archive.read("missing", None, 10, snapshot=True) is None

    run(archive_url, scenario)


def test_readMany_whenSeveralJobsAsked_thenEachFromItsOwnPositionInOneAnswer(archive_url: str) -> None:
    async def scenario(archive: Archive) -> None:
        await archive.store(
            [
                job("a", events=numbered("1-0", "2-0", "3-0")),
                job("b", owner="bob", events=numbered("1-5", "7-0")),
                job("c"),
            ]
        )
        found = await archive.read_many([("a", "1-0"), ("b", None), ("c", None), ("missing", None)], 1)
        assert sorted(found) == ["a", "b", "c"]
        assert (ids(found["a"].job.events), found["a"].first_id) == (["2-0"], "1-0")
        assert (ids(found["b"].job.events), found["b"].job.owner) == (["1-5"], "bob")
        assert (found["c"].job.events, found["c"].first_id) == ([], None)
        everything = await archive.read_many([("a", None), ("b", "1-5")], 100)
        assert ids(everything["a"].job.events) == ["1-0", "2-0", "3-0"] and ids(everything["b"].job.events) == ["7-0"]
        owners = await archive.read_many([("a", None), ("b", None), ("nope", None)], 0)
        assert {job_id: read.job.owner for job_id, read in owners.items()} == {"a": "alice", "b": "bob"}
        assert all(read.job.events == [] for read in owners.values())
        assert await archive.read_many([], 10) == {}
        # A hundred jobs, as GET /v1/events may name: still one statement.
        many = [job(f"m{i}", events=numbered("1-0", "2-0")) for i in range(100)]
        await archive.store(many)
        pages = await archive.read_many([(f"m{i}", "1-0") for i in range(100)], 500)
        assert len(pages) == 100 and all(ids(read.job.events) == ["2-0"] for read in pages.values())

    run(archive_url, scenario)


def test_sqlite_whenAWriteIsCutShortWhileWaitingForTheLock_thenNoTransactionIsLeftOpen(tmp_path: Path) -> None:
    path = tmp_path / "archive.db"

    async def scenario() -> None:
        archive = open_archive(f"sqlite:///{path}")
        await archive.migrate()
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process writes
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):  # a caller's bound, shorter than the busy timeout
                    await archive.delete("some-job")
            other.execute("ROLLBACK")  # its lock freed: the BEGIN queued above runs now
            # ...and is ended at once, without waiting for this archive's next use.
            other.execute("PRAGMA busy_timeout=0")

            def others_can_write() -> bool:
                try:
                    other.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError:
                    return False
                other.execute("ROLLBACK")
                return True

            await wait_until_async(others_can_write, timeout_s=5)
            await archive.store([job("j1")])
            assert await archive.get("j1") is not None
            other.execute("PRAGMA busy_timeout=2000")
            other.execute("BEGIN IMMEDIATE")  # others can write: nothing of ours stayed open
            other.execute("ROLLBACK")
        finally:
            other.close()
            await archive.close()

    asyncio.run(scenario())


def query_plan(url: str, sql: str, args: list[object]) -> str:
    """The plan the store makes for a statement of ``queries`` (filled with its placeholders), as
    one text: SQLite's EXPLAIN QUERY PLAN details; PostgreSQL's EXPLAIN with sequential scans
    discouraged (a table of a few rows is scanned whatever its indexes)."""
    dialect, address = parse_url(url)
    if dialect == "sqlite":
        with sqlite3.connect(address) as db:
            return "\n".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args))

    async def explain() -> str:
        conn = await asyncpg.connect(address)
        try:
            await conn.execute("SET enable_seqscan = off")
            return "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {sql}", *args))
        finally:
            await conn.close()

    return asyncio.run(explain())


def test_listOwner_whenFilteredByTagStatusOrType_thenAnIndexInTheListingsOrderDrivesIt(archive_url: str) -> None:
    many = [job(f"j{i:03}", created_ms=i, tags='["chat:1"]' if i % 50 == 0 else None) for i in range(300)]
    run(archive_url, lambda archive: archive.store(many))
    dialect, _ = parse_url(archive_url)
    mark = (lambda n: "?") if dialect == "sqlite" else (lambda n: f"${n}")

    def plan(**filters: object) -> str:
        sql, args = queries.list_owner(mark, "alice", before=(5_000, "x"), limit=2, let_go_by=9, alive_at=1, **filters)  # type: ignore[arg-type]
        return query_plan(archive_url, sql, args)

    tag, one_status, statuses, kind = (
        plan(tag="chat:1", status=None, type=None),
        plan(tag=None, status={"failed"}, type=None),
        plan(tag=None, status={"failed", "cancelled"}, type=None),
        plan(tag=None, status=None, type="t.rare"),
    )
    # The tag's own rows drive it, in order: the owner's other jobs are never visited.
    assert "job_tags_owner_tag_created" in tag and "jobs_owner_created" not in tag, tag
    assert "jobs_owner_status_created" in one_status and "jobs_owner_status_created" in statuses
    assert "jobs_owner_type_created" in kind
    # Walked in the listing's order, stopping at the limit: nothing sorted (several statuses: their
    # ranges merged, at most a limit of each).
    for text in (tag, one_status, kind):
        assert "TEMP B-TREE" not in text and "Sort" not in text, text


def test_migrateV2_whenRowsWereStoredUnderV1_thenTheirLetGoTimeAndTagsAreFilledIn(archive_url: str) -> None:
    """A v1 archive with a job (its fields holding kept_ms) and one without kept_ms: after v2, the
    listing's let-go rule and tag index see them as if stored now."""
    from jobstream.archive.migrations import MIGRATIONS, VERSION_TABLE

    dialect, address = parse_url(archive_url)
    v1 = [VERSION_TABLE, *MIGRATIONS[0].statements[dialect], "INSERT INTO schema_version VALUES (1, 0)"]
    rows = [
        ("kept", '{"id":"kept","owner":"alice","kept_ms":"5000","tags":"[\\"x\\"]"}', 2_000),
        ("old", '{"id":"old","owner":"alice","tags":"[\\"x\\"]"}', 1_000),
    ]
    job_sql = "INSERT INTO jobs VALUES ({}, 'alice', 'completed', 't', {}, 99999999999999, {})"
    if dialect == "sqlite":
        with sqlite3.connect(address) as db:
            for statement in v1:
                db.execute(statement)
            for job_id, fields, created in rows:
                db.execute(job_sql.format("?", "?", "?"), (job_id, created, fields))
                db.execute("INSERT INTO job_tags VALUES (?, 'x')", (job_id,))
    else:

        async def create() -> None:
            conn = await asyncpg.connect(address)
            try:
                for statement in v1:
                    await conn.execute(statement)
                for job_id, fields, created in rows:
                    await conn.execute(job_sql.format("$1", "$2", "$3"), job_id, created, fields)
                    await conn.execute("INSERT INTO job_tags VALUES ($1, 'x')", job_id)
            finally:
                await conn.close()

        asyncio.run(create())

    async def scenario(archive: Archive) -> None:
        assert [j.id for j in await archive.list_owner("alice", tag="x", let_go_by=4_999)] == ["old"]
        assert [j.id for j in await archive.list_owner("alice", tag="x", let_go_by=5_000)] == ["kept", "old"]

    run(archive_url, scenario)
    assert schema_versions(archive_url) == [1, 2]
