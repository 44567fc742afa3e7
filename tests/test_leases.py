"""SSE connection leases on a real Redis: they count across gateways and lapse if a gateway dies."""

from __future__ import annotations

import asyncio
import time

import pytest

from jobstream import keys
from jobstream.connection import create_client
from jobstream.ratelimit import ConnectionLeases
from tests.conftest import make_settings
from tests.helpers import wait_until_async

pytestmark = pytest.mark.on_cluster


def test_leases_whenGatewayDiesWithoutRelease_thenSlotsReturnAfterLease(redis_url: str) -> None:
    async def scenario() -> None:
        client = create_client(make_settings(redis_url))
        try:
            one = ConnectionLeases(client, limit=2, lease_s=2)
            other_gateway = ConnectionLeases(client, limit=2, lease_s=2)

            async def none_left() -> bool:
                return await one.count("alice") == 0

            acquired_at = time.monotonic()
            assert await one.acquire("alice") is not None
            kept = await other_gateway.acquire("alice")
            assert kept is not None
            assert await one.acquire("alice") is None
            # Neither gateway releases (it died): the leases lapse on their own, once their 2 s are up.
            await wait_until_async(
                none_left, timeout_s=10, interval_s=0.05, message="the unreleased leases never lapsed"
            )
            assert time.monotonic() - acquired_at >= 1.9, "the leases lapsed before their time"
            assert await one.acquire("alice") is not None
            # A renewed lease survives past its first expiry.
            lease = await one.acquire("alice")
            assert lease is not None
            key = keys.sse_leases_key("alice")
            first_expiry_ms = await client.zscore(key, lease)
            assert first_expiry_ms is not None
            await asyncio.sleep(1.2)  # time passes on purpose: the renewal must push the expiry later
            await one.renew("alice", lease)
            renewed_expiry_ms = await client.zscore(key, lease)
            assert renewed_expiry_ms is not None and renewed_expiry_ms > first_expiry_ms
            # Once the first expiry has passed (leases are scored by the gateway's clock), it still counts.
            await wait_until_async(
                lambda: time.time() * 1000 > first_expiry_ms,
                timeout_s=10,
                interval_s=0.05,
                message="the lease's first expiry never passed",
            )
            assert await one.count("alice") == 1
            await one.release("alice", lease)
            assert await one.count("alice") == 0
        finally:
            await client.aclose()

    asyncio.run(scenario())
