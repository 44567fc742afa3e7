"""Pieces of the lean request path: batched log writes and the pool's fast path."""

from __future__ import annotations

import asyncio
import io
import logging

import redis

from jobstream.connection import create_redis
from jobstream.observability import BatchedStderr
from tests.helpers import wait_until


def test_batchedStderr_whenInfoLines_thenWrittenTogetherSoon_andWarningsAtOnce() -> None:
    handler = BatchedStderr()
    handler.setStream(io.StringIO())
    stream = handler.stream
    assert isinstance(stream, io.StringIO)
    logger = logging.getLogger("tests.batched")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        for index in range(3):
            logger.info("line %d", index)
        assert stream.getvalue() == ""  # batched: no write per line
        wait_until(lambda: stream.getvalue().count("\n") == 3, timeout_s=2, message="INFO lines never written")
        logger.info("before")
        logger.warning("now")
        assert stream.getvalue().endswith("before\nnow\n")  # at once, and in order
        logger.info("at exit")
        handler.flush()  # as logging.shutdown does
        assert stream.getvalue().endswith("at exit\n")
    finally:
        logger.removeHandler(handler)


def test_quickPool_whenServerClosedAFreeConnection_thenTheNextCommandStillAnswers(redis_url: str) -> None:
    async def scenario() -> None:
        client = create_redis(redis_url)
        try:
            await client.set("k", "v")
            with redis.Redis.from_url(redis_url) as admin:
                admin.client_kill_filter(_type="normal", skipme=True)  # the pool's free connection
            assert await client.get("k") == "v"
            # Many at once: the fast path and the waiting path share the 16 connections.
            assert await asyncio.gather(*(client.get("k") for _ in range(200))) == ["v"] * 200
        finally:
            await client.aclose()

    asyncio.run(scenario())
