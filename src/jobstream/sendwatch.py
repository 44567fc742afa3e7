"""The SSE response of the hot path, and the one watch per process that drops stalled readers.

Deliberate divergence from sse-starlette's ``EventSourceResponse`` (measured in bench/RESULTS.md):
it runs four tasks per connection (stream, ping, shutdown watcher, disconnect listener) and enters
a cancel scope with a timer for every send. At thousands of connections those cost more memory
and CPU than the writes themselves. Here a connection is its request task plus one task that
waits for the client's disconnect; pings come from the hub's per-process tick; and a send that
stays stuck (a client that stopped reading) is found by one task per process, which cancels that
response. The reader reconnects and resumes from its last id. sse-starlette still encodes any
frame whose content needs line splitting (see ``jobstream.sse``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterator, Mapping

import anyio
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("jobstream.sendwatch")


class _Tracked:
    __slots__ = ("cancel_scope", "send_started")

    def __init__(self, cancel_scope: anyio.CancelScope) -> None:
        self.cancel_scope = cancel_scope
        self.send_started: float | None = None


class SendWatch:
    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._tracked: set[_Tracked] = set()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def track(self, cancel_scope: anyio.CancelScope) -> Iterator[_Tracked]:
        tracked = _Tracked(cancel_scope)
        self._tracked.add(tracked)
        try:
            yield tracked
        finally:
            self._tracked.discard(tracked)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.timeout_s / 4)
            deadline = loop.time() - self.timeout_s
            for tracked in list(self._tracked):
                started = tracked.send_started
                if started is not None and started < deadline:
                    self.dropped += 1
                    logger.info("dropping an event stream whose client stopped reading")
                    tracked.cancel_scope.cancel()


class EventStreamResponse(Response):
    """``text/event-stream`` from an async generator of ready-encoded chunks, one send each."""

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncGenerator[bytes],
        *,
        watch: SendWatch,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        self.status_code = 200
        self.background = background
        self.init_headers(headers)
        self._chunks = chunks
        self._watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope["method"] == "HEAD":
            await self._chunks.aclose()  # never started: headers only
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        loop = asyncio.get_running_loop()
        with anyio.CancelScope() as cancel_scope, self._watch.track(cancel_scope) as tracked:
            disconnect = asyncio.create_task(_cancel_on_disconnect(receive, cancel_scope))
            try:
                async with contextlib.aclosing(self._chunks) as chunks:
                    async for chunk in chunks:
                        tracked.send_started = loop.time()
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        tracked.send_started = None
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client went away mid-write
            finally:
                disconnect.cancel()
        if self.background is not None:
            await self.background()


async def _cancel_on_disconnect(receive: Receive, cancel_scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel_scope.cancel()
            return
