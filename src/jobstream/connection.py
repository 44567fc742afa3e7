"""Redis clients: pools with deliberate sizes and timeouts, and a bounded connect retry."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterError,
    ConnectionError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from jobstream import sentry
from jobstream.settings import Settings

logger = logging.getLogger("jobstream.connection")

#: Commands fail fast when Redis is down, so requests answer 503 instead of hanging.
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0
#: Blocking reads (XREAD/XREADGROUP BLOCK) never block longer than this; the socket timeout sits above it.
MAX_BLOCK_MS = 5000
#: Connections one process opens at most; callers beyond it wait for a free one. Redis runs commands
#: one at a time, so more connections add no throughput; but a caller that waits for one takes
#: redis-py's slow path (a condition and a timeout: about three times the CPU of a command on a free
#: connection, bench/RESULTS.md), so there are enough for a busy process's requests in flight.
MAX_CONNECTIONS = 32
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
    closes a connection whose command was interrupted (send or read), and so does QuickRedis, so a
    free connection that is still connected holds no stray reply; one the server closed fails its
    next command, which the client's retry (or QuickRedis's one retry) reconnects.

    ``take_ready`` and ``give_back`` are QuickRedis's synchronous halves of ``get_connection`` and
    ``release``; when every connection is in use, QuickRedis's callers queue in ``wait_ready`` and
    each connection given back is handed to the first of them, still in use: redis-py's own wait
    (a condition, a timeout, a lock) costs a busy process about as much as the command itself.
    They lean on redis-py internals (redis 8.1; tests/test_quickcommand.py checks them): the
    pool's ``_available_connections`` list (LIFO) and ``_in_use_connections`` set, its
    ``_in_maintenance`` flag, and its asyncio.Condition's ``_waiters`` deque."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: QuickRedis's callers waiting for a connection, first come first served: each is handed
        #: one (or None: take redis-py's path, where a connection is free to be connected).
        self._queue: collections.deque[asyncio.Future[AbstractConnection | None]] = collections.deque()

    async def get_connection(self, *args: Any, **options: Any) -> Any:
        free = self._available_connections
        if free and free[-1].is_connected and not getattr(self._condition, "_waiters", None):
            connection = free.pop()
            self._in_use_connections.add(connection)
            return connection
        return await super().get_connection(*args, **options)  # type: ignore[no-untyped-call]

    def take_ready(self) -> AbstractConnection | None:
        """A free connection that can take a command now without any preliminaries, marked in use;
        None when the stock path must run: none is free and connected, a task waits for one (not
        to overtake it), the pool is in maintenance (MOVING handling rewrites it under its lock),
        or the connection's health check is due (the stock path PINGs first)."""
        free = self._available_connections
        if not free or self._in_maintenance or self._condition._waiters or self._queue:
            return None
        connection = free[-1]
        if not connection.is_connected:
            return None
        # As AbstractConnection.check_health decides.
        if connection.health_check_interval and asyncio.get_running_loop().time() > connection.next_health_check:
            return None
        free.pop()
        self._in_use_connections.add(connection)
        return connection

    def give_back(self, connection: AbstractConnection) -> bool:
        """Return a connection to the free list at once, as ``release`` would; False, leaving it in
        use, when ``release`` must do it: a task waits (only release notifies it), the pool is in
        maintenance, or the connection is marked for reconnection."""
        reconnect = connection.should_reconnect()  # type: ignore[no-untyped-call]
        if reconnect or self._condition._waiters or self._in_maintenance:
            return False
        if not self._hand_over(connection):
            self._in_use_connections.remove(connection)
            self._available_connections.append(connection)
        return True

    def full(self) -> bool:
        """Every connection made and in use: a caller must wait for one."""
        return not self._available_connections and len(self._in_use_connections) >= self.max_connections

    async def wait_ready(self) -> AbstractConnection | None:
        """Wait in line for a connection given back (in use, now the caller's), or None when the
        caller should take redis-py's path; ConnectionError after the pool's timeout, as redis-py."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[AbstractConnection | None] = loop.create_future()
        self._queue.append(waiter)
        # A timer on the future, not a timeout around the task: nothing to cancel, nothing to uncancel.
        timer = loop.call_later(self.timeout, _expire, waiter) if self.timeout is not None else None
        try:
            return await waiter
        except BaseException:
            # Cancelled in the same moment as it was handed a connection: pass the connection on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                connection = waiter.result()
                if connection is not None and not self.give_back(connection):
                    await self.release(connection)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def release(self, connection: AbstractConnection) -> None:
        """redis-py's release, handing the connection to QuickRedis's first waiting caller instead
        when it can (redis-py's own waiters come first: only release notifies them)."""
        reconnect = connection.should_reconnect()  # type: ignore[no-untyped-call]
        if not (reconnect or self._condition._waiters or self._in_maintenance) and self._hand_over(connection):
            return
        await super().release(connection)
        self._wake_one()

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        while self._queue:  # nothing more will be given back: let them take redis-py's path
            self._wake_one()

    def _hand_over(self, connection: AbstractConnection) -> bool:
        """Give a connection to the first caller still waiting; False if none took it (none waits,
        or it is not connected: the first is woken to take redis-py's path, which connects it)."""
        while self._queue:
            waiter = self._queue.popleft()
            if waiter.done():
                continue
            if connection.is_connected:
                waiter.set_result(connection)
                return True
            waiter.set_result(None)
            return False
        return False

    def _wake_one(self) -> None:
        """Send the first caller still waiting to redis-py's path (a connection is free there)."""
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _expire(waiter: asyncio.Future[AbstractConnection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(ConnectionError("No connection available."))


class QuickRedis(aioredis.Redis):
    """A single-Redis client whose commands skip redis-py's per-command machinery when nothing
    calls for it: a free connection is taken and given back synchronously (QuickPool), the packed
    command is written straight to the socket (redis-py wraps every write in ``asyncio.wait_for``,
    on Python 3.11 a Task per command), and the reply is read with the connection's own ``read_response`` (its
    read timeout, and its disconnect when a read fails or is cancelled) and parsed by
    ``parse_response``, the response callbacks included.

    Anything else takes redis-py's own path: no free connected connection, a health check due,
    waiters, maintenance, a single-connection client, a streaming credential provider (its
    re-authentication runs on release), HIMPORT (its fieldsets are per connection). What wraps
    redis-py's ``Redis.execute_command`` does not see fast-path commands: redis-py's OpenTelemetry
    metrics (off unless configured; jobstream does not configure them). Sentry's Redis integration
    patches that method for its spans and breadcrumbs, so with Sentry on (initialised before the
    client is made, as every launch mode does) every command takes redis-py's path.

    Errors: a server's error reply (ResponseError: a Lua error, NOSCRIPT) is raised as redis-py
    raises it, the connection going back to the pool connected, as its reply was read whole. Any
    other failure leaves the connection disconnected before it goes back, so no late reply can
    reach its next user; a connection or timeout error (Redis closed the idle connection, or
    restarted) is then retried once on redis-py's path, which reconnects under the configured
    Retry, as redis-py retries today (it too sends again after a timeout).

    Relies on redis-py internals (redis 8.1; tests/test_quickcommand.py checks them): QuickPool's;
    a connection's ``_writer`` (the asyncio.StreamWriter of its socket), ``health_check_interval``
    and ``next_health_check``; ``read_response`` disconnecting when a read fails or is cancelled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pool = self.connection_pool
        self._quick_pool: QuickPool | None = None
        if (
            isinstance(pool, QuickPool)
            and not self.single_connection_client
            and pool.connection_kwargs.get("credential_provider") is None
            # Sentry's Redis integration wraps redis-py's path: with Sentry on, commands keep
            # their spans and breadcrumbs.
            and not sentry.active()
        ):
            self._quick_pool = pool
        #: Command names the fast path may run, decided once per name.
        self._lean_commands: dict[str | bytes, bool] = {}

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        pool = self._quick_pool
        command_name = args[0]
        lean = self._lean_commands.get(command_name)
        if lean is None:
            lean = self._lean_commands[command_name] = _is_lean_command(command_name)
        connection = pool.take_ready() if pool is not None and lean else None
        if connection is None and pool is not None and lean and pool.full():
            connection = await pool.wait_ready()
        if pool is None or connection is None:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        sent = False
        try:
            packed = connection.pack_command(*args)
            sent = True
            if _write(connection, packed):
                await _drain(connection)
            # redis-py annotates Connection, but its pools hand out any AbstractConnection.
            return await self.parse_response(connection, command_name, **options)  # type: ignore[arg-type]
        except ResponseError:
            raise  # the server's error reply, read whole: the connection is clean
        except BaseException as exc:
            # Sent, and its reply maybe not read: never let a later command read it. (Unsent,
            # a value redis-py cannot encode, the connection is clean.)
            if sent and connection.is_connected:
                await connection.disconnect(nowait=True)
            if not (sent and isinstance(exc, _RETRIED)):
                raise
        finally:
            if not pool.give_back(connection):
                await pool.release(connection)
        # Retried once the connection is back in the pool, out of the handler so that a second
        # failure does not chain to the first.
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


#: Errors of QuickRedis's fast path that it retries once on redis-py's path (as create_redis's
#: retry_on_error; OSError covers a failed write and asyncio's timeout).
_RETRIED: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)


def _is_lean_command(command_name: str | bytes) -> bool:
    """HIMPORT prepares fieldsets per connection, in redis-py's path only."""
    name = command_name.decode(errors="replace") if isinstance(command_name, bytes) else str(command_name)
    return not name.upper().startswith("HIMPORT")


def _write(connection: AbstractConnection, packed: list[bytes]) -> bool:
    """Write a packed command to the socket's buffer; True when the buffer is above its high-water
    mark, where redis-py's ``drain`` would wait (and so must the caller)."""
    writer = connection._writer
    if writer is None:  # not connected: take_ready only hands out connected connections
        raise ConnectionError("Connection closed by the client")
    writer.writelines(packed)
    transport = writer.transport
    size = transport.get_write_buffer_size()
    return bool(size) and size > transport.get_write_buffer_limits()[1]


async def _drain(connection: AbstractConnection) -> None:
    """Wait for the socket's buffer to drain, up to the socket timeout (whose TimeoutError is an
    OSError: QuickRedis retries it on redis-py's path, as any failed write)."""
    writer = connection._writer
    if writer is None:
        raise ConnectionError("Connection closed by the client")
    async with asyncio.timeout(connection.socket_timeout):
        await writer.drain()


def create_redis(
    url: str,
    *,
    max_connections: int = MAX_CONNECTIONS,
    blocking_reads: bool = False,
    health_check_s: float = DEFAULT_HEALTH_CHECK_S,
) -> aioredis.Redis:
    """A client whose pool waits (up to a bound) for a free connection instead of failing, and
    whose plain commands take QuickRedis's lean path.

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
    return QuickRedis(connection_pool=pool)


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
