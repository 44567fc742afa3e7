"""Archiving: every job that ends is copied by workers into the archive (archive/), from its outbox.

The script that ends a job writes a record of the ending into the job's outbox (outbox.py) and,
for a job to archive (meta ``archived`` "0"), keeps the job in Redis until the archive holds it
(scripts._WRITE). A worker process runs one ``Archiver``: it takes due jobs in batches, claims
each one's ending record, reads the jobs from Redis (metadata, events, snapshot text), writes the
batch to the archive in one transaction (idempotent: a batch retried after a crash duplicates
nothing), then marks each job archived and gives it back the expiry it would have had. While the
archive is down, batches are retried with a backoff of at most ``MAX_BACKOFF_S``, so jobs that
ended meanwhile are archived soon after it returns. Never on the append path: appends only write
the record. The archive's own retention is swept here too, a batch of jobs per transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Sequence
from typing import Any, cast

from prometheus_client import Counter
from redis.exceptions import RedisError

from jobstream import keys, metrics
from jobstream.archive import Archive, ArchivedJob
from jobstream.connection import RedisClient
from jobstream.jobindex import JobIndex
from jobstream.models import JobStatus
from jobstream.outbox import ARCHIVE_CONSUMER, IDLE_LOOK_MS, KEEP, Outbox, Record
from jobstream.settings import Settings
from jobstream.store import decode_entry, now_ms

logger = logging.getLogger("jobstream.archiver")

CONSUMER = ARCHIVE_CONSUMER
#: Jobs one pass takes at most, written to the archive in one transaction.
BATCH = 100
#: A taken job is left alone by other processes this long: more than a pass can take.
LEASE_MS = 60_000
#: How often an archiver looks for due jobs when it has nothing to do.
POLL_S = 0.5
#: Retries while the archive is down: from the first, doubling up to the most, plus jitter.
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 20.0
JITTER = 0.25
#: A batch's write to the archive (and the schema check before the first) is given this long: a
#: hung archive must not hold the worker's shutdown.
STORE_TIMEOUT_S = 30.0
#: How often a worker deletes the jobs whose archive retention ended, and how many per transaction.
SWEEP_EVERY_S = 600.0
SWEEP_BATCH = 500
_ENDED = frozenset(status.value for status in JobStatus if status.terminal)

archived_jobs = Counter("jobstream_archived_jobs_total", "Ended jobs written to the archive.")
archive_failures = Counter(
    "jobstream_archive_failures_total", "Batches of jobs the archive did not take (retried later)."
)
archive_deleted = Counter("jobstream_archive_deleted_total", "Jobs deleted from the archive as their retention ended.")

#: Mark a job archived, and give it back the expiry it would have had had it not been kept for the
#: archive (kept_ms; already past: its keys go now, and readers find it in the archive).
#: KEYS: meta, events, output. Returns {} (the job is gone: deleted meanwhile) | {owner, status, kept_ms}.
_MARK = """
local meta = redis.call('HMGET', KEYS[1], 'owner', 'status', 'kept_ms', 'expires_ms')
if not meta[1] then return {} end
local kept = meta[3] or meta[4]
redis.call('HSET', KEYS[1], 'archived', '1', 'expires_ms', kept)
for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], kept) end
return {meta[1], meta[2], kept}
"""


def backoff_s(failed_attempts: int) -> float:
    """The wait before archiving a job again, after ``failed_attempts`` failures (1 or more)."""
    wait: float = min(FIRST_BACKOFF_S * 2.0 ** min(failed_attempts - 1, 32), MAX_BACKOFF_S)
    return wait * (1 + JITTER * random.random())


def archived_job(
    meta: dict[str, str], events: Sequence[tuple[str, dict[str, str]]], output: str | None, retention_ms: int
) -> ArchivedJob:
    """The job as the archive keeps it: its metadata hash as Redis holds it, marked archived, its
    expiry the archive's retention end; its snapshot's text when it keeps a whole one; every event."""
    fields = dict(meta)
    ended_ms = int(fields.get("completed_ms") or fields.get("updated_ms") or now_ms())
    fields["expires_ms"] = str(ended_ms + retention_ms)
    fields["archived"] = "1"
    # kept_ms stays: when Redis lets the job go once archived (from then on only the archive holds it).
    if output is not None and fields.get("output_id") and len(output.encode()) == int(fields.get("output_len") or 0):
        fields["output_text"] = output
    return ArchivedJob(fields, [decode_entry(entry_id, entry) for entry_id, entry in events])


class Archiver:
    """A worker process's archiving; ``run`` until ``stopping`` is set."""

    def __init__(self, client: RedisClient, settings: Settings, archive: Archive) -> None:
        self._redis = client
        self._archive = archive
        self._outbox = Outbox(client)
        self._index = JobIndex(client)
        self._mark = client.register_script(_MARK)
        self._retention_ms = round(settings.archive_retention_days * 86_400_000)
        #: Names this process's leases.
        self._token = uuid.uuid4().hex
        self._migrated = False

    async def run(self, stopping: asyncio.Event) -> None:
        sweeper = asyncio.create_task(self._sweep_loop(stopping))
        try:
            while not stopping.is_set():
                taken = 0
                try:
                    taken = await self.run_once()
                except RedisError as exc:
                    metrics.redis_errors.labels("archiver").inc()
                    logger.warning("archiver: Redis failed (%s); its leases lapse and the jobs are taken again", exc)
                except Exception:  # never let the archiver die quietly: log, and look again
                    logger.exception("archiver: unexpected error")
                if taken < BATCH:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(POLL_S):
                            await stopping.wait()
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def run_once(self) -> int:
        """One pass: archive the endings of up to BATCH due jobs; how many jobs were taken."""
        now = now_ms()
        taken_ms = now + LEASE_MS
        taken = await self._outbox.take(CONSUMER, BATCH, now, taken_ms)
        if not taken:
            return 0
        claimed = await asyncio.gather(*(self._next_ending(job_id, taken_ms) for job_id in taken))
        records = [record for record in claimed if record is not None]
        if records:
            await self._archive_records(records, taken_ms)
        return len(taken)

    async def _next_ending(self, job_id: str, taken_ms: int) -> Record | None:
        """The job's ending record, claimed; None when there is none to archive now (the job is
        then rescheduled: still running, held by another, waiting for a retry, or finished)."""
        outbox = self._outbox
        while True:
            claim = await outbox.claim(CONSUMER, job_id, self._token, LEASE_MS)
            if claim.kind == "wait":
                await outbox.reschedule(CONSUMER, job_id, taken_ms, claim.until_ms, KEEP)
                return None
            if claim.kind == "idle":
                await outbox.reschedule(CONSUMER, job_id, taken_ms, now_ms() + IDLE_LOOK_MS, None)
                return None
            if claim.kind == "finished" or claim.record is None:
                await outbox.reschedule(CONSUMER, job_id, taken_ms, None, None)
                return None
            if claim.record.status in _ENDED:
                return claim.record
            # Another consumer's record (a webhook of the job's start): nothing to archive.
            await outbox.settle(CONSUMER, claim.record, self._token, "done")

    async def _archive_records(self, records: list[Record], taken_ms: int) -> None:
        found = await self._read_jobs([record.job_id for record in records])
        jobs = [job for job in found if job is not None]
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                if not self._migrated:
                    await self._archive.migrate()
                    self._migrated = True
                await self._archive.store(jobs)
        except Exception as exc:  # the archive is down or refused: every record is retried
            archive_failures.inc()
            logger.warning("archiver: %d jobs wait for the archive: %s", len(records), exc)
            await asyncio.gather(*(self._retry(record, taken_ms) for record in records))
            return
        archived_jobs.inc(len(jobs))
        pairs = zip(records, found, strict=True)
        done = [self._done(record, taken_ms, archived=job is not None) for record, job in pairs]
        await asyncio.gather(*done)

    async def _retry(self, record: Record, taken_ms: int) -> None:
        retry_ms = now_ms() + round(backoff_s(record.failed_attempts + 1) * 1000)
        await self._outbox.settle(CONSUMER, record, self._token, "retry", retry_ms)
        await self._outbox.reschedule(CONSUMER, record.job_id, taken_ms, retry_ms, record.at_ms)

    async def _done(self, record: Record, taken_ms: int, *, archived: bool) -> None:
        """Mark the job archived (it was deleted meanwhile: then out of the archive too), settle
        its record, and look for what follows (nothing, usually: the job is then finished)."""
        if archived:
            marked = await self._mark(keys=_job_keys(record.job_id))
            if marked:
                owner, status, kept_ms = marked
                await self._index.status_changed(owner, record.job_id, status, int(kept_ms), now_ms())
            else:
                await self._archive.delete(record.job_id)
        await self._outbox.settle(CONSUMER, record, self._token, "done")
        following = await self._next_ending(record.job_id, taken_ms)
        if following is not None:  # never expected (one ending per job): looked at again at once
            await self._outbox.settle(CONSUMER, following, self._token, "release")
            await self._outbox.reschedule(CONSUMER, record.job_id, taken_ms, now_ms(), KEEP)

    async def _read_jobs(self, job_ids: list[str]) -> list[ArchivedJob | None]:
        """Each job as the archive keeps it (None: gone), read in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(keys.meta_key(job_id))
                pipe.xrange(keys.events_key(job_id))
                pipe.get(keys.output_key(job_id))
            replies = await pipe.execute()
        found: list[ArchivedJob | None] = []
        for i in range(0, len(replies), 3):
            meta, events, output = cast(tuple[dict[str, str], list[Any], str | None], replies[i : i + 3])
            found.append(archived_job(meta, events, output, self._retention_ms) if meta else None)
        return found

    async def _sweep_loop(self, stopping: asyncio.Event) -> None:
        """Delete the jobs whose archive retention ended, now and then (each worker, at a random
        point of the interval: the deletes are idempotent, and spread)."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SWEEP_EVERY_S * (0.5 + random.random())):
                    await stopping.wait()
            if stopping.is_set():
                return
            try:
                deleted = await self._archive.delete_expired(now_ms(), SWEEP_BATCH)
            except Exception as exc:
                logger.warning("archiver: the archive's retention sweep failed: %s", exc)
                continue
            archive_deleted.inc(deleted)
            if deleted:
                logger.info("archiver: %d jobs past the archive's retention deleted", deleted)


def _job_keys(job_id: str) -> list[str]:
    return [keys.meta_key(job_id), keys.events_key(job_id), keys.output_key(job_id)]
