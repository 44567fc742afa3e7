"""The create limiter: `limits`' moving window, in one round trip, on a real Redis."""

from __future__ import annotations

import asyncio

import pytest
from limits import parse
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

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
