"""SSE connection leases on a real Redis: they count across gateways and lapse if a gateway dies."""

from __future__ import annotations

import asyncio

import pytest

from jobstream.connection import create_client
from jobstream.ratelimit import ConnectionLeases
from tests.conftest import make_settings

pytestmark = pytest.mark.on_cluster


def test_leases_whenGatewayDiesWithoutRelease_thenSlotsReturnAfterLease(redis_url: str) -> None:
    async def scenario() -> None:
        client = create_client(make_settings(redis_url))
        try:
            one = ConnectionLeases(client, limit=2, lease_s=2)
            other_gateway = ConnectionLeases(client, limit=2, lease_s=2)
            assert await one.acquire("alice") is not None
            kept = await other_gateway.acquire("alice")
            assert kept is not None
            assert await one.acquire("alice") is None
            # Neither gateway releases (it died): the leases lapse on their own.
            await asyncio.sleep(2.3)
            assert await one.count("alice") == 0
            assert await one.acquire("alice") is not None
            # A renewed lease survives past its first expiry.
            lease = await one.acquire("alice")
            assert lease is not None
            await asyncio.sleep(1.2)
            await one.renew("alice", lease)
            await asyncio.sleep(1.2)
            assert await one.count("alice") == 1
            await one.release("alice", lease)
            assert await one.count("alice") == 0
        finally:
            await client.aclose()

    asyncio.run(scenario())
