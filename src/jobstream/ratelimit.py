"""Limits shared by every gateway through Redis: create rate per user, open connections per user
(or, for a job's read-token readers, per job)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from limits import parse

from jobstream import keys
from jobstream.connection import RedisClient

RATE_LIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        headers = dict(zip(RATE_LIMIT_HEADERS, (str(self.limit), str(self.remaining), str(self.reset_s)), strict=True))
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_s))
        return headers


#: The `limits` library's moving window (its list of hit times, newest first, at most `limit`
#: long), with the hit and the window's stats in one step, where `limits` takes two round trips
#: (its hit, then its window stats). KEYS: the user's window. ARGV: now (epoch seconds), limit,
#: expiry (seconds). Returns {allowed (1|0), hits in the window, the oldest of them ('' if none)}.
_HIT = """
local now, limit, expiry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local start = now - expiry
local last = redis.call('LINDEX', KEYS[1], limit - 1)
local allowed = 0
if not last or tonumber(last) < start then
  redis.call('LPUSH', KEYS[1], ARGV[1])
  redis.call('LTRIM', KEYS[1], 0, limit - 1)
  redis.call('EXPIRE', KEYS[1], expiry)
  allowed = 1
end
-- The oldest hit still in the window, by binary search (the list is newest first), as `limits`
-- finds it: a walk of the whole window would cost a busy user's creates their window's length.
local low, high, found = 0, math.min(limit, redis.call('LLEN', KEYS[1])) - 1, nil
while low <= high do
  local mid = math.floor((low + high) / 2)
  local at = tonumber(redis.call('LINDEX', KEYS[1], mid))
  if at and at >= start then
    found, low = mid, mid + 1
  else
    high = mid - 1
  end
end
if not found then return {allowed, 0, ''} end
return {allowed, found + 1, redis.call('LINDEX', KEYS[1], found)}
"""


class CreateLimiter:
    """Creates per user in a moving window (the rate parsed by `limits`, e.g. ``60/minute``), on
    the gateway's own client, single Redis or cluster alike (one key per user)."""

    def __init__(self, client: RedisClient, rate: str) -> None:
        self._item = parse(rate)
        self._expiry_s = self._item.get_expiry()
        self._hit = client.register_script(_HIT)

    async def hit(self, user: str) -> RateDecision:
        now = time.time()
        key = f"{keys.rate_limit_prefix}:create:{self._item.amount}/{self._expiry_s}:{user}"
        allowed, hits, oldest = await self._hit(keys=[key], args=[repr(now), self._item.amount, self._expiry_s])
        reset_at = float(oldest) + self._expiry_s if oldest else now
        reset_s = max(0, math.ceil(reset_at - time.time()))
        return RateDecision(bool(allowed), self._item.amount, max(0, self._item.amount - int(hits)), reset_s)


#: Drop expired leases, then take one if the holder has fewer than the limit.
#: KEYS: the holder's lease set. ARGV: now_ms, expires_ms, lease id, limit, key ttl_ms.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


class ConnectionLeases:
    """Open connections per holder (a user's event streams or waiting long-polls; a job's
    read-token streams), as leases in a sorted set scored by expiry.

    A gateway renews the leases of its open connections; if it dies they expire by themselves.
    """

    def __init__(
        self, client: RedisClient, limit: int, lease_s: int, key: Callable[[str], str] = keys.sse_leases_key
    ) -> None:
        self._redis = client
        self._key = key
        self.limit = limit
        self.lease_s = lease_s
        self._lease_ms = lease_s * 1000
        self._acquire = client.register_script(_ACQUIRE)
        self._others: dict[tuple[Callable[[str], str], int], ConnectionLeases] = {}

    def counted_by(self, key: Callable[[str], str], limit: int) -> ConnectionLeases:
        """Leases like these (same Redis, same length, renewed the same way) under other keys
        with another limit, e.g. a job's read-token streams per job; made once, then reused."""
        other = self._others.get((key, limit))
        if other is None:
            other = self._others[(key, limit)] = ConnectionLeases(self._redis, limit, self.lease_s, key)
        return other

    async def acquire(self, user: str) -> str | None:
        lease = uuid.uuid4().hex
        now = _now_ms()
        args: list[int | str] = [now, now + self._lease_ms, lease, self.limit, self._lease_ms * 2]
        taken = await self._acquire(keys=[self._key(user)], args=args)
        return lease if taken else None

    async def renew(self, user: str, lease: str) -> None:
        key = self._key(user)
        await self._redis.zadd(key, {lease: _now_ms() + self._lease_ms}, xx=True)
        await self._redis.pexpire(key, self._lease_ms * 2)

    async def release(self, user: str, lease: str) -> None:
        await self._redis.zrem(self._key(user), lease)

    async def count(self, user: str) -> int:
        return int(await self._redis.zcount(self._key(user), _now_ms(), "+inf"))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
