"""The SSE response of the hot path, and the one watch per process that drops stalled readers.

Deliberate divergence from sse-starlette's ``EventSourceResponse`` (measured in bench/RESULTS.md):
it runs four tasks per connection (stream, ping, shutdown watcher, disconnect listener) and enters
a cancel scope with a timer for every send. At thousands of connections those cost more memory
and CPU than the writes themselves. Here a connection is its request task alone (the client's
``receive()`` is stepped from its future's callback); pings come from the hub's per-process tick;
and a send that stays stuck (a client that stopped reading) is found by one task per process, which cancels that
response. The reader reconnects and resumes from its last id. sse-starlette still encodes any
frame whose content needs line splitting (see ``jobstream.sse``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger("jobstream.sendwatch")


class _Tracked:
    """A response the watch looks after: when its send started, and how to cancel it (once)."""

    __slots__ = ("cancelled", "send_started", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.send_started: float | None = None
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.task.cancel()


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

    def track(self, tracked: _Tracked) -> None:
        self._tracked.add(tracked)

    def untrack(self, tracked: _Tracked) -> None:
        self._tracked.discard(tracked)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.timeout_s / 4)
            deadline = loop.time() - self.timeout_s
            for tracked in list(self._tracked):
                started = tracked.send_started
                if started is not None and started < deadline and not tracked.cancelled:
                    self.dropped += 1
                    logger.info("dropping an event stream whose client stopped reading")
                    tracked.cancel()


#: Header lists already encoded, by their items: every stream sends the same few headers.
_ENCODED: dict[tuple[tuple[str, str], ...], tuple[tuple[bytes, bytes], ...]] = {}


def _encoded(headers: Mapping[str, str] | None, media_type: str) -> tuple[tuple[bytes, bytes], ...]:
    items = tuple(headers.items()) if headers else ()
    found = _ENCODED.get(items)
    if found is None:
        found = tuple((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items)
        if not any(k == b"content-type" for k, _ in found):
            found += ((b"content-type", media_type.encode("latin-1")),)
        if len(_ENCODED) < 64:
            _ENCODED[items] = found
    return found


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of ready-encoded chunks, one send each; the
    iterator's ``aclose`` always runs at the end (an async generator's ``finally``)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        watch: SendWatch,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        self.status_code = 200
        self.background = background
        # The same header tuples for every stream; the list is the response's own (callers add to it).
        self.raw_headers = list(_encoded(headers, self.media_type))
        self._chunks = chunks
        self._watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = self._chunks
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            # Sent: the header list (and the view a caller made of it) is not needed again, and the
            # response itself stays referenced for as long as the stream is open.
            self.raw_headers = []
            self.__dict__.pop("_headers", None)
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return  # never started: headers only
            await self._stream(chunks, receive, send)
        finally:
            # Always, however the response ends: the body joined the hub and took a slot at set-up.
            await _aclose(chunks)
        if self.background is not None:
            await self.background()

    async def _stream(self, chunks: AsyncIterator[bytes], receive: Receive, send: Send) -> None:
        # Cancelled by the watch or a disconnect through the task itself (and uncancelled here),
        # not an anyio cancel scope: a scope holds two sets and a task state per connection.
        task: asyncio.Task[object] = asyncio.current_task()  # type: ignore[assignment]
        tracked = _Tracked(task)
        self._watch.track(tracked)
        disconnect = _DisconnectWatch(receive, tracked.cancel)
        loop = asyncio.get_running_loop()
        try:
            async for chunk in chunks:
                tracked.send_started = loop.time()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                tracked.send_started = None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write
        except asyncio.CancelledError:
            # Ours (a stalled send, or the client gone) ends the response here; any other
            # cancellation (as well) goes on.
            if not tracked.cancelled or task.uncancel() > 0:
                raise
        finally:
            tracked.cancelled = True  # nothing cancels the cleanup
            self._watch.untrack(tracked)
            disconnect.stop()


async def _aclose(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


class _DisconnectWatch:
    """Calls ``on_disconnect`` once the client has gone: ASGI's ``receive()`` returns
    ``http.disconnect`` (a GET has no body; anything else is read and waited past).

    ``receive()`` is stepped by hand from its future's callback instead of by a task of its own:
    a task, its registration in the loop's task set and its outer coroutine cost about 0.8 KiB per
    open stream, and this runs the same coroutine to the same end. A bare ``yield`` (a
    ``sleep(0)`` inside some ``receive``) is resumed on the next loop iteration, as a task would;
    an error in ``receive`` counts as the client gone.
    """

    __slots__ = ("_coro", "_future", "_on_disconnect", "_receive")

    def __init__(self, receive: Receive, on_disconnect: Callable[[], None]) -> None:
        self._receive = receive
        self._on_disconnect = on_disconnect
        self._future: asyncio.Future[object] | None = None
        self._coro: Coroutine[object, None, Message] | None = receive()  # type: ignore[assignment]
        # The first step from the loop too, never now: a client already gone cancels the request
        # task only while it waits, where the response takes the cancellation as its own.
        asyncio.get_running_loop().call_soon(self._step, context=_context())

    def stop(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            future.remove_done_callback(self._resume)
        coro, self._coro = self._coro, None
        if coro is not None:
            coro.close()

    def _resume(self, future: asyncio.Future[object]) -> None:
        self._future = None
        if self._coro is None:
            return
        if future.cancelled():
            self._step(asyncio.CancelledError())
        else:
            self._step()

    def _step(self, error: BaseException | None = None) -> None:
        while (coro := self._coro) is not None:
            try:
                yielded = coro.send(None) if error is None else coro.throw(error)
            except StopIteration as stop:
                message = stop.value
                if message["type"] != "http.disconnect":
                    self._coro = self._receive()  # type: ignore[assignment]
                    error = None
                    continue
                self._coro = None
                self._on_disconnect()
                return
            except BaseException:
                self._coro = None
                self._on_disconnect()
                return
            if yielded is None:
                asyncio.get_running_loop().call_soon(self._step, context=_context())
            elif asyncio.isfuture(yielded):
                yielded._asyncio_future_blocking = False  # as a task does with what it awaits
                self._future = yielded
                yielded.add_done_callback(self._resume, context=_context())
            else:
                error = RuntimeError(f"receive() awaited {yielded!r}, not a future")
                continue
            return


#: The context the disconnect steps run in (receive() needs none of the request's): one per thread,
#: since a context cannot be entered by two threads at once (event loops in several threads).
_contexts = threading.local()


def _context() -> contextvars.Context:
    context: contextvars.Context | None = getattr(_contexts, "context", None)
    if context is None:
        context = _contexts.context = contextvars.Context()
    return context
