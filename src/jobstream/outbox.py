"""The durable outbox: what a job's status moves must be followed by, kept until every consumer
has settled it, whatever dies meanwhile.

The script that moves a job's status (scripts._WRITE) writes a record of the move into the job's
outbox stream in the same step, when the job's consumers want that status (its meta field
``outbox``, set at create): no move without its record. Each consumer (webhooks.py) has a *due
set*, a sorted set of jobs scored by when to look at them: a job is registered there when it is
created (looked at after REGISTERED_LOOK_MS, then every IDLE_LOOK_MS while it has not ended; this
is what finds a record whose writer died before telling anyone), and nudged right after each
record is written (the fast path). A consumer *takes* due jobs (their score moved past a lease so
that other processes leave them alone), *claims* a job's next record (leased in the job's own
state hash: never two deliveries of one job at once, records in order), then *settles* it: done
(on to the next record) or retry at a given time. A lease that lapses (its process died) lets
another process take the job again: at least once.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from jobstream import keys, metrics
from jobstream.connection import RedisClient
from jobstream.pipelines import ScriptCall

#: Records outlive their job: deliveries are retried for at least a day, even when the job's own
#: retention is minutes. Every claim and settle extends it.
OUTBOX_TTL_S = 3 * 86400
#: A job registered at create is first looked at this long after (by then its create has landed).
REGISTERED_LOOK_MS = 60_000
#: A job that has not ended, with nothing to settle, is looked at again this long after.
IDLE_LOOK_MS = 60_000
WEBHOOK_CONSUMER = "webhook"
ARCHIVE_CONSUMER = "archive"
#: Every consumer of outboxes (a job's own are named in its meta field ``consumers``).
CONSUMERS = (WEBHOOK_CONSUMER, ARCHIVE_CONSUMER)

#: Open a new job's outbox: an empty stream, so that the script that moves the job's status finds
#: it where the job's other keys are (it names it without declaring it: see scripts._WRITE), and
#: the job's consumers, so that the outbox is deleted only once each has finished with it.
#: KEYS: outbox, state. ARGV: ttl_s, consumers (comma-joined).
_OPEN = """
redis.call('XADD', KEYS[1], '*', 'open', '1')
redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
redis.call('HSET', KEYS[2], 'consumers', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
"""

#: Register a job with a consumer (NX: never postpone a look already due), or nudge it (due at once,
#: and in the backlog from the record's time unless there already, with an older one).
#: KEYS: due, backlog. ARGV: job, due_ms, 'NX' | '', record_ms ('' = none).
_NUDGE = """
if ARGV[3] == 'NX' then redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
else redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) end
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[1]) end
"""

#: Take up to n due jobs: each is scored at the lease's end, so that no other process takes it
#: meanwhile. KEYS: due. ARGV: now_ms, lease_end_ms, n. Returns the jobs.
_TAKE = """
local jobs = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, job in ipairs(jobs) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], job) end
return jobs
"""

#: Say when a taken job is due next ('' = never: it is finished), and its backlog score ('' =
#: none left, '-' = as it is), unless its score changed since it was taken (a record nudged it meanwhile: then it
#: stays due as nudged). KEYS: due, backlog. ARGV: job, score when taken, due_ms, backlog_ms.
#: Returns 1 if applied, else 0.
_RESCHEDULE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then redis.call('ZREM', KEYS[1], ARGV[1])
else redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) end
if ARGV[4] == '' then redis.call('ZREM', KEYS[2], ARGV[1])
elseif ARGV[4] ~= '-' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1]) end
return 1
"""

#: A consumer claims a job's next record, leased by Redis's clock (every process's lease is judged
#: by the same clock). KEYS: meta, outbox, state. ARGV: consumer, lease_ms, token (the claimer's),
#: the outbox's TTL.
#: Returns {'record', id, status, record_ms, meta JSON, attempts so far} | {'wait', until_ms} (held
#: by another, or its retry not due yet) | {'idle'} (nothing to settle; the job goes on) |
#: {'finished'} (nothing to settle, and the job has ended or is gone: nothing more will come;
#: once every consumer of the job has finished, the outbox is deleted; also for a consumer that
#: is not the job's).
_CLAIM = """
local c = ARGV[1]
local consumers = redis.call('HGET', KEYS[3], 'consumers')
if consumers and not string.find(',' .. consumers .. ',', ',' .. c .. ',', 1, true) then return {'finished'} end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local st = redis.call('HMGET', KEYS[3], c .. ':pos', c .. ':next', c .. ':lease', c .. ':attempt')
local held = tonumber(st[3] or '0')
if held > now then return {'wait', tostring(held)} end
local next_ms = tonumber(st[2] or '0')
if next_ms > now then return {'wait', tostring(next_ms)} end
local record = redis.call('XRANGE', KEYS[2], '(' .. (st[1] or '0-0'), '+', 'COUNT', 1)[1]
if not record then
  local status = redis.call('HGET', KEYS[1], 'status')
  if status and status ~= 'completed' and status ~= 'failed' and status ~= 'cancelled' then return {'idle'} end
  redis.call('HSET', KEYS[3], c .. ':finished', '1')
  for other in string.gmatch(consumers or c, '[^,]+') do
    if redis.call('HGET', KEYS[3], other .. ':finished') ~= '1' then return {'finished'} end
  end
  redis.call('DEL', KEYS[2], KEYS[3])
  return {'finished'}
end
local fields = {}
for i = 1, #record[2], 2 do fields[record[2][i]] = record[2][i + 1] end
redis.call('HSET', KEYS[3], c .. ':lease', now + tonumber(ARGV[2]), c .. ':token', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {'record', record[1], fields['status'], fields['at'], fields['meta'], st[4] or '0'}
"""

#: Settle a claimed record: 'done' (delivered, or given up: the consumer's position moves past it,
#: whoever holds the lease now, and the next record starts afresh; a record is never settled
#: twice), 'retry' at next_ms (one more attempt counted) or 'release' (not attempted); both only by
#: the lease's holder. KEYS: outbox, state. ARGV: consumer, token, record id, outcome, next_ms, the outbox's TTL.
_SETTLE = """
local c = ARGV[1]
local st = redis.call('HMGET', KEYS[2], c .. ':pos', c .. ':token')
local mine = st[2] == ARGV[2]
local function later(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  return am > bm or (am == bm and tonumber(as) > tonumber(bs))
end
if ARGV[4] == 'done' then
  if not st[1] or later(ARGV[3], st[1]) then
    redis.call('HSET', KEYS[2], c .. ':pos', ARGV[3], c .. ':attempt', '0', c .. ':next', '0')
  end
  if mine then redis.call('HSET', KEYS[2], c .. ':lease', '0') end
elseif mine then
  if ARGV[4] == 'retry' then
    redis.call('HINCRBY', KEYS[2], c .. ':attempt', 1)
    redis.call('HSET', KEYS[2], c .. ':next', ARGV[5])
  end
  redis.call('HSET', KEYS[2], c .. ':lease', '0')
end
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[6])
"""


class Keep(enum.Enum):
    """A backlog score left as it is."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a job's outbox, as a consumer claimed it."""

    job_id: str
    id: str
    #: The status the job moved to.
    status: str
    #: When (epoch ms).
    at_ms: int
    #: The job's metadata as it was right after the move (its input left out).
    meta: dict[str, str]
    #: Attempts that failed so far.
    failed_attempts: int


@dataclass(frozen=True, slots=True)
class Claim:
    kind: Literal["record", "wait", "idle", "finished"]
    record: Record | None = None
    #: For 'wait': when the job may be claimed again (epoch ms).
    until_ms: int = 0


class Outbox:
    """Every consumer's view of the outboxes: register and nudge (the writers' side), take, claim,
    settle and reschedule (a consumer's)."""

    def __init__(self, client: RedisClient) -> None:
        self._redis = client
        self._nudge = client.register_script(_NUDGE)
        self._take = client.register_script(_TAKE)
        self._reschedule = client.register_script(_RESCHEDULE)
        self._claim = client.register_script(_CLAIM)
        self._open = client.register_script(_OPEN)
        self._settle = client.register_script(_SETTLE)

    def create_calls(self, job_id: str, now_ms: int, ttl_s: int, consumers: Sequence[str]) -> list[ScriptCall]:
        """The calls that open a new job's outbox and register the job with its consumers, to
        send before its create (``ttl_s``: the job's own)."""
        due = now_ms + REGISTERED_LOOK_MS
        opening: ScriptCall = (self._open, _job_keys(job_id)[1:], [ttl_s + OUTBOX_TTL_S, ",".join(consumers)])
        return [opening] + [(self._nudge, _consumer_keys(consumer), [job_id, due, "NX", ""]) for consumer in consumers]

    async def nudge(self, job_id: str, record_ms: int, now_ms: int, consumers: Sequence[str]) -> None:
        """Tell the job's consumers that it has a new record: due at once."""
        calls = [
            self._nudge(keys=_consumer_keys(consumer), args=[job_id, now_ms, "", record_ms]) for consumer in consumers
        ]
        await asyncio.gather(*calls)

    async def take(self, consumer: str, n: int, now_ms: int, lease_end_ms: int) -> list[str]:
        return cast(list[str], await self._take(keys=[keys.outbox_due_key(consumer)], args=[now_ms, lease_end_ms, n]))

    async def reschedule(
        self, consumer: str, job_id: str, taken_ms: int, due_ms: int | None, backlog_ms: int | None | Keep
    ) -> bool:
        """Due next at ``due_ms`` (None: finished), in the backlog from ``backlog_ms`` (None: not;
        KEEP: as it is), unless nudged since taken (at ``taken_ms``)."""
        backlog: str | int = "-" if backlog_ms is KEEP else "" if backlog_ms is None else backlog_ms
        args: list[str | int] = [job_id, taken_ms, "" if due_ms is None else due_ms, backlog]
        return bool(await self._reschedule(keys=_consumer_keys(consumer), args=args))

    async def claim(self, consumer: str, job_id: str, token: str, lease_ms: int) -> Claim:
        reply: list[Any] = await self._claim(keys=_job_keys(job_id), args=[consumer, lease_ms, token, OUTBOX_TTL_S])
        kind = reply[0]
        if kind == "record":
            _, record_id, status, at_ms, meta, attempts = reply
            return Claim("record", Record(job_id, record_id, status, int(at_ms), json.loads(meta), int(attempts)))
        if kind == "wait":
            return Claim("wait", until_ms=int(reply[1]))
        return Claim(kind)

    async def settle(
        self, consumer: str, record: Record, token: str, outcome: Literal["done", "retry", "release"], next_ms: int = 0
    ) -> None:
        await self._settle(
            keys=_job_keys(record.job_id)[1:], args=[consumer, token, record.id, outcome, next_ms, OUTBOX_TTL_S]
        )

    async def stats(self, consumers: Sequence[str]) -> dict[str, metrics.BacklogStats]:
        """Each consumer's backlog, for a scrape."""
        found = {}
        for consumer in consumers:
            pending, oldest_ms = await self.backlog(consumer)
            age_s = max(0.0, time.time() - oldest_ms / 1000) if oldest_ms is not None else 0.0
            found[consumer] = metrics.BacklogStats(pending_jobs=pending, oldest_pending_age_s=round(age_s, 3))
        return found

    async def backlog(self, consumer: str) -> tuple[int, int | None]:
        """Jobs with records not settled yet, and the oldest such record's time (epoch ms; None: none)."""
        key = keys.outbox_backlog_key(consumer)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(key)
            pipe.zrange(key, 0, 0, withscores=True)
            count, oldest = await pipe.execute()
        return int(count), int(oldest[0][1]) if oldest else None


def _consumer_keys(consumer: str) -> list[str]:
    return [keys.outbox_due_key(consumer), keys.outbox_backlog_key(consumer)]


def _job_keys(job_id: str) -> list[str]:
    return [keys.meta_key(job_id), keys.outbox_key(job_id), keys.outbox_state_key(job_id)]
