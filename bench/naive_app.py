"""The baseline the hub must beat: a deliberately naive SSE reader, one blocking XREAD per client.

It reads the same Redis streams as jobstream (``jobstream:{<id>}:events``), so the same
publisher drives both. Run: ``uvicorn bench.naive_app:app`` with ``REDIS_URL`` set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

redis = aioredis.Redis.from_url(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    decode_responses=True,
    max_connections=20000,
    socket_timeout=30,
)


async def events(request: Request) -> EventSourceResponse:
    key = f"jobstream:{{{request.path_params['job_id']}}}:events"

    async def stream() -> AsyncIterator[ServerSentEvent]:
        last = "0-0"
        while True:
            reply = await redis.xread({key: last}, count=500, block=5000)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield ServerSentEvent(data=fields["d"], event=fields["t"], id=entry_id)

    return EventSourceResponse(stream())


app = Starlette(routes=[Route("/events/{job_id}", events)])
