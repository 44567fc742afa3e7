"""Per-user running slots (``JOBSTREAM_MAX_RUNNING_PER_USER``): a worker starts a job only while
its owner has fewer jobs running than the cap. The others are parked: taken off the queue (no
worker holds or re-reads them, and other users' jobs pass), kept in order, and put back onto the
queue, oldest first, as the owner's slots free.

A Lua script touches the keys of one hash tag only (a Redis Cluster runs it on one slot), so a
user's state lives in the user's slot (``keys.user_key``), in three sorted sets:

- ``running``: job id -> when its slot lapses (epoch ms). The worker running the job renews it with
  the job's queue lease and removes it when the run ends, whichever way. Its lapse is two leases,
  not one: a dead worker's job is reclaimed after one lease (looked for every half lease) and is
  still ``running`` until then, so the worker that reclaims it finds the slot held and keeps it
  (a retry) or frees it at once (the job fails "worker lost"); the lapse frees it only when no
  worker reclaims the job.
- ``waiting``: job id -> its place in the queue, for every parked job not started yet. A job stays
  here until it starts, so that it keeps its place however often it is put back onto the queue.
- ``reserved``: job id -> when the reservation lapses (epoch ms): waiting jobs put back onto the
  queue, each holding a slot until a worker takes it. The queue lives in another slot, so
  reserving and queueing are two steps: a worker that dies in between leaves a reservation that
  lapses, and the job is put back again. A job put back twice is harmless: the run starts from
  one entry only (``scripts.START_ATTEMPT``).

One global sorted set, ``keys.parked_key`` (user -> when to look at them next), lets any worker
find users with waiting jobs without scanning keys: a periodic sweep, by every worker, puts back
the jobs of users whose slots freed without a run ending here (a killed worker's lapsed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from jobstream import keys, metrics
from jobstream.connection import RedisClient
from jobstream.models import JobStatus
from jobstream.queue import QueueEntry, WorkQueue
from jobstream.settings import Settings
from jobstream.store import now_ms

#: How often each worker sweeps the users with waiting jobs; each user is due every SWEEP_EVERY_S,
#: whichever worker looks.
SWEEP_EVERY_S = 2.0
#: Users one sweep looks at, at most, and jobs one step puts back onto the queue, at most (a step
#: of a user at no cap, whose jobs all go).
SWEEP_USERS = 100
PUT_BACK_MOST = 100

#: Shared by the scripts of one user's slots. KEYS: running, waiting, reserved.
#: ARGV: now_ms, cap (0: none), lapse_ms (of a slot and of a reservation), most to put back.
#: Drops lapsed slots and reservations; defines promote(), which reserves the free slots for the
#: oldest waiting jobs not reserved yet and returns them, for the caller to queue in that order.
_SLOTS = """
local running, waiting, reserved = KEYS[1], KEYS[2], KEYS[3]
local now, cap, lapse_ms, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lapse_at = now + lapse_ms
redis.call('ZREMRANGEBYSCORE', running, '-inf', now)
redis.call('ZREMRANGEBYSCORE', reserved, '-inf', now)
local function promote()
  local held = redis.call('ZCARD', reserved)
  local free = most
  if cap > 0 then free = math.min(most, cap - redis.call('ZCARD', running) - held) end
  local chosen = {}
  if free <= 0 then return chosen end
  -- At most `held` of the first free + held waiting jobs are reserved already.
  for _, job in ipairs(redis.call('ZRANGE', waiting, 0, free + held - 1)) do
    if #chosen == free then break end
    if not redis.call('ZSCORE', reserved, job) then
      redis.call('ZADD', reserved, lapse_at, job)
      chosen[#chosen + 1] = job
    end
  end
  if #chosen > 0 then redis.call('PEXPIRE', reserved, lapse_ms) end
  return chosen
end
"""

#: May a job taken from the queue start? ARGV[5]: the job, ARGV[6]: its place (the order of its
#: queue entry; a waiting job keeps the place it had), ARGV[7]: '1' if it started before (a run
#: whose worker was lost: still `running`, it keeps its slot, even over the cap).
#: Returns {'run'} (its slot is held: counted from now on) | {'free'} (no cap: not counted) |
#: {'parked', jobs to put back onto the queue...}.
ADMIT = (
    _SLOTS
    + """
local job = ARGV[5]
local place = redis.call('ZSCORE', waiting, job) or ARGV[6]
if cap == 0 then
  -- No cap (any more): a job a capped worker left waiting just runs.
  redis.call('ZREM', waiting, job)
  redis.call('ZREM', reserved, job)
  return {'free'}
end
local function run()
  redis.call('ZADD', running, lapse_at, job)
  redis.call('PEXPIRE', running, lapse_ms)
  redis.call('ZREM', waiting, job)
  redis.call('ZREM', reserved, job)
  return {'run'}
end
-- Started before, its slot held already (another entry of the job), or reserved for it.
if ARGV[7] == '1' or redis.call('ZSCORE', running, job) or redis.call('ZSCORE', reserved, job) then
  return run()
end
local held = redis.call('ZCARD', reserved)
if cap - redis.call('ZCARD', running) - held > 0 then
  -- A free slot, unless a job queued before this one waits for it (reserved ones have their own).
  local ahead = false
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', waiting, '-inf', '(' .. place, 'LIMIT', 0, held + 1)) do
    if not redis.call('ZSCORE', reserved, other) then
      ahead = true
      break
    end
  end
  if not ahead then return run() end
end
redis.call('ZADD', waiting, 'NX', place, job)
local reply = {'parked'}
for _, other in ipairs(promote()) do reply[#reply + 1] = other end
return reply
"""
)

#: A job no longer runs (ended, gone) or never will (met ended while waiting): its slot, place and
#: reservation go. ARGV[5]: the job. Returns the jobs to put back onto the queue.
RELEASE = (
    _SLOTS
    + """
redis.call('ZREM', running, ARGV[5])
redis.call('ZREM', waiting, ARGV[5])
redis.call('ZREM', reserved, ARGV[5])
return promote()
"""
)

#: A sweep's look at one user. Returns {jobs still waiting (reserved included), jobs to put back...}.
REBALANCE = (
    _SLOTS
    + """
local reply = {redis.call('ZCARD', waiting)}
for _, job in ipairs(promote()) do reply[#reply + 1] = job end
return reply
"""
)

#: The users due for a look, each made due again at ARGV[2] (so that another worker's sweep skips
#: them meanwhile, and a worker that dies mid-sweep leaves them registered). KEYS: parked.
#: ARGV: now_ms, next due (ms), most users.
CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, user in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], user) end
return due
"""

#: Forget a user found with no waiting job, unless a job was parked since the look (parking makes
#: the user due at once, score 0). KEYS: parked. ARGV: user, the due time CLAIM_DUE gave.
UNREGISTER = """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
"""


@dataclass(frozen=True, slots=True)
class Admission:
    """What ``admit`` decided for one queue entry: ``parked`` (its entry is off the queue: nothing
    more to do), else the job may start; ``owner`` names whose slots to tidy when the run ends
    (None: nothing to tidy, as with no cap)."""

    entry: QueueEntry
    owner: str | None = None
    parked: bool = False


class UserSlots:
    """One worker's side of the per-user running slots (see the module docstring)."""

    def __init__(self, client: RedisClient, queue: WorkQueue, settings: Settings) -> None:
        self._redis = client
        self._queue = queue
        self.cap = settings.max_running_per_user
        self._lapse_ms = 2 * settings.worker_lease_s * 1000
        self._admit = client.register_script(ADMIT)
        self._release = client.register_script(RELEASE)
        self._rebalance = client.register_script(REBALANCE)
        self._claim_due = client.register_script(CLAIM_DUE)
        self._unregister = client.register_script(UNREGISTER)
        #: The entries whose runs hold a slot here (renewed with their leases) and the slots'
        #: owners; by entry: two entries of one job may meet on one worker (a duplicate).
        self._held: dict[QueueEntry, str] = {}
        # One admission at a time, in the order the entries were taken: a batch taken at once
        # starts its oldest job first.
        self._in_order = asyncio.Lock()

    async def admit(self, entry: QueueEntry) -> Admission:
        """Hold a slot for the job of ``entry``, or park the job (and take its entry off the queue).
        A job gone or ended is let through: its run finds so, and ``release`` tidies its place."""
        if not self.cap and entry.owner is None:
            return Admission(entry)
        async with self._in_order:
            fields = ["owner", "status", "attempt"]
            found = cast(list[str | None], await self._redis.hmget(keys.meta_key(entry.job_id), fields))
            owner, status, attempt = found
            owner = owner or entry.owner
            if owner is None or status is None or JobStatus(status).terminal:
                return Admission(entry, owner)
            started = "1" if int(attempt or 0) else ""
            reply = await self._admit(
                keys=_slot_keys(owner), args=[*self._args(), entry.job_id, _place(entry.entry_id), started]
            )
        if reply[0] == "free":
            return Admission(entry)
        if reply[0] == "run":
            self._held[entry] = owner
            return Admission(entry, owner)
        metrics.jobs_parked.inc()
        # Registered before its entry goes: a worker that dies in between leaves the entry, which
        # is reclaimed and parked again.
        await self._redis.zadd(keys.parked_key, {owner: 0})
        await self._put_back(owner, reply[1:])
        await self._queue.finish(entry.entry_id)
        return Admission(entry, parked=True)

    async def release(self, admission: Admission) -> None:
        """The job's run is over (or it never ran: gone, ended): free its slot and put back the
        owner's next waiting jobs."""
        self.forget(admission)
        if admission.owner is not None:
            args: list[int | str] = [*self._args(), admission.entry.job_id]
            promoted = await self._release(keys=_slot_keys(admission.owner), args=args)
            await self._put_back(admission.owner, promoted)

    def forget(self, admission: Admission) -> None:
        """Stop renewing the job's slot, whatever became of the run: released, or left to lapse
        (a run cut short by a shutdown or by Redis, whose job is reclaimed)."""
        self._held.pop(admission.entry, None)

    async def renew(self) -> None:
        """Push back the lapse of every slot this worker's runs hold (with their queue leases). Only
        slots still there: a run that ended meanwhile must not get its slot back."""
        if not self._held:
            return
        lapse_at = now_ms() + self._lapse_ms
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry, owner in self._held.items():
                running = keys.user_key(owner, "running")
                pipe.zadd(running, {entry.job_id: lapse_at}, xx=True)
                pipe.pexpire(running, self._lapse_ms)
            await pipe.execute()

    async def sweep(self) -> None:
        """Put back the waiting jobs of users due for a look whose slots freed without a run ending
        here (a killed worker's lapsed, a reservation lapsed); forget users with none waiting."""
        next_due_ms = now_ms() + int(SWEEP_EVERY_S * 1000)
        users: list[str] = await self._claim_due(keys=[keys.parked_key], args=[now_ms(), next_due_ms, SWEEP_USERS])
        for owner in users:
            waiting, *promoted = await self._rebalance(keys=_slot_keys(owner), args=self._args())
            await self._put_back(owner, promoted)
            if not int(waiting):
                await self._unregister(keys=[keys.parked_key], args=[owner, next_due_ms])

    async def _put_back(self, owner: str, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            await self._queue.add(job_id, owner)

    def _args(self) -> list[int]:
        return [now_ms(), self.cap, self._lapse_ms, PUT_BACK_MOST]


def _slot_keys(owner: str) -> list[str]:
    return [keys.user_key(owner, "running"), keys.user_key(owner, "waiting"), keys.user_key(owner, "reserved")]


def _place(entry_id: str) -> int:
    """A job's place among its owner's: its queue entry's order (``<ms>-<seq>``), as a sorted-set
    score (exact below 2**53: ms * 1000 leaves room for 1000 entries a millisecond)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms) * 1000 + min(int(seq or 0), 999)
