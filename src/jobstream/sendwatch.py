"""Drops SSE connections whose client stopped reading, with one timer per process.

sse-starlette can time out each send on its own (``send_timeout``), but that enters a cancel scope
and arms a timer for every write, which costs more than the write. Instead each response notes
when its current send started, and one task per process cancels the responses whose send has
been stuck longer than the timeout. The reader reconnects and resumes from its last id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

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


class WatchedEventSourceResponse(EventSourceResponse):
    """An EventSourceResponse whose stalled sends are ended by a process-wide SendWatch."""

    def __init__(self, *args: Any, watch: SendWatch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        with anyio.CancelScope() as cancel_scope, self._watch.track(cancel_scope) as tracked:

            async def timed_send(message: Message) -> None:
                tracked.send_started = loop.time()
                try:
                    await send(message)
                finally:
                    tracked.send_started = None

            await super().__call__(scope, receive, timed_send)
