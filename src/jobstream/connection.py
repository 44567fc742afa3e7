"""Redis clients: pools with deliberate sizes and timeouts, and a bounded connect retry."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterError,
    ConnectionError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from jobstream.settings import Settings

logger = logging.getLogger("jobstream.connection")

#: Commands fail fast when Redis is down, so requests answer 503 instead of hanging.
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
#: Blocking reads (XREAD/XREADGROUP BLOCK) never block longer than this; the socket timeout sits above it.
MAX_BLOCK_MS = 5000
#: Connections one process opens at most; callers beyond it wait for a free one. Redis runs commands
#: one at a time, so more connections add no throughput.
MAX_CONNECTIONS = 16
#: A pooled connection idle this long is PINGed before its next command (JOBSTREAM_REDIS_HEALTH_CHECK_S).
DEFAULT_HEALTH_CHECK_S = 30.0

#: A gateway's or worker's client: one Redis (direct or through Sentinel) or a Redis Cluster.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster

#: Errors that mean Redis cannot answer for now: down, failing over, a cluster with a slot
#: uncovered (CLUSTERDOWN), or a slot mid-migration (TRYAGAIN, or redis-py's "TTL exhausted" when
#: its async cluster client sends ASKING on another pooled connection than the redirected command).
#: Producers retry them; requests answer 503 with Retry-After.
UNAVAILABLE: tuple[type[Exception], ...] = (
    ConnectionError,
    TimeoutError,
    ClusterError,
    TryAgainError,
    SlotNotCoveredError,
)


def create_client(settings: Settings, *, blocking_reads: bool = False) -> RedisClient:
    """The client a gateway or worker uses: a cluster client when JOBSTREAM_REDIS_CLUSTER is set
    (JOBSTREAM_REDIS_URL names any one node), through Redis Sentinel when sentinels are configured
    (it follows the master across failovers), else straight to JOBSTREAM_REDIS_URL."""
    health_check_s = settings.redis_health_check_s
    if settings.redis_cluster:
        return _cluster_client(
            settings.effective_redis_url, blocking_reads=blocking_reads, health_check_s=health_check_s
        )
    if settings.redis_sentinels:
        return _sentinel_client(settings, blocking_reads=blocking_reads)
    return create_redis(settings.effective_redis_url, blocking_reads=blocking_reads, health_check_s=health_check_s)


def _socket_timeout(blocking_reads: bool) -> float:
    return MAX_BLOCK_MS / 1000 + COMMAND_TIMEOUT_S if blocking_reads else COMMAND_TIMEOUT_S


class BoundedRedisCluster(RedisCluster):
    """redis-py's cluster client fails a command at once when a node's pool is full; this one
    waits for a free turn instead, like the single-Redis pool, so a burst of readers queues
    rather than getting 503s."""

    def __init__(self, *args: Any, concurrency: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(concurrency)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._turns:
            return await super().execute_command(*args, **kwargs)


def _cluster_client(url: str, *, blocking_reads: bool, health_check_s: float) -> RedisCluster:
    return BoundedRedisCluster.from_url(
        url,
        concurrency=MAX_CONNECTIONS,
        # Above `concurrency`: pipelines take connections outside the turns.
        max_connections=4 * MAX_CONNECTIONS,
        socket_timeout=_socket_timeout(blocking_reads),
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=health_check_s,
        # Enough attempts, with topology refreshes between them, to outlast a replica's promotion.
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=6),
        decode_responses=True,
    )


async def ping(client: RedisClient) -> None:
    """Raises unless Redis answers; on a cluster, every master must."""
    if isinstance(client, RedisCluster):
        await client.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.ping()


def _sentinel_client(settings: Settings, *, blocking_reads: bool) -> aioredis.Redis:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        socket_timeout=COMMAND_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    client: aioredis.Redis = sentinel.master_for(
        settings.redis_master_name,
        socket_timeout=_socket_timeout(blocking_reads),
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        # Sentinel's pool does not wait for a free connection: allow more than the plain pool.
        max_connections=4 * MAX_CONNECTIONS,
        health_check_interval=settings.redis_health_check_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[ConnectionError, TimeoutError],
        decode_responses=True,
    )
    return client


class QuickPool(aioredis.BlockingConnectionPool):
    """redis-py's waiting pool, with a fast path: when a connected connection is free and nobody
    waits for one, take it at once. The stock path takes a condition, a timeout, a lock and a
    readiness probe of the socket for every command: 53 µs of CPU per HGETALL against 32 here
    (bench/RESULTS.md). The probe is what the fast path skips, and it is not needed there: redis-py
    closes a connection whose command was interrupted (send or read), so a free connection that is
    still connected holds no stray reply; one the server closed fails its next command, which the
    client's retry reconnects."""

    async def get_connection(self, *args: Any, **options: Any) -> Any:
        free = self._available_connections
        if free and free[-1].is_connected and not getattr(self._condition, "_waiters", None):
            connection = free.pop()
            self._in_use_connections.add(connection)
            return connection
        return await super().get_connection(*args, **options)  # type: ignore[no-untyped-call]


def create_redis(
    url: str,
    *,
    max_connections: int = MAX_CONNECTIONS,
    blocking_reads: bool = False,
    health_check_s: float = DEFAULT_HEALTH_CHECK_S,
) -> aioredis.Redis:
    """A client whose pool waits (up to a bound) for a free connection instead of failing.

    ``blocking_reads`` raises the socket timeout above MAX_BLOCK_MS: redis-py's default would cut an
    ``XREAD BLOCK`` that waits longer than the socket timeout.
    """
    pool = QuickPool.from_url(
        url,
        max_connections=max_connections,
        timeout=COMMAND_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=_socket_timeout(blocking_reads),
        health_check_interval=health_check_s,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[ConnectionError, TimeoutError],
        decode_responses=True,
    )
    return aioredis.Redis(connection_pool=pool)


async def wait_for_redis(client: RedisClient, *, attempts: int = 5, delay_s: float = 1.0) -> None:
    """Ping until Redis answers, logging each failure; re-raise after the last attempt."""
    for attempt in range(1, attempts + 1):
        try:
            await ping(client)
            return
        except UNAVAILABLE as exc:
            remaining = attempts - attempt
            if remaining == 0:
                raise
            logger.warning("redis connection error: %s, %d retries remaining", exc, remaining)
            await asyncio.sleep(delay_s)
