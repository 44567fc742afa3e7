"""The fan-out hub: one Redis subscription per process serves every local reader of a job.

Appends publish their events on the job's channel from the same Lua script that writes the
stream (see ``scripts.APPEND``), so the hub never polls Redis. For each job that has local
readers the hub holds one channel subscription; each published batch is decoded and SSE-encoded
once per process and handed to every local subscriber's bounded buffer.

Joining is gap-free: a subscriber registers and the hub confirms the channel subscription
*before* the subscriber reads history with XRANGE; events published after that arrive in its
buffer, and any it already read from history are dropped by id. If the Redis connection drops,
published events may be lost, so every subscriber is reset: it re-joins and re-reads from its last
id. A subscriber that falls further behind than its buffer allows is closed; the reader reconnects
and catches up from Redis, which costs the other readers nothing.

Heartbeats are one timer per process: each tick wakes every subscriber, whose reader writes a
ping if it is idle; the same tick drops channels whose job expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from jobstream import keys
from jobstream.connection import RedisClient
from jobstream.cursor import StreamId, parse_id
from jobstream.link import Link
from jobstream.store import JobStore, StoredEvent

logger = logging.getLogger("jobstream.hub")

#: Separators of a published batch (set in scripts.APPEND): events by US (0x1f), an event's id,
#: type and data by RS (0x1e). Neither can occur in compact JSON (control characters are
#: escaped), in an event type, or in a stream id.
EVENT_SEP = "\x1f"
FIELD_SEP = "\x1e"
HISTORY_PAGE = 500
JOIN_TIMEOUT_S = 5.0
SILENT_FLOOR_S = 5.0


class SubscriberOverflow(Exception):
    """The subscriber fell further behind than its buffer allows."""


class JobGone(Exception):
    """The job was deleted or expired while a reader followed it."""


class HubClosed(Exception):
    """The gateway is shutting down."""


class _Reset(Exception):
    """The hub's connection was lost: re-join and re-read from the last id."""


def decode_batch(payload: str) -> list[StoredEvent]:
    events = []
    for item in payload.split(EVENT_SEP):
        event_id, event_type, data = item.split(FIELD_SEP, 2)
        events.append(StoredEvent(event_id, event_type, data))
    return events


class Subscription:
    """One local reader's bounded buffer of live events.

    Slots, a list and a bare future rather than a deque and an asyncio.Event: thousands of these
    live at once, one per open connection.
    """

    __slots__ = (
        "_waiter",
        "closed",
        "floor",
        "gone",
        "max_bytes",
        "max_events",
        "overflowed",
        "queue",
        "reset",
        "size_bytes",
        "ticked",
    )

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.queue: list[StoredEvent] = []
        self.size_bytes = 0
        #: Events with ids up to this one were read from history: drop them from the live feed.
        self.floor: StreamId | None = None
        self.overflowed = False
        self.reset = False
        self.gone = False
        self.closed = False
        self.ticked = False
        self._waiter: asyncio.Future[None] | None = None

    def push(self, events: list[StoredEvent], size_bytes: int) -> None:
        if self.overflowed:
            return
        self.queue += events
        self.size_bytes += size_bytes
        if len(self.queue) > self.max_events or self.size_bytes > self.max_bytes:
            self.overflowed = True
            self.queue = []
            self.size_bytes = 0
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> list[StoredEvent]:
        """Queued events, without those already read from history."""
        events, self.queue = self.queue, []
        self.size_bytes = 0
        if self.floor is not None and events:
            floor = self.floor
            events = [event for event in events if parse_id(event.id) > floor]
            if events:
                self.floor = None  # ids only grow from here on
        return events

    async def next(self) -> list[StoredEvent]:
        """Wait for live events or a tick; [] means a tick (write a ping if idle)."""
        while True:
            self._raise_if_ended()
            events = self.take()
            if events:
                return events
            if self.ticked:
                self.ticked = False
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _raise_if_ended(self) -> None:
        if self.reset:
            self.reset = False
            self.queue = []
            self.size_bytes = 0
            raise _Reset()
        if self.closed:
            raise HubClosed()
        if self.gone:
            raise JobGone()
        if self.overflowed:
            raise SubscriberOverflow()


@dataclass(eq=False)
class _Channel:
    job_id: str
    subscribers: set[Subscription] = field(default_factory=set)
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Hub:
    """Implements the ``Feed`` protocol with one subscription connection per process (a ``Link``)."""

    def __init__(
        self,
        client: RedisClient,
        store: JobStore,
        *,
        tick_s: float = 15.0,
        max_events: int = 1000,
        max_bytes: int = 1 << 20,
    ) -> None:
        self._redis = client
        self._store = store
        self._tick_s = tick_s
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._link = Link(client)
        self._channels: dict[str, _Channel] = {}
        self._by_name: dict[str, _Channel] = {}
        #: (Un)subscribe commands sent per channel and not yet confirmed: a channel is live once the
        #: confirmation of its latest SUBSCRIBE arrives, never on an older one's.
        self._inflight: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        #: Times the Redis subscription was lost and every reader re-read from its last id.
        self.resets = 0
        #: Why the link could not be opened, while it cannot: joins fail at once meanwhile.
        self._link_error: Exception | None = None
        self._last_message_at = 0.0

    def __repr__(self) -> str:
        readers = sum(len(channel.subscribers) for channel in self._channels.values())
        return f"Hub(channels={len(self._channels)}, subscribers={readers}, {self._link!r})"

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    async def start(self) -> None:
        if isinstance(self._redis, RedisCluster):
            await self._redis.initialize()  # learn every node, to pick one at random
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._tick_loop())]

    def stop_readers(self) -> None:
        """End every follower now (gateway shutdown): their readers reconnect, to another gateway."""
        self._closed = True
        for channel in list(self._channels.values()):
            for sub in channel.subscribers:
                sub.closed = True
                sub.wake()

    async def close(self) -> None:
        self.stop_readers()
        for task in [*self._tasks, *self._background]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._link.close()

    # ---- the Feed protocol

    async def follow(self, job_id: str, after: str) -> AsyncGenerator[list[StoredEvent]]:
        sub = self._subscription()
        cursor = after
        try:
            while True:
                await self._join(job_id, sub)
                async for page in self._history(job_id, cursor):
                    cursor = page[-1].id
                    yield page
                sub.floor = parse_id(cursor)
                try:
                    while True:
                        batch = await sub.next()
                        if batch:
                            cursor = batch[-1].id
                        yield batch
                except _Reset:
                    self._leave(job_id, sub)
        finally:
            self._leave(job_id, sub)

    async def wait(self, job_id: str, after: str, timeout_s: float) -> list[StoredEvent]:
        if self._closed:
            return []
        sub = self._subscription()
        try:
            async with asyncio.timeout(timeout_s):
                await self._join(job_id, sub)
                history = await self._store.read(job_id, after, HISTORY_PAGE)
                if history:
                    return history
                sub.floor = parse_id(after)
                while True:
                    try:
                        batch = await sub.next()
                    except _Reset:
                        return await self._store.read(job_id, after, HISTORY_PAGE)
                    if batch:
                        return batch
        except (TimeoutError, JobGone, SubscriberOverflow, HubClosed):
            return []
        finally:
            self._leave(job_id, sub)

    # ---- subscriptions

    def _subscription(self) -> Subscription:
        if self._closed:
            raise HubClosed()
        return Subscription(self._max_events, self._max_bytes)

    async def _history(self, job_id: str, cursor: str) -> AsyncGenerator[list[StoredEvent]]:
        while True:
            page = await self._store.read(job_id, cursor, HISTORY_PAGE)
            if page:
                cursor = page[-1].id
                yield page
            if len(page) < HISTORY_PAGE:
                return

    async def _join(self, job_id: str, sub: Subscription) -> None:
        """Register ``sub`` and wait until the job's channel subscription is live (callers `_leave`)."""
        if not self._link.live and self._link_error is not None:
            raise RedisConnectionError(f"no redis subscription: {self._link_error}")
        channel = self._channels.get(job_id)
        if channel is None:
            channel = _Channel(job_id)
            self._channels[job_id] = channel
            name = keys.live_channel(job_id)
            self._by_name[name] = channel
            # While the link is down this sends nothing: the reader subscribes it once back.
            await self._send("SUBSCRIBE", name)
        channel.subscribers.add(sub)
        # History is read only once the subscription is live, so nothing falls between the two.
        await asyncio.wait_for(asyncio.shield(channel.ready), JOIN_TIMEOUT_S)

    def _leave(self, job_id: str, sub: Subscription) -> None:
        channel = self._channels.get(job_id)
        if channel is None or sub not in channel.subscribers:
            return
        channel.subscribers.discard(sub)
        if not channel.subscribers:
            del self._channels[job_id]
            name = keys.live_channel(job_id)
            self._by_name.pop(name, None)
            if not self._closed:
                # In the background: leaving happens in `finally` blocks, which cannot wait.
                task = asyncio.get_running_loop().create_task(self._unsubscribe(name))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _unsubscribe(self, name: str) -> None:
        if name not in self._by_name:  # unless re-joined meanwhile
            await self._send("UNSUBSCRIBE", name)

    async def _send(self, command: str, *names: str) -> None:
        """(Un)subscribe on the link if it is live, counting the confirmations to come."""
        for name in names:
            self._inflight[name] = self._inflight.get(name, 0) + 1
        if not await self._link.send(command, *names):
            for name in names:
                self._confirmed(name)

    def _confirmed(self, name: str) -> bool:
        """One (un)subscribe of ``name`` answered; True if it was the latest one sent."""
        left = self._inflight.pop(name, 0) - 1
        if left > 0:
            self._inflight[name] = left
        return left <= 0

    # ---- the reader: the one task that connects and reads the link

    async def _read_loop(self) -> None:
        failed = False
        while not self._closed:
            if not self._link.live and not await self._go_live(failed=failed):
                failed = True
                await asyncio.sleep(0.5)
                continue
            try:
                response = await self._link.read()
            except Exception as exc:
                logger.warning("hub lost its redis subscription: %s", exc)
                failed = True
                await self._link_lost()
                continue
            self._last_message_at = asyncio.get_running_loop().time()
            try:
                self._handle(response)
            except Exception:
                # A bug, but this loop serves every reader of the process: it carries on rather
                # than die and leave them all waiting.
                logger.exception("hub reader failed; every reader re-reads from its last id")
                await self._link_lost()

    async def _go_live(self, *, failed: bool) -> bool:
        """Connect (after a failure, to another node of a cluster) and subscribe every followed
        channel; False if Redis cannot be reached (joins fail at once until it can)."""
        try:
            await self._link.open(failed=failed)
        except Exception as exc:
            if self._link_error is None:
                logger.warning("hub cannot subscribe to redis: %s", exc)
            self._link_error = exc
            await self._link_lost()
            return False
        if self._link_error is not None:
            logger.info("hub subscription back: readers re-read from their last ids")
            self._link_error = None
        self._last_message_at = asyncio.get_running_loop().time()
        self._inflight.clear()
        # Live before the list is taken: a channel joined from here on is subscribed by its join.
        self._link.live = True
        if self._by_name:
            await self._send("SUBSCRIBE", *self._by_name)
        return True

    async def _link_lost(self) -> None:
        """Readers re-read from their last ids: events published meanwhile were lost to pub/sub."""
        await self._link.drop()
        self._reset_all()

    def _handle(self, response: Any) -> None:
        if not isinstance(response, list) or len(response) < 2:
            return  # a PONG while nothing was followed
        kind = response[0]
        if kind == "message":
            self._publish(response[1], response[2])  # the hot path
        elif kind in ("subscribe", "unsubscribe"):
            if self._confirmed(response[1]) and kind == "subscribe":
                self._confirm(response[1])

    def _confirm(self, name: str) -> None:
        channel = self._by_name.get(name)
        if channel is not None and not channel.ready.done():
            channel.ready.set_result(None)

    def _publish(self, name: str, payload: str) -> None:
        channel = self._by_name.get(name)
        if channel is None:
            return
        if not payload:
            self._end(channel, gone=True)
            return
        try:
            events = decode_batch(payload)
        except ValueError:
            logger.error("hub got a malformed batch on %s; its readers re-read from redis", channel.job_id)
            self._reset(channel)
            return
        size_bytes = sum(len(event.data) for event in events)
        for sub in channel.subscribers:
            sub.push(events, size_bytes)

    def _reset_all(self) -> None:
        """After a lost connection: every subscriber re-joins and re-reads from its last id."""
        self.resets += 1
        for channel in self._channels.values():
            if channel.ready.done():
                channel.ready = asyncio.get_running_loop().create_future()
            self._reset(channel)

    def _reset(self, channel: _Channel) -> None:
        for sub in channel.subscribers:
            sub.reset = True
            sub.wake()

    def _end(self, channel: _Channel, *, gone: bool) -> None:
        for sub in channel.subscribers:
            sub.gone = gone
            sub.wake()

    async def _tick_loop(self) -> None:
        # Checks the flag too: redis-py can swallow a cancellation that lands inside one of its calls.
        while not self._closed:
            await asyncio.sleep(self._tick_s)
            for channel in list(self._channels.values()):
                for sub in channel.subscribers:
                    sub.ticked = True
                    sub.wake()
            with contextlib.suppress(RedisError, OSError):
                await self._drop_expired()
                await self._check_connection()

    async def _check_connection(self) -> None:
        """Ping the link each tick (the reader reads the PONG); if even the pongs stopped, the
        connection is dead without having been closed (a lost network path): drop it, and the
        reader reconnects."""
        now = asyncio.get_running_loop().time()
        if not self._by_name or not self._link.live:
            self._last_message_at = now  # nothing to lose while nothing is followed
            return
        silent_s = now - self._last_message_at
        # Three ticks without even a PONG, and never less than SILENT_FLOOR_S: a busy process or
        # Redis may take a moment to answer, and a reconnect makes every reader re-read.
        if silent_s > max(3 * self._tick_s, SILENT_FLOOR_S):
            logger.warning("hub subscription silent for %.1fs: reconnecting", silent_s)
            await self._link.drop()
            return
        await self._link.send("PING")

    async def _drop_expired(self) -> None:
        """Jobs whose TTL ran out publish nothing: look for them once per tick, for all readers at once."""
        job_ids = list(self._channels)
        if not job_ids:
            return
        for job_id, exists in zip(job_ids, await self._store.exist(job_ids), strict=True):
            channel = self._channels.get(job_id)
            if not exists and channel is not None:
                self._end(channel, gone=True)
