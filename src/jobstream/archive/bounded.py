"""The archive as a gateway uses it: on request paths, where an archive that is down or slow must
cost a request a bounded wait and a clear error, never a hang or a traceback.

``BoundedArchive`` wraps a store: its schema is brought up to date before the first use (tried at
start-up; if the archive is down then, at the next use, and so on), every call is bounded by
``timeout_s``, and any failure (a driver's own exception, a timeout) is an ``ArchiveError``.
After a failure it fails fast (ArchiveError at once) for ``COOLDOWN_S``, so that an archive that is
down or hangs does not cost every request that asks it the whole bound; then one call tries it
again (the others still fail fast meanwhile), and its success closes the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from jobstream.archive import Archive, ArchivedJob, ArchivedRead, ArchiveError, Before, Position
from jobstream.store import StoredEvent

logger = logging.getLogger("jobstream.archive")

#: The longest a request waits for the archive (its migration included) before it answers 503.
TIMEOUT_S = 5.0
#: How long calls fail fast after the archive failed, before one tries it again.
COOLDOWN_S = 5.0
T = TypeVar("T")


class BoundedArchive:
    """An ``Archive`` whose calls are bounded and fail only with ArchiveError."""

    def __init__(
        self,
        inner: Archive,
        timeout_s: float | None = None,
        cooldown_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
        self.cooldown_s = COOLDOWN_S if cooldown_s is None else cooldown_s
        self._clock = clock
        self._migrated = False
        self._migrating = asyncio.Lock()
        #: Until when calls fail fast (0: the breaker is closed).
        self._failing_until = 0.0

    async def start(self) -> None:
        """Migrate now if the archive answers; if not, say so and leave it to the first use."""
        try:
            # Not counted by the breaker: the first requests try the archive themselves.
            await self._call(self._noop, breaker=False)
        except ArchiveError as exc:
            logger.warning("archive not ready at start-up (reads retry it when they need it): %s", exc)

    async def _call(self, call: Callable[[], Awaitable[T]], *, breaker: bool = True) -> T:
        if breaker and self._failing_until:
            now = self._clock()
            if now < self._failing_until:
                raise ArchiveError("the archive failed moments ago (tried again within seconds)")
            # This call tries it again; the others fail fast until it is done (at most the bound).
            self._failing_until = now + self.timeout_s
        try:
            result = await self._bounded(call)
        except ArchiveError:
            if breaker:
                self._failing_until = self._clock() + self.cooldown_s
            raise
        if breaker:
            self._failing_until = 0.0
        return result

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._migrate_once()
                return await call()
        except ArchiveError:
            raise
        except TimeoutError as exc:
            raise ArchiveError(f"the archive did not answer within {self.timeout_s:g} s") from exc
        except Exception as exc:  # the drivers' own errors (OSError, sqlite3, asyncpg): all one to a reader
            raise ArchiveError(f"the archive failed: {type(exc).__name__}: {exc}") from exc

    async def _migrate_once(self) -> None:
        if self._migrated:
            return
        async with self._migrating:
            if not self._migrated:
                await self.inner.migrate()
                self._migrated = True

    async def migrate(self) -> None:
        await self._call(self._noop)

    @staticmethod
    async def _noop() -> None:
        return None

    async def close(self) -> None:
        await self.inner.close()

    async def store(self, jobs: Sequence[ArchivedJob]) -> None:
        await self._call(lambda: self.inner.store(jobs))

    async def get(self, job_id: str) -> ArchivedJob | None:
        return await self._call(lambda: self.inner.get(job_id))

    async def events(self, job_id: str, after: str | None, limit: int) -> list[StoredEvent]:
        return await self._call(lambda: self.inner.events(job_id, after, limit))

    async def read(self, job_id: str, after: str | None, limit: int, *, snapshot: bool = False) -> ArchivedRead | None:
        return await self._call(lambda: self.inner.read(job_id, after, limit, snapshot=snapshot))

    async def read_many(self, positions: Sequence[Position], limit: int) -> dict[str, ArchivedRead]:
        return await self._call(lambda: self.inner.read_many(positions, limit))

    async def delete(self, job_id: str) -> bool:
        return await self._call(lambda: self.inner.delete(job_id))

    async def delete_expired(self, now_ms: int, batch: int) -> int:
        return await self._call(lambda: self.inner.delete_expired(now_ms, batch))

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
        return await self._call(
            lambda: self.inner.list_owner(
                owner,
                status=status,
                type=type,
                tag=tag,
                before=before,
                limit=limit,
                let_go_by=let_go_by,
                alive_at=alive_at,
            )
        )
