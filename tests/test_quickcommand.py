"""QuickRedis, the lean command path of the single-Redis client (jobstream.connection), against a
real redis-server: it is taken, it answers as redis-py's own path does, and a connection that
failed, was closed by Redis, or was cancelled mid-command never leaks nor hands a stray reply to
the next command. The last tests pin the redis-py internals QuickPool and QuickRedis rely on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import sentry_sdk
import uvloop
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, DataError, ResponseError, TimeoutError

from jobstream.connection import QuickPool, QuickRedis, create_redis
from jobstream.devredis import EmbeddedRedis
from tests.helpers import wait_until, wait_until_async

HASH = {"a": "1", "b": "two", "c": ""}


def run(main: Callable[[], Coroutine[Any, Any, None]], loop: str = "asyncio") -> None:
    runner: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run if loop == "uvloop" else asyncio.run
    runner(asyncio.wait_for(main(), 30))


def quick_pool(client: aioredis.Redis) -> QuickPool:
    pool = client.connection_pool
    assert isinstance(pool, QuickPool)
    return pool


def in_use(client: aioredis.Redis) -> int:
    return len(quick_pool(client)._in_use_connections)


def free(client: aioredis.Redis) -> list[AbstractConnection]:
    return list(quick_pool(client)._available_connections)


class Counts:
    """How often redis-py's own command path ran, and how many PINGs its health check sent."""

    def __init__(self) -> None:
        self.stock = 0
        self.pings = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counts]:
    found = Counts()
    stock_execute = aioredis.Redis.execute_command
    send_ping = AbstractConnection._send_ping

    async def counted_execute(self: aioredis.Redis, *args: Any, **options: Any) -> Any:
        found.stock += 1
        return await stock_execute(self, *args, **options)

    async def counted_ping(self: AbstractConnection) -> None:
        found.pings += 1
        await send_ping(self)

    monkeypatch.setattr(aioredis.Redis, "execute_command", counted_execute)
    monkeypatch.setattr(AbstractConnection, "_send_ping", counted_ping)
    yield found


def count_tasks() -> list[asyncio.Task[Any]]:
    """Every Task created on the running loop from now on (redis-py's path makes one per command on
    Python 3.11: its write goes through ``asyncio.wait_for``)."""
    created: list[asyncio.Task[Any]] = []
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        created.append(task)
        return task

    loop.set_task_factory(factory)
    return created


async def warm(client: aioredis.Redis) -> None:
    await client.hset("h", mapping=HASH)
    assert await client.hgetall("h") == HASH


# ---- the fast path is taken


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_plainCommands_whenAConnectionIsFree_thenTakeTheLeanPathWithoutATaskPerCommand(
    redis_url: str, counts: Counts, loop: str
) -> None:
    async def main() -> None:
        client = create_redis(redis_url)
        assert isinstance(client, QuickRedis)
        await warm(client)
        counts.stock = 0
        tasks = count_tasks()
        for _ in range(50):
            assert await client.hgetall("h") == HASH
        assert counts.stock == 0
        assert tasks == []
        assert in_use(client) == 0
        # The instruments see redis-py's path when it runs.
        stock = aioredis.Redis(connection_pool=client.connection_pool)
        for _ in range(5):
            assert await stock.hgetall("h") == HASH
        assert counts.stock == 5
        if sys.version_info < (3, 12):  # asyncio.wait_for makes a Task on 3.11 only
            assert len(tasks) >= 5
        await client.connection_pool.aclose()

    run(main, loop)


def test_unusualClients_whenSingleConnectionOrPoolInMaintenance_thenTakeRedisPysPath(
    redis_url: str, counts: Counts
) -> None:
    async def main() -> None:
        client = create_redis(redis_url)
        await warm(client)
        single = client.client()
        assert isinstance(single, QuickRedis)
        counts.stock = 0
        assert await single.hgetall("h") == HASH
        assert counts.stock == 1
        await single.aclose()
        quick_pool(client).set_in_maintenance(True)
        assert await client.hgetall("h") == HASH
        assert counts.stock == 2
        quick_pool(client).set_in_maintenance(False)
        assert await client.hgetall("h") == HASH
        assert counts.stock == 2
        await client.connection_pool.aclose()

    run(main)


def test_client_whenSentryIsOn_thenEveryCommandTakesRedisPysPathForItsSpans(redis_url: str, counts: Counts) -> None:
    async def main() -> None:
        client = create_redis(redis_url)
        await warm(client)
        counts.stock = 0
        assert await client.hgetall("h") == HASH
        assert counts.stock == 1
        await client.connection_pool.aclose()

    sentry_sdk.init(dsn="http://key@127.0.0.1:9/1", default_integrations=False)
    try:
        run(main)
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


# ---- the same answers as redis-py's own path


def test_answers_whenComparedWithRedisPysPath_thenIdentical(redis_url: str, counts: Counts) -> None:
    lua = "redis.call('INCR', KEYS[1]); return {ARGV[1], redis.call('GET', KEYS[1])}"

    async def answers(client: aioredis.Redis) -> list[Any]:
        script = client.register_script(lua)
        await client.script_flush()  # the first EVALSHA meets NOSCRIPT, loads, and sends again
        found: list[Any] = [await client.hgetall("h"), await client.hgetall("missing")]
        found.append(await client.xrange("s"))
        found.append(await client.xrange("s", "-", "+", count=1))
        found.append(await script(keys=["n"], args=["x"]))
        found.append(await script(keys=["n"], args=["y"]))
        found.append(await client.dump("h") is not None)  # NEVER_DECODE: bytes, however decoded
        found.append(await client.exists("h", "missing"))
        found.append(await client.set("k", "v", nx=True))
        found.append(await client.zadd("z", {"m": 1.5}))
        found.append(await client.zrange("z", 0, -1, withscores=True))
        async with client.pipeline(transaction=True) as pipe:
            pipe.hgetall("h").xrange("s").incr("n")
            await script(keys=["n"], args=["p"], client=pipe)
            found.append(await pipe.execute())
        for key in ("n", "k", "z"):
            await client.delete(key)
        return found

    async def main() -> None:
        client = create_redis(redis_url)
        await warm(client)
        for number in range(3):
            await client.xadd("s", {"n": str(number), "text": "é"})
        stock = aioredis.Redis(connection_pool=client.connection_pool)
        expected = await answers(stock)
        counts.stock = 0
        assert await answers(client) == expected
        assert counts.stock == 0
        assert expected[2][0][1] == {"n": "0", "text": "é"}
        assert expected[4] == ["x", "1"] and expected[5] == ["y", "2"]
        assert in_use(client) == 0
        await client.connection_pool.aclose()

    run(main)


def test_valueThatCannotBeEncoded_whenSent_thenDataErrorAndTheConnectionStays(redis_url: str) -> None:
    async def main() -> None:
        client = create_redis(redis_url)
        await warm(client)
        (connection,) = free(client)
        with pytest.raises(DataError):
            await client.set("k", None)  # type: ignore[arg-type]
        assert free(client) == [connection] and connection.is_connected
        assert await client.hgetall("h") == HASH
        await client.connection_pool.aclose()

    run(main)


# ---- Redis closed the connection, or restarted


def test_pooledConnection_whenRedisKilledIt_thenTheNextCommandReconnectsAndAnswers(
    redis_url: str, rdb: redis.Redis, counts: Counts
) -> None:
    async def main() -> None:
        client = create_redis(redis_url)
        await warm(client)
        connection_id = await client.client_id()
        assert rdb.client_kill_filter(_id=connection_id) == 1
        counts.stock = 0
        assert await client.hgetall("h") == HASH
        assert counts.stock == 1  # the lean attempt failed, and redis-py's path reconnected
        assert await client.client_id() != connection_id
        assert in_use(client) == 0
        assert [connection.is_connected for connection in free(client)] == [True]
        await client.connection_pool.aclose()

    run(main)


def test_redis_whenRestartedBetweenCommands_thenTheNextCommandAnswers(counts: Counts) -> None:
    first = EmbeddedRedis().start()
    try:

        async def main() -> None:
            client = create_redis(first.url)
            await warm(client)
            first.stop()
            second = EmbeddedRedis(port=first.port).start()
            try:
                counts.stock = 0
                assert await client.hgetall("h") == {}  # a new, empty server
                assert counts.stock == 1
                await warm(client)
                assert counts.stock == 1
                assert in_use(client) == 0
                await client.connection_pool.aclose()
            finally:
                second.stop()

        run(main)
    finally:
        first.stop()


# ---- errors and cancellation


def test_luaError_whenRaised_thenResponseErrorAndTheConnectionStaysConnected(redis_url: str) -> None:
    async def main() -> None:
        client = create_redis(redis_url)
        await warm(client)
        connection_id = await client.client_id()
        failing = client.register_script("redis.call('INCR', KEYS[1]); return redis.error_reply('boom')")
        for _ in range(2):  # NOSCRIPT (a ResponseError, handled by the script) first, then cached
            with pytest.raises(ResponseError, match="boom"):
                await failing(keys=["n"])
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.incr("h")
        assert in_use(client) == 0
        assert await client.client_id() == connection_id  # never reconnected
        assert await client.get("n") == "2"
        assert await client.hgetall("h") == HASH
        await client.connection_pool.aclose()

    run(main)


def test_command_whenCancelledMidRead_thenNoLeakAndNoStrayReply(redis_url: str, counts: Counts) -> None:
    async def main() -> None:
        client = create_redis(redis_url)
        await warm(client)
        await client.set("k", "v")
        counts.stock = 0
        sleeping = asyncio.create_task(client.execute_command("DEBUG", "SLEEP", "0.3"))
        await asyncio.sleep(0.1)
        sleeping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        assert counts.stock == 0
        assert in_use(client) == 0
        assert [connection.is_connected for connection in free(client)] == [False]
        # DEBUG SLEEP's "OK" arrives on the closed connection, never as the answer to this GET.
        assert await client.get("k") == "v"
        assert in_use(client) == 0
        await client.connection_pool.aclose()

    run(main)


def test_blockingRead_whenCancelled_thenRedisForgetsItsClient(redis_url: str, rdb: redis.Redis) -> None:
    async def main() -> None:
        client = create_redis(redis_url)
        await warm(client)
        popping = asyncio.create_task(client.blpop(["q"], timeout=3))
        await wait_until_async(lambda: rdb.info("clients")["blocked_clients"] == 1)
        popping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await popping
        assert in_use(client) == 0
        wait_until(lambda: rdb.info("clients")["blocked_clients"] == 0, message="the BLPOP stayed blocked")
        rdb.rpush("q", "x")
        assert await client.lpop("q") == "x"  # not popped by the cancelled BLPOP's connection
        await client.connection_pool.aclose()

    run(main)


def test_command_whenCancelledWhileAnotherWaits_thenTheWaiterGetsTheConnection(redis_url: str) -> None:
    async def main() -> None:
        client = create_redis(redis_url, max_connections=1)
        await warm(client)
        await client.set("k", "v")
        sleeping = asyncio.create_task(client.execute_command("DEBUG", "SLEEP", "0.3"))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(client.get("k"))
        await wait_until_async(lambda: quick_pool(client)._queue)
        sleeping.cancel()
        assert await waiting == "v"
        with pytest.raises(asyncio.CancelledError):
            await sleeping
        assert in_use(client) == 0
        assert await client.hgetall("h") == HASH
        await client.connection_pool.aclose()

    run(main)


def test_callers_whenEveryConnectionIsInUse_thenWaitInLineAndStayOnTheLeanPath(redis_url: str, counts: Counts) -> None:
    async def main() -> None:
        client = create_redis(redis_url, max_connections=2)
        await client.set("k", "v")
        await asyncio.gather(*(client.get("k") for _ in range(10)))  # both connections made
        assert len(free(client)) == 2
        counts.stock = 0
        answers = await asyncio.gather(*(client.get("k") for _ in range(60)))
        assert answers == ["v"] * 60
        assert counts.stock == 0  # handed a connection given back, not through redis-py's wait
        assert in_use(client) == 0 and not quick_pool(client)._queue
        await client.connection_pool.aclose()

    run(main)


def test_caller_whenNoConnectionComesBackInTime_thenConnectionErrorAndNoLeak(redis_url: str) -> None:
    async def main() -> None:
        pool = QuickPool.from_url(redis_url, max_connections=1, timeout=0.2, decode_responses=True)
        client = QuickRedis(connection_pool=pool)
        await warm(client)
        sleeping = asyncio.create_task(client.execute_command("DEBUG", "SLEEP", "0.6"))
        await wait_until_async(lambda: in_use(client) == 1)
        with pytest.raises(ConnectionError, match="No connection available"):
            await client.get("k")
        await sleeping
        assert in_use(client) == 0 and not pool._queue
        assert await client.hgetall("h") == HASH
        await pool.aclose()

    run(main)


def test_caller_whenCancelledWhileWaitingInLine_thenLeavesIt(redis_url: str, counts: Counts) -> None:
    async def main() -> None:
        client = create_redis(redis_url, max_connections=1)
        await warm(client)
        await client.set("k", "v")
        sleeping = asyncio.create_task(client.execute_command("DEBUG", "SLEEP", "0.3"))
        await wait_until_async(lambda: in_use(client) == 1)
        gone = asyncio.create_task(client.get("k"))
        staying = asyncio.create_task(client.get("k"))
        await wait_until_async(lambda: len(quick_pool(client)._queue) == 2)
        gone.cancel()
        await sleeping
        assert await staying == "v"
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert in_use(client) == 0 and not quick_pool(client)._queue
        await client.connection_pool.aclose()

    run(main)


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, which it may stop (SIGSTOP) without holding up others."""
    server = EmbeddedRedis().start()
    yield server
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def awaiting(task: asyncio.Task[Any]) -> list[str]:
    """The coroutines ``task`` is in, outermost first (Task.get_stack shows only the outermost)."""
    names: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and hasattr(awaited, "cr_code"):
        names.append(awaited.cr_code.co_name)
        awaited = awaited.cr_await
    return names


def big_value() -> bytes:
    """Far more than loopback's socket buffers hold: a write of it fills the transport's buffer."""
    return b"x" * (64 * 1024 * 1024)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_write_whenCancelledWhileWaitingToDrain_thenTheConnectionIsClosed(own_redis: EmbeddedRedis, loop: str) -> None:
    assert own_redis.process is not None
    pid = own_redis.process.pid

    async def main() -> None:
        client = create_redis(own_redis.url)
        await warm(client)
        await client.set("k", "v")
        os.kill(pid, signal.SIGSTOP)
        writing = asyncio.create_task(client.set("big", big_value()))
        # Redis reads nothing, the socket's buffers fill, and the write waits for them to drain.
        await wait_until_async(lambda: "drain" in awaiting(writing))
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
        assert in_use(client) == 0
        assert [connection.is_connected for connection in free(client)] == [False]
        os.kill(pid, signal.SIGCONT)
        # A half-sent SET on the same connection would have made this GET part of its value.
        assert await client.get("k") == "v"
        await client.connection_pool.aclose()

    run(main, loop)


def test_write_whenRedisReadsNothingPastTheSocketTimeout_thenTimeoutAndNoLeak(own_redis: EmbeddedRedis) -> None:
    assert own_redis.process is not None
    pid = own_redis.process.pid

    async def main() -> None:
        pool = QuickPool.from_url(own_redis.url, max_connections=2, socket_timeout=0.3, decode_responses=True)
        client = QuickRedis(connection_pool=pool)
        await warm(client)
        os.kill(pid, signal.SIGSTOP)
        # Retried once on redis-py's path, which cannot connect to a stopped server either.
        with pytest.raises((TimeoutError, ConnectionError)):
            await asyncio.wait_for(client.set("big", big_value()), 10)
        assert in_use(client) == 0
        os.kill(pid, signal.SIGCONT)
        assert await client.hgetall("h") == HASH
        await pool.aclose()

    run(main)


def test_connectionMarkedForReconnect_whenItsCommandEnds_thenReleaseDisconnectsIt(redis_url: str) -> None:
    async def main() -> None:
        client = create_redis(redis_url)
        await warm(client)
        sleeping = asyncio.create_task(client.execute_command("DEBUG", "SLEEP", "0.1"))
        await asyncio.sleep(0.02)
        await quick_pool(client).update_active_connections_for_reconnect()
        assert await sleeping == "OK"
        assert in_use(client) == 0
        assert [connection.is_connected for connection in free(client)] == [False]
        assert await client.hgetall("h") == HASH
        await client.connection_pool.aclose()

    run(main)


# ---- health checks and concurrency


def test_connection_whenIdlePastHealthCheckInterval_thenRedisPysPathPingsFirst(redis_url: str, counts: Counts) -> None:
    async def main() -> None:
        client = create_redis(redis_url, health_check_s=0.2)
        await warm(client)
        counts.stock = counts.pings = 0
        assert await client.hgetall("h") == HASH
        assert (counts.stock, counts.pings) == (0, 0)
        await asyncio.sleep(0.3)  # the quiet period is what this test is about
        assert await client.hgetall("h") == HASH
        assert (counts.stock, counts.pings) == (1, 1)
        assert await client.hgetall("h") == HASH
        assert (counts.stock, counts.pings) == (1, 1)
        await client.connection_pool.aclose()

    run(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_manyCommands_whenConcurrentOnASmallPool_thenEachGetsItsOwnAnswer(redis_url: str, loop: str) -> None:
    async def main() -> None:
        client = create_redis(redis_url, max_connections=4)
        await warm(client)

        async def ask(number: int) -> tuple[Any, ...]:
            if number % 3 == 0:
                return (await client.hgetall("h"),)
            return await client.echo(f"m{number}"), await client.incr(f"n{number}")

        asked: list[Awaitable[tuple[Any, ...]]] = [ask(number) for number in range(200)]
        answers = await asyncio.gather(*asked)
        for number, answer in enumerate(answers):
            assert answer == ((HASH,) if number % 3 == 0 else (f"m{number}", 1))
        assert in_use(client) == 0
        assert 1 <= len(free(client)) <= 4
        await client.connection_pool.aclose()

    run(main, loop)


# ---- the redis-py internals QuickPool and QuickRedis rely on (redis 8.1)


def test_redisPyInternals_whenUpgraded_thenStillWhatQuickPoolAndQuickRedisRead(redis_url: str) -> None:
    async def main() -> None:
        client = create_redis(redis_url, max_connections=1, health_check_s=30)
        await warm(client)
        pool = quick_pool(client)
        assert isinstance(pool._available_connections, list)
        (connection,) = pool._available_connections
        assert len(pool._in_use_connections) == 0
        assert pool._in_maintenance is False
        pool.set_in_maintenance(True)
        assert pool._in_maintenance is True and pool.take_ready() is None
        pool.set_in_maintenance(False)
        # A connection's socket, and its health-check clock (as check_health reads it).
        assert isinstance(connection._writer, asyncio.StreamWriter)
        limits = connection._writer.transport.get_write_buffer_limits()
        assert connection._writer.transport.get_write_buffer_size() <= limits[1]
        loop_time = asyncio.get_running_loop().time()
        assert connection.health_check_interval == 30
        assert loop_time < connection.next_health_check <= loop_time + 30
        assert connection.should_reconnect() is False
        # take_ready and give_back move it between the two collections, as get_connection and
        # release do.
        assert pool.take_ready() is connection
        assert connection in pool._in_use_connections and pool._available_connections == []
        assert pool.give_back(connection) is True
        assert pool._available_connections == [connection] and len(pool._in_use_connections) == 0
        # A task waiting for a connection shows in the condition's _waiters.
        held = await pool.get_connection()
        waiting = asyncio.create_task(pool.get_connection())
        await wait_until_async(lambda: len(pool._condition._waiters) == 1)
        assert pool.give_back(held) is False  # only release wakes the waiter
        await pool.release(held)
        assert await waiting is connection
        await pool.release(connection)
        assert len(pool._condition._waiters) == 0
        # read_response disconnects a connection whose read was cancelled.
        pool.take_ready()
        await connection.send_command("DEBUG", "SLEEP", "0.2")
        reading = asyncio.create_task(connection.read_response())
        await asyncio.sleep(0.05)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        assert not connection.is_connected and connection._writer is None
        await pool.release(connection)
        await client.connection_pool.aclose()

    run(main)
