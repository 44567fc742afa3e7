"""The archive in PostgreSQL (asyncpg pool): production, shared by every gateway and worker.

Migrations run in one transaction under ``pg_advisory_xact_lock``, so processes starting at
once apply each version exactly once (the others wait, then find it applied)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg

from jobstream.archive import ArchivedJob, ArchivedRead, ArchiveError, Before, Position, queries
from jobstream.archive.migrations import VERSION_TABLE, pending
from jobstream.store import StoredEvent, now_ms

#: The advisory lock of migrations (any constant; "jobstrea" in ASCII).
MIGRATION_LOCK = 0x6A6F6273_74726561
CONNECT_TIMEOUT_S = 10.0
POOL_MAX = 10


def _q(statement: str) -> str:
    return queries.fill(statement, lambda n: f"${n}")


class PostgresArchive:
    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        async with self._opening:
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self.url, min_size=1, max_size=POOL_MAX, timeout=CONNECT_TIMEOUT_S
                    )
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    raise ArchiveError(f"cannot connect to the PostgreSQL archive: {exc}") from exc
            return self._pool

    async def migrate(self) -> None:
        try:
            await self._migrate()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ArchiveError(f"cannot migrate the PostgreSQL archive: {exc}") from exc

    async def _migrate(self) -> None:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(VERSION_TABLE)
            current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            for version, statements in pending(int(current), "postgresql"):
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_ms) VALUES ($1, $2)", version, now_ms()
                )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def store(self, jobs: Sequence[ArchivedJob]) -> None:
        if not jobs:
            return
        rows = [queries.job_row(job) for job in jobs]
        events = [(job.id, *queries.split_id(e.id), e.type, e.data) for job in jobs for e in job.events]
        tags = [row for job in jobs for row in queries.tag_rows(job)]
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany(_q(queries.UPSERT_JOB), rows)
            await conn.executemany(_q(queries.DELETE_TAGS), [(job.id,) for job in jobs])
            if tags:
                await conn.executemany(_q(queries.INSERT_TAG), tags)
            if events:
                await conn.executemany(_q(queries.INSERT_EVENT), events)

    async def get(self, job_id: str) -> ArchivedJob | None:
        pool = await self._get_pool()
        fields = await pool.fetchval(_q(queries.GET_JOB), job_id)
        return queries.from_fields(fields) if fields is not None else None

    async def events(self, job_id: str, after: str | None, limit: int) -> list[StoredEvent]:
        ms, seq = queries.cursor_of(after)
        pool = await self._get_pool()
        rows = await pool.fetch(_q(queries.EVENTS), job_id, ms, seq, limit)
        return [StoredEvent(f"{row[0]}-{row[1]}", row[2], row[3]) for row in rows]

    async def read(self, job_id: str, after: str | None, limit: int, *, snapshot: bool = False) -> ArchivedRead | None:
        return (await self._read([(job_id, after)], limit, snapshot)).get(job_id)

    async def read_many(self, positions: Sequence[Position], limit: int) -> dict[str, ArchivedRead]:
        return await self._read(positions, limit, False) if positions else {}

    async def _read(self, positions: Sequence[Position], limit: int, snapshot: bool) -> dict[str, ArchivedRead]:
        sql, args = queries.read_jobs(lambda n: f"${n}", "postgresql", positions, limit, snapshot=snapshot)
        pool = await self._get_pool()
        return queries.read_rows(await pool.fetch(sql, *args))

    async def delete(self, job_id: str) -> bool:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            return await self._delete(conn, [job_id]) > 0

    @staticmethod
    async def _delete(conn: asyncpg.Connection, job_ids: list[str]) -> int:
        await conn.execute("DELETE FROM events WHERE job_id = ANY($1::text[])", job_ids)
        await conn.execute("DELETE FROM job_tags WHERE job_id = ANY($1::text[])", job_ids)
        status = await conn.execute("DELETE FROM jobs WHERE job_id = ANY($1::text[])", job_ids)
        return int(status.rsplit(" ", 1)[1])  # "DELETE <count>"

    async def delete_expired(self, now_ms: int, batch: int) -> int:
        pool = await self._get_pool()
        total = 0
        while True:
            async with pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(_q(queries.EXPIRED), now_ms, batch)
                total += await self._delete(conn, [row[0] for row in rows])
            if len(rows) < batch:
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
            lambda n: f"${n}",
            owner,
            status=status,
            type=type,
            tag=tag,
            before=before,
            limit=limit,
            let_go_by=let_go_by,
            alive_at=alive_at,
        )
        pool = await self._get_pool()
        rows = await pool.fetch(sql, *args)
        return [queries.from_fields(row[0]) for row in rows]
