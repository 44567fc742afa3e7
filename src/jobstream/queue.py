"""The work queue: a Redis Stream read through a consumer group, with leases renewed by XCLAIM."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from jobstream import keys
from jobstream.connection import RedisClient
from jobstream.metrics import QueueStats

RawEntries = list[tuple[str, dict[str, str] | None]]


@dataclass(frozen=True, slots=True)
class QueueEntry:
    entry_id: str
    job_id: str
    #: Set on a job put back onto the queue after waiting for a running slot (fairness.py), so that
    #: its owner's slots are tidied even if the job has expired meanwhile; None on a create's entry.
    owner: str | None = None


class WorkQueue:
    def __init__(self, client: RedisClient, consumer: str) -> None:
        self._redis = client
        self.consumer = consumer

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(keys.queue_key, keys.queue_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def add(self, job_id: str, owner: str) -> None:
        """Put back a job that waited for one of its owner's running slots."""
        await self._redis.xadd(keys.queue_key, {"job": job_id, "owner": owner})

    async def take(self, count: int, block_ms: int) -> list[QueueEntry]:
        """New entries for this consumer; they stay pending (leased) until acked."""
        reply = cast(
            list[tuple[str, RawEntries]] | None,
            await self._redis.xreadgroup(
                keys.queue_group, self.consumer, {keys.queue_key: ">"}, count=count, block=block_ms
            ),
        )
        return [entry for _, entries in reply or [] for entry in _entries(entries)]

    async def renew(self, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this consumer holds, so no other worker reclaims them."""
        await self._set_idle(entry_ids, 0)

    async def hand_back(self, entry_ids: list[str], lease_ms: int) -> None:
        """Mark entries as if their lease had already lapsed: the next reclaim by any worker takes them,
        instead of waiting a whole lease for a worker that stopped on purpose."""
        await self._set_idle(entry_ids, lease_ms + 1000)

    async def _set_idle(self, entry_ids: list[str], idle_ms: int) -> None:
        if entry_ids:
            await self._redis.xclaim(
                keys.queue_key,
                keys.queue_group,
                self.consumer,
                min_idle_time=0,
                message_ids=list[int | bytes | str | memoryview](entry_ids),
                idle=idle_ms,
                justid=True,
            )

    async def reclaim(self, lease_ms: int, count: int = 50) -> list[QueueEntry]:
        """Entries whose holder has not renewed them for ``lease_ms``: their worker is presumed dead."""
        reply = await self._redis.xautoclaim(
            keys.queue_key, keys.queue_group, self.consumer, min_idle_time=lease_ms, start_id="0-0", count=count
        )
        orphans = [entry_id for entry_id, fields in reply[1] if not fields]
        if orphans:
            await self._redis.xack(keys.queue_key, keys.queue_group, *orphans)
        return _entries(reply[1])

    async def finish(self, entry_id: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(keys.queue_key, keys.queue_group, entry_id)
            pipe.xdel(keys.queue_key, entry_id)
            await pipe.execute()


async def queue_stats(client: RedisClient) -> QueueStats:
    """Jobs waiting (appended, not yet taken by a worker) and running (taken, not finished:
    finished entries are deleted), and the age of the oldest waiting one."""
    length = int(await client.xlen(keys.queue_key))
    groups: list[dict[str, Any]] = await client.xinfo_groups(keys.queue_key) if length else []
    group = next((g for g in groups if g["name"] == keys.queue_group), None)
    running = int(group["pending"]) if group else 0
    last_taken = group["last-delivered-id"] if group else "0-0"
    oldest = cast(RawEntries, await client.xrange(keys.queue_key, min=f"({last_taken}", count=1)) if length else []
    age_s = max(0.0, time.time() - int(oldest[0][0].partition("-")[0]) / 1000) if oldest else 0.0
    return QueueStats(waiting=max(0, length - running), running=running, oldest_waiting_age_s=round(age_s, 3))


def _entries(raw: RawEntries) -> list[QueueEntry]:
    # XAUTOCLAIM on Redis 6.2 returns entries deleted from the stream with no fields: nothing to run.
    return [
        QueueEntry(entry_id, fields["job"], fields.get("owner"))
        for entry_id, fields in raw
        if fields and "job" in fields
    ]
