"""The archive in one SQLite file (aiosqlite): embedded, for `jobstream dev` and small deployments.

One connection, in WAL mode (readers of other processes never wait for its writes); its
operations take turns under one lock, so a coroutine never reads another's open transaction.
Transactions are explicit (``BEGIN IMMEDIATE``: the write lock up front, so two processes
migrating at once queue on it, within the busy timeout, instead of failing mid-way)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiosqlite

from jobstream.archive import ArchivedJob, ArchivedRead, ArchiveError, Before, Position, queries
from jobstream.archive.migrations import VERSION_TABLE, pending
from jobstream.store import StoredEvent, now_ms

#: How long a statement waits for another process's write lock.
BUSY_TIMEOUT_S = 30.0


async def _wal(db: aiosqlite.Connection) -> None:
    """WAL mode. Switching to it takes the file's exclusive lock, and SQLite answers "locked" at
    once, busy timeout or not, while another process holds a lock: asked again until it passes."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + BUSY_TIMEOUT_S
    while True:
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() >= give_up:
                raise
            await asyncio.sleep(0.05)


async def _rollback(db: aiosqlite.Connection) -> None:
    """End whatever transaction the connection has open (none: nothing to do). aiosqlite runs the
    calls it queued in order, also those whose caller stopped waiting: this runs after them."""
    with contextlib.suppress(sqlite3.Error):
        await db.execute("ROLLBACK")


def _q(statement: str) -> str:
    return queries.fill(statement, lambda n: "?")


class SqliteArchive:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        #: A transaction's call was cut short: the next use ends whatever it left open.
        self._unfinished = False
        self._cleanups: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection (opened on first use), held alone for the caller's operation."""
        async with self._lock:
            if self._db is None:
                self._db = await self._open()
            if self._unfinished:
                await _rollback(self._db)
                self._unfinished = False
            yield self._db

    async def _open(self) -> aiosqlite.Connection:
        # Checked first: a failed connect leaves aiosqlite's thread to report back to a loop that a
        # command line tool has closed by then (a traceback on stderr).
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise ArchiveError(f"cannot open the SQLite archive {self.path!r}: no directory {folder!r}")
        try:
            db = await aiosqlite.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot open the SQLite archive {self.path!r}: {exc}") from exc
        try:
            await _wal(db)
            await db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            await db.close()
            raise ArchiveError(f"cannot use the SQLite archive {self.path!r}: {exc}") from exc
        return db

    async def _end_unfinished(self) -> None:
        async with self._lock:
            if self._unfinished and self._db is not None:  # (not reopened once closed)
                await _rollback(self._db)
                self._unfinished = False

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._connection() as db:
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except asyncio.CancelledError:
                # A call cut short (a timeout) may still run, queued in aiosqlite's thread (a BEGIN
                # waiting for another process's lock): whoever uses the connection next ends it
                # first, so that the caller's bound is not spent waiting for it here.
                self._unfinished = True
                # Ended at once, not at this process's next use: until then others could not write.
                task = asyncio.get_running_loop().create_task(self._end_unfinished())
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
                raise
            except BaseException:
                await _rollback(db)
                raise

    async def migrate(self) -> None:
        try:
            await self._migrate()
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot migrate the SQLite archive {self.path!r}: {exc}") from exc

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            await db.execute(VERSION_TABLE)
            async with db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version") as cursor:
                row = await cursor.fetchone()
            current = int(row[0]) if row else 0
            for version, statements in pending(current, "sqlite"):
                for statement in statements:
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version, applied_ms) VALUES (?, ?)", (version, now_ms()))

    async def close(self) -> None:
        async with self._lock:
            if self._db is not None:
                await self._db.close()
                self._db = None

    async def store(self, jobs: Sequence[ArchivedJob]) -> None:
        if not jobs:
            return
        rows = [queries.job_row(job) for job in jobs]
        events = [(job.id, *queries.split_id(e.id), e.type, e.data) for job in jobs for e in job.events]
        async with self._transaction() as db:
            await db.executemany(_q(queries.UPSERT_JOB), rows)
            await db.executemany(_q(queries.DELETE_TAGS), [(job.id,) for job in jobs])
            await db.executemany(_q(queries.INSERT_TAG), [row for job in jobs for row in queries.tag_rows(job)])
            await db.executemany(_q(queries.INSERT_EVENT), events)

    async def get(self, job_id: str) -> ArchivedJob | None:
        async with self._connection() as db, db.execute(_q(queries.GET_JOB), (job_id,)) as cursor:
            row = await cursor.fetchone()
        return queries.from_fields(row[0]) if row else None

    async def events(self, job_id: str, after: str | None, limit: int) -> list[StoredEvent]:
        ms, seq = queries.cursor_of(after)
        async with self._connection() as db, db.execute(_q(queries.EVENTS), (job_id, ms, seq, limit)) as cursor:
            rows = await cursor.fetchall()
        return [StoredEvent(f"{row[0]}-{row[1]}", row[2], row[3]) for row in rows]

    async def read(self, job_id: str, after: str | None, limit: int, *, snapshot: bool = False) -> ArchivedRead | None:
        return (await self._read([(job_id, after)], limit, snapshot)).get(job_id)

    async def read_many(self, positions: Sequence[Position], limit: int) -> dict[str, ArchivedRead]:
        return await self._read(positions, limit, False) if positions else {}

    async def _read(self, positions: Sequence[Position], limit: int, snapshot: bool) -> dict[str, ArchivedRead]:
        sql, args = queries.read_jobs(lambda n: "?", "sqlite", positions, limit, snapshot=snapshot)
        async with self._connection() as db, db.execute(sql, args) as cursor:
            rows = await cursor.fetchall()
        return queries.read_rows(rows)

    async def delete(self, job_id: str) -> bool:
        async with self._transaction() as db:
            return await self._delete(db, [job_id]) > 0

    async def _delete(self, db: aiosqlite.Connection, job_ids: list[str]) -> int:
        deleted = 0
        for job_id in job_ids:
            for statement in queries.DELETE_JOB:
                async with db.execute(_q(statement), (job_id,)) as cursor:
                    pass
            deleted += cursor.rowcount  # of the last statement: the job's own row
        return deleted

    async def delete_expired(self, now_ms: int, batch: int) -> int:
        total = 0
        while True:
            async with self._transaction() as db:
                async with db.execute(_q(queries.EXPIRED), (now_ms, batch)) as cursor:
                    job_ids = [row[0] for row in await cursor.fetchall()]
                total += await self._delete(db, job_ids)
            if len(job_ids) < batch:
                return total

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
        sql, args = queries.list_owner(
            lambda n: "?",
            owner,
            status=status,
            type=type,
            tag=tag,
            before=before,
            limit=limit,
            let_go_by=let_go_by,
            alive_at=alive_at,
        )
        async with self._connection() as db, db.execute(sql, args) as cursor:
            rows = await cursor.fetchall()
        return [queries.from_fields(row[0]) for row in rows]
