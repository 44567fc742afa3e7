"""The hub's subscription link when Redis keeps refusing it: reconnects are paced, not a loop."""

from __future__ import annotations

import asyncio
import contextlib

import redis

from jobstream.connection import create_client
from jobstream.hub import Hub
from jobstream.store import JobStore
from tests.conftest import make_settings
from tests.test_hub import new_job, run


def test_reconnect_whenRedisRefusesSubscribe_thenBacksOffInsteadOfLooping(redis_url: str) -> None:
    """An ACL user without channel rights gets NOPERM for SUBSCRIBE: the hub logs it and retries
    after a growing pause, rather than reconnecting (and resetting every reader) thousands of times
    a second."""
    with redis.Redis.from_url(redis_url) as admin:
        admin.acl_setuser("nosub", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-subscribe"])
    settings = make_settings(redis_url.replace("redis://", "redis://nosub:pw@"))

    async def scenario() -> None:
        client = create_client(settings)
        store = JobStore(client, settings)
        hub = Hub(client, store)
        await hub.start()
        try:
            job_id = await new_job(store)

            async def follow() -> None:
                with contextlib.suppress(Exception):
                    async for _ in hub.follow(job_id, "$"):
                        pass

            follower = asyncio.create_task(follow())  # keeps a channel followed: each link subscribes it
            await asyncio.sleep(3)  # on purpose: time for a reconnect loop to show itself
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            assert 1 <= hub.resets <= 8, f"{hub.resets} reconnects in 3 s"
        finally:
            await hub.close()
            await client.aclose()

    try:
        run(scenario)
    finally:
        with redis.Redis.from_url(redis_url) as admin:
            admin.acl_deluser("nosub")
