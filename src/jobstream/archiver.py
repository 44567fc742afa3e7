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
import sqlite3
import uuid
from collections.abc import Sequence
from typing import Any, cast

import asyncpg
from prometheus_client import Counter
from redis.exceptions import RedisError

from jobstream import keys, metrics
from jobstream.archive import Archive, ArchivedJob, ArchiveError
from jobstream.connection import RedisClient
from jobstream.jobindex import JobIndex
from jobstream.models import JobStatus
from jobstream.outbox import ARCHIVE_CONSUMER, KEEP, OUTBOX_TTL_S, Outbox, Record
from jobstream.settings import Settings
from jobstream.store import decode_entry, now_ms

logger = logging.getLogger("jobstream.archiver")

CONSUMER = ARCHIVE_CONSUMER
#: Jobs one pass takes at most, written to the archive in one transaction.
BATCH = 100
#: Events one round trip reads from Redis: the first page of every job of a pass together, then
#: each longer job's rest page by page (one command reading a whole 10,000-event stream holds up
#: Redis's other clients for milliseconds).
FIRST_PAGE_EVENTS = 5000
READ_PAGE_EVENTS = 1000
#: A transaction of the archive carries this many events or so (jobs are not split).
TXN_EVENTS = 10_000
#: Where the outbox state remembers the ending record whose job was marked archived.
MARKED = "archive:marked"
#: A taken job is left alone by other processes this long: more than a pass can take, since a
#: pass asks the archive only within PASS_BUDGET_S (then retries what is left).
LEASE_MS = 60_000
PASS_BUDGET_S = 25.0
#: A job that has not ended is looked at again this long after (its ending nudges the archiver at
#: once; this finds an ending whose nudge was lost when its writer died).
ARCHIVE_IDLE_LOOK_MS = 300_000
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
SWEEP_TIMEOUT_S = 300.0
_ENDED = frozenset(status.value for status in JobStatus if status.terminal)

archived_jobs = Counter("jobstream_archived_jobs_total", "Ended jobs written to the archive.")
archive_failures = Counter(
    "jobstream_archive_failures_total", "Batches of jobs the archive did not take (retried later)."
)
archive_deleted = Counter("jobstream_archive_deleted_total", "Jobs deleted from the archive as their retention ended.")

#: What a job's ending to archive leads to once the job is gone from Redis: 'deleted' (the archive
#: must follow) | 'kept' (its copy was marked archived before Redis let it go, or the outbox is
#: finished and gone: another process did it all). KEYS[4]: the outbox state; ARGV[1]: the record.
_WHEN_GONE = (
    """
local function when_gone(state, record)
  if redis.call('EXISTS', state) == 0 or redis.call('HGET', state, '"""
    + MARKED
    + """') == record then return {'kept'} end
  return {'deleted'}
end
"""
)

#: Mark a job archived, and give it back the expiry it would have had had it not been kept for the
#: archive (kept_ms; already past: its keys go now, and readers find it in the archive); remember
#: which ending record it was, for a process that would take the record again after a crash.
#: KEYS: meta, events, output, outbox state. ARGV: the record's id.
#: Returns {'marked', owner, status, kept_ms} | when_gone's answer.
_MARK = (
    _WHEN_GONE
    + """
local meta = redis.call('HMGET', KEYS[1], 'owner', 'status', 'kept_ms', 'expires_ms')
if not meta[1] then return when_gone(KEYS[4], ARGV[1]) end
local kept = meta[3] or meta[4]
redis.call('HSET', KEYS[1], 'archived', '1', 'expires_ms', kept)
for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], kept) end
if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('HSET', KEYS[4], '"""
    + MARKED
    + """', ARGV[1]) end
return {'marked', meta[1], meta[2], kept}
"""
)

#: when_gone for a job found gone when read. KEYS: the outbox state. ARGV: the record's id.
_GONE = _WHEN_GONE + "return when_gone(KEYS[1], ARGV[1])\n"

#: Keep a job that waits for the archive as long as its record does (each retry extends both),
#: so that an archive down for days loses nothing. KEYS: meta, events, output. ARGV: seconds.
_HOLD = """
if redis.call('HGET', KEYS[1], 'archived') ~= '0' then return 0 end
for i = 1, 3 do
  if redis.call('TTL', KEYS[i]) > 0 and redis.call('TTL', KEYS[i]) < tonumber(ARGV[1]) then
    redis.call('EXPIRE', KEYS[i], ARGV[1])
  end
end
return 1
"""


def _unreachable(exc: Exception) -> bool:
    """The archive could not be reached or did not answer (not: it refused what it was given)."""
    unreachable = ArchiveError | TimeoutError | OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError
    return isinstance(exc, unreachable | sqlite3.OperationalError)


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
        self._hold = client.register_script(_HOLD)
        self._when_gone = client.register_script(_GONE)
        #: This pass's: when it must be over (loop time, well within the lease), and whether the
        #: archive failed to answer (then the rest of the pass is retried without asking it).
        self._deadline = 0.0
        self._down = False
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
        self._deadline, self._down = asyncio.get_running_loop().time() + PASS_BUDGET_S, False
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
                await outbox.reschedule(CONSUMER, job_id, taken_ms, now_ms() + ARCHIVE_IDLE_LOOK_MS, None)
                return None
            if claim.kind == "finished" or claim.record is None:
                await outbox.reschedule(CONSUMER, job_id, taken_ms, None, None)
                return None
            if claim.record.status in _ENDED:
                return claim.record
            # Another consumer's record (a webhook of the job's start): nothing to archive.
            await outbox.settle(CONSUMER, claim.record, self._token, "done")

    async def _archive_records(self, records: list[Record], taken_ms: int) -> None:
        """Read the jobs from Redis and store them, a transaction per TXN_EVENTS events or so."""
        page = max(1, min(READ_PAGE_EVENTS, FIRST_PAGE_EVENTS // len(records)))
        firsts = await self._read_firsts([record.job_id for record in records], page)
        group: list[tuple[Record, ArchivedJob]] = []
        events = 0
        for record, (meta, first, output) in zip(records, firsts, strict=True):
            if not meta:
                await self._gone(record, taken_ms)
                continue
            try:
                job = archived_job(meta, await self._rest(record.job_id, first, page), output, self._retention_ms)
            except (KeyError, ValueError, TypeError):  # a job no store could take: it alone waits
                logger.exception("archiver: job %s cannot be read for the archive", record.job_id)
                await self._retry(record, taken_ms)
                continue
            group.append((record, job))
            events += len(job.events)
            if events >= TXN_EVENTS:
                await self._store_group(group, taken_ms)
                group, events = [], 0
        if group:
            await self._store_group(group, taken_ms)

    def _time_left(self) -> float:
        """How long the archive may take now (0: not asked again in this pass)."""
        return 0.0 if self._down else min(STORE_TIMEOUT_S, self._deadline - asyncio.get_running_loop().time())

    async def _store_group(self, group: list[tuple[Record, ArchivedJob]], taken_ms: int) -> None:
        try:
            if self._time_left() <= 0:
                raise TimeoutError("no time left in this pass")
            async with asyncio.timeout(self._time_left()):
                if not self._migrated:
                    await self._archive.migrate()
                    self._migrated = True
                await self._archive.store([job for _, job in group])
        except Exception as exc:
            self._down = self._down or _unreachable(exc)
            if len(group) > 1 and not self._down:
                # The archive refused the batch: each job alone, so that one it cannot take holds up no other.
                for one in group:
                    await self._store_group([one], taken_ms)
                return
            archive_failures.inc()
            logger.warning("archiver: %d jobs wait for the archive: %s", len(group), exc)
            await asyncio.gather(*(self._retry(record, taken_ms) for record, _ in group))
            return
        archived_jobs.inc(len(group))
        await asyncio.gather(*(self._done(record, taken_ms) for record, _ in group))

    async def _retry(self, record: Record, taken_ms: int) -> None:
        """Try again later; meanwhile Redis keeps the job as long as its record waits."""
        await self._hold(keys=_job_keys(record.job_id), args=[OUTBOX_TTL_S])
        retry_ms = now_ms() + round(backoff_s(record.failed_attempts + 1) * 1000)
        await self._outbox.settle(CONSUMER, record, self._token, "retry", retry_ms)
        await self._outbox.reschedule(CONSUMER, record.job_id, taken_ms, retry_ms, record.at_ms)

    async def _done(self, record: Record, taken_ms: int) -> None:
        """Mark the job archived (it was deleted meanwhile: then out of the archive too), settle
        its record, and look for what follows (nothing, usually: the job is then finished)."""
        job_keys = [*_job_keys(record.job_id), keys.outbox_state_key(record.job_id)]
        marked = await self._mark(keys=job_keys, args=[record.id])
        if marked[0] == "marked":
            _, owner, status, kept_ms = marked
            await self._index.status_changed(owner, record.job_id, status, int(kept_ms), now_ms())
        elif marked[0] == "deleted" and not await self._forget(record, taken_ms):
            return
        await self._settled(record, taken_ms)

    async def _gone(self, record: Record, taken_ms: int) -> None:
        """The job of an ending to archive is gone from Redis: archived and let go already (a
        process died before it settled the record), or deleted, which the archive must follow
        (whether or not a copy made it there before the delete)."""
        found = await self._when_gone(keys=[keys.outbox_state_key(record.job_id)], args=[record.id])
        if found[0] == "deleted" and not await self._forget(record, taken_ms):
            return
        await self._settled(record, taken_ms)

    async def _forget(self, record: Record, taken_ms: int) -> bool:
        """Delete the job from the archive; False if it could not (the record is retried)."""
        try:
            if self._time_left() <= 0:
                raise TimeoutError("no time left in this pass")
            async with asyncio.timeout(self._time_left()):
                await self._archive.delete(record.job_id)
        except Exception as exc:
            self._down = self._down or _unreachable(exc)
            logger.warning("archiver: job %s, deleted, waits to be deleted from the archive: %s", record.job_id, exc)
            await self._retry(record, taken_ms)
            return False
        return True

    async def _settled(self, record: Record, taken_ms: int) -> None:
        await self._outbox.settle(CONSUMER, record, self._token, "done")
        following = await self._next_ending(record.job_id, taken_ms)
        if following is not None:  # never expected (one ending per job): looked at again at once
            await self._outbox.settle(CONSUMER, following, self._token, "release")
            await self._outbox.reschedule(CONSUMER, record.job_id, taken_ms, now_ms(), KEEP)

    async def _read_firsts(self, job_ids: list[str], page: int) -> list[tuple[dict[str, str], list[Any], str | None]]:
        """Each job's metadata, first ``page`` events and snapshot text, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(keys.meta_key(job_id))
                pipe.xrange(keys.events_key(job_id), count=page)
                pipe.get(keys.output_key(job_id))
            replies = await pipe.execute()
        Read = tuple[dict[str, str], list[Any], str | None]
        return [cast(Read, tuple(replies[i : i + 3])) for i in range(0, len(replies), 3)]

    async def _rest(self, job_id: str, first: list[Any], asked: int) -> list[Any]:
        """The job's events: ``first`` (``asked`` were asked for), then the rest, READ_PAGE_EVENTS
        per round trip (a long stream read in one command would hold up Redis's other clients)."""
        events, got = list(first), len(first)
        while got and got >= asked:
            more = cast(
                list[Any],
                await self._redis.xrange(keys.events_key(job_id), min=f"({events[-1][0]}", count=READ_PAGE_EVENTS),
            )
            events += more
            got, asked = len(more), READ_PAGE_EVENTS
        return events

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
                async with asyncio.timeout(SWEEP_TIMEOUT_S):
                    deleted = await self._archive.delete_expired(now_ms(), SWEEP_BATCH)
            except Exception as exc:
                logger.warning("archiver: the archive's retention sweep failed: %s", exc)
                continue
            archive_deleted.inc(deleted)
            if deleted:
                logger.info("archiver: %d jobs past the archive's retention deleted", deleted)


def _job_keys(job_id: str) -> list[str]:
    return [keys.meta_key(job_id), keys.events_key(job_id), keys.output_key(job_id)]
