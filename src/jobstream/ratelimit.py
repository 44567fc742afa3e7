"""Limits shared by every gateway through Redis: create rate per user, open connections per user
(or, for a job's read-token readers, per job)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from limits import parse
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio.cluster import RedisCluster

from jobstream import keys
from jobstream.connection import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S, MAX_CONNECTIONS, RedisClient

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


class CreateLimiter:
    """The `limits` moving window on Redis: on the gateway's connection pool, or on a Redis
    Cluster through the library's own cluster client (it takes no client from outside)."""

    def __init__(self, client: RedisClient, redis_url: str, rate: str) -> None:
        self._item = parse(rate)
        self._storage: RedisStorage | RedisClusterStorage
        if isinstance(client, RedisCluster):
            # The moving window is one key per user, so any node's slot serves.
            self._storage = RedisClusterStorage(
                "async+redis+cluster://" + urlsplit(redis_url).netloc,
                implementation="redispy",
                key_prefix=keys.rate_limit_prefix,
                max_connections=MAX_CONNECTIONS,
                socket_timeout=COMMAND_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
            )
        else:
            self._storage = RedisStorage(
                "async+" + redis_url,
                implementation="redispy",
                key_prefix=keys.rate_limit_prefix,
                connection_pool=client.connection_pool,  # type: ignore[arg-type]
            )
        self._limiter = MovingWindowRateLimiter(self._storage)

    async def hit(self, user: str) -> RateDecision:
        allowed = await self._limiter.hit(self._item, "create", user)
        stats = await self._limiter.get_window_stats(self._item, "create", user)
        reset_s = max(0, math.ceil(stats.reset_time - time.time()))
        return RateDecision(allowed, self._item.amount, max(0, stats.remaining), reset_s)


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
