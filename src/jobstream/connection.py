"""Redis clients: pools with deliberate sizes and timeouts, and a bounded connect retry."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

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


def create_client(settings: Settings, *, blocking_reads: bool = False) -> aioredis.Redis:
    """The client a gateway or worker uses: through Redis Sentinel when sentinels are configured
    (it follows the master across failovers), else straight to JOBSTREAM_REDIS_URL."""
    if settings.redis_sentinels:
        return _sentinel_client(settings, blocking_reads=blocking_reads)
    return create_redis(settings.effective_redis_url, blocking_reads=blocking_reads)


def _sentinel_client(settings: Settings, *, blocking_reads: bool) -> aioredis.Redis:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        socket_timeout=COMMAND_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )
    socket_timeout = MAX_BLOCK_MS / 1000 + COMMAND_TIMEOUT_S if blocking_reads else COMMAND_TIMEOUT_S
    client: aioredis.Redis = sentinel.master_for(
        settings.redis_master_name,
        socket_timeout=socket_timeout,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        # Sentinel's pool does not wait for a free connection: allow more than the plain pool.
        max_connections=4 * MAX_CONNECTIONS,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[ConnectionError, TimeoutError],
        decode_responses=True,
    )
    return client


def create_redis(url: str, *, max_connections: int = MAX_CONNECTIONS, blocking_reads: bool = False) -> aioredis.Redis:
    """A client whose pool waits (up to a bound) for a free connection instead of failing.

    ``blocking_reads`` raises the socket timeout above MAX_BLOCK_MS: redis-py's default would cut an
    ``XREAD BLOCK`` that waits longer than the socket timeout.
    """
    socket_timeout = MAX_BLOCK_MS / 1000 + COMMAND_TIMEOUT_S if blocking_reads else COMMAND_TIMEOUT_S
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=COMMAND_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=socket_timeout,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[ConnectionError, TimeoutError],
        decode_responses=True,
    )
    return aioredis.Redis(connection_pool=pool)


async def wait_for_redis(client: aioredis.Redis, *, attempts: int = 5, delay_s: float = 1.0) -> None:
    """Ping until Redis answers, logging each failure; re-raise after the last attempt."""
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            return
        except (ConnectionError, TimeoutError) as exc:
            remaining = attempts - attempt
            if remaining == 0:
                raise
            logger.warning("redis connection error: %s, %d retries remaining", exc, remaining)
            await asyncio.sleep(delay_s)
