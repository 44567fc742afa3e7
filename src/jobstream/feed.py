"""The reading side: how a gateway waits for new events of a job.

``Feed`` is the seam between the HTTP routes and Redis for live reads. ``DirectFeed`` gives each
waiting reader its own blocking ``XREAD``: simple and correct, but one Redis connection per waiting
reader.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol, cast

import redis.asyncio as aioredis

from jobstream import keys
from jobstream.connection import MAX_BLOCK_MS
from jobstream.store import Entries, StoredEvent, decode_entry

#: XREAD's reply with decode_responses=True: [(key, entries)], or None on timeout.
StreamReply = list[tuple[str, Entries]] | None
#: Upper bound of events handed over in one batch.
BATCH = 500


class Feed(Protocol):
    def follow(self, job_id: str, after: str) -> AsyncGenerator[list[StoredEvent]]:
        """Batches of events after ``after``, forever; an empty batch means "nothing new for a while"."""
        ...

    async def wait(self, job_id: str, after: str, timeout_s: float) -> list[StoredEvent]:
        """Events after ``after`` as soon as there is at least one, or [] when ``timeout_s`` ends."""
        ...

    async def close(self) -> None: ...


class DirectFeed:
    def __init__(self, client: aioredis.Redis, idle_tick_s: float = MAX_BLOCK_MS / 1000) -> None:
        self._redis = client
        self._block_ms = max(1, min(MAX_BLOCK_MS, int(idle_tick_s * 1000)))

    async def _read(self, job_id: str, after: str, block_ms: int) -> list[StoredEvent]:
        reply = cast(
            StreamReply, await self._redis.xread({keys.events_key(job_id): after}, count=BATCH, block=block_ms)
        )
        return [decode_entry(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    async def follow(self, job_id: str, after: str) -> AsyncGenerator[list[StoredEvent]]:
        while True:
            batch = await self._read(job_id, after, self._block_ms)
            if batch:
                after = batch[-1].id
            yield batch

    async def wait(self, job_id: str, after: str, timeout_s: float) -> list[StoredEvent]:
        remaining_ms = int(timeout_s * 1000)
        while remaining_ms > 0:
            block_ms = min(remaining_ms, MAX_BLOCK_MS)
            batch = await self._read(job_id, after, block_ms)
            if batch:
                return batch
            remaining_ms -= block_ms
        return []

    async def close(self) -> None:
        await self._redis.aclose()
