"""The create limiter: `limits`' moving window, in one round trip, on a real Redis."""

from __future__ import annotations

import asyncio
import math

import pytest
from limits import parse
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from jobstream.connection import create_client
from jobstream.ratelimit import CreateLimiter
from tests.conftest import make_settings
from tests.helpers import wait_until_async

pytestmark = pytest.mark.on_cluster


def test_createLimiter_whenHitAsLimitsHits_thenSameDecisionsAndRemaining(redis_url: str) -> None:
    async def main() -> None:
        client = create_client(make_settings(redis_url))
        ours = CreateLimiter(client, "4/minute")
        theirs = MovingWindowRateLimiter(_storage(redis_url))
        item = parse("4/minute")
        await theirs.clear(item, "create", "carol")
        for _ in range(7):
            decision = await ours.hit("carol")
            allowed = await theirs.hit(item, "create", "carol")
            stats = await theirs.get_window_stats(item, "create", "carol")
            assert decision.allowed == allowed
            assert decision.remaining == max(0, stats.remaining)
            assert decision.limit == 4
            assert 0 < decision.reset_s <= 60
        assert not decision.allowed
        assert decision.headers()["Retry-After"] == str(decision.reset_s)
        await client.aclose()

    asyncio.run(main())


def test_createLimiter_whenWindowPasses_thenAllowedAgainAndOtherUsersNeverLimited(redis_url: str) -> None:
    async def main() -> None:
        client = create_client(make_settings(redis_url))
        limiter = CreateLimiter(client, "2/second")
        assert [(await limiter.hit("dave")).allowed for _ in range(3)] == [True, True, False]
        assert (await limiter.hit("erin")).allowed  # a window per user
        await wait_until_async(lambda: _allowed(limiter, "dave"), timeout_s=5)
        assert 0 < await client.ttl("jobstream:rate:create:2/1:dave") <= 1  # the window expires with its last hit
        await client.aclose()

    asyncio.run(main())


async def _allowed(limiter: CreateLimiter, user: str) -> bool:
    return (await limiter.hit(user)).allowed


def _storage(redis_url: str) -> RedisStorage | RedisClusterStorage:
    if make_settings(redis_url).redis_cluster:
        return RedisClusterStorage(
            "async+redis+cluster://" + redis_url.removeprefix("redis://"), implementation="redispy"
        )
    return RedisStorage("async+" + redis_url, implementation="redispy")


def test_createLimiter_whenWindowIsLong_thenOneHitReadsLogarithmicallyMany(redis_url: str) -> None:
    """A busy user's window holds thousands of hits; one create must not walk them all."""

    async def main() -> None:
        client = create_client(make_settings(redis_url))
        limiter = CreateLimiter(client, "100000/minute")
        for _ in range(2000):
            await limiter.hit("frank")
        nodes = client.get_primaries() if isinstance(client, RedisCluster) else [None]
        for node in nodes:
            await client.execute_command("CONFIG", "RESETSTAT", **({"target_nodes": node} if node else {}))
        decision = await limiter.hit("frank")
        assert decision.remaining == 100000 - 2001
        stats = [await _commandstats(client, node) for node in nodes]

        def calls(command: str) -> int:
            return sum(s.get(f"cmdstat_{command}", {}).get("calls", 0) for s in stats)

        assert calls("lrange") == 0  # never the whole window
        assert 0 < calls("lindex") <= 2 * math.ceil(math.log2(2002)) + 4
        await client.aclose()

    asyncio.run(main())


async def _commandstats(client: object, node: object) -> dict[str, dict[str, int]]:
    if node is None:
        assert isinstance(client, Redis)
        return await client.info("commandstats")
    assert isinstance(client, RedisCluster)
    return await client.info("commandstats", target_nodes=node)
