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
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from jobstream import keys
from jobstream.connection import RedisClient
from jobstream.cursor import parse_id
from jobstream.link import Link
from jobstream.store import JobStore, StoredEvent
from jobstream.subscription import (
    HubClosed,
    JobGone,
    Reset,
    SubscriberOverflow,
    Subscription,
    decode_batch,
)

__all__ = ["Follower", "Hub", "HubClosed", "JobGone", "SubscriberOverflow", "Subscription", "decode_batch"]

logger = logging.getLogger("jobstream.hub")

HISTORY_PAGE = 500
JOIN_TIMEOUT_S = 5.0
SILENT_FLOOR_S = 5.0
#: A link that fails within RECONNECT_QUIET_S of coming back reconnects after a pause that grows
#: from RECONNECT_MIN_S to RECONNECT_MAX_S (a Redis at maxclients, an ACL that refuses SUBSCRIBE).
RECONNECT_QUIET_S = 5.0
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 5.0


@dataclass(eq=False)
class _Channel:
    job_id: str
    subscribers: set[Subscription] = field(default_factory=set)
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


_NEW, _JOINED, _LIVE = 0, 1, 2


class Follower(Subscription):
    """One reader following one job: its history, then its live events, gap-free; [] is a tick.

    A plain object whose ``next`` waits on the subscription's future itself, rather than a chain of
    async generators: thousands are open at once, and each generator costs its frame, a ``weakref``
    in the loop's registry and an ``aclosing`` wrapper. ``join`` may come first, so that the first
    history page can be read in the caller's own round trip (``start``); otherwise ``next`` joins
    and reads it. On a reset (the hub's link lost) it re-joins and re-reads from its last id.
    """

    __slots__ = ("_hub", "_page", "_phase", "cursor", "job_id")

    def __init__(self, hub: Hub, job_id: str, after: str) -> None:
        super().__init__(hub._max_events, hub._max_bytes)
        self._hub = hub
        self.job_id = job_id
        #: The id of the last event handed out (exclusive start of what comes next).
        self.cursor = after
        self._phase = _NEW
        self._page: list[StoredEvent] | None = None

    @property
    def joined(self) -> bool:
        return self._phase != _NEW

    async def join(self) -> None:
        """Register with the hub and wait until the job's channel is live: history read after this
        misses nothing. Raises HubClosed, a Redis error if the hub has no link, TimeoutError."""
        if self._hub._closed:
            raise HubClosed()
        try:
            await self._hub._join(self.job_id, self, JOIN_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self._phase = _JOINED

    def start(self, after: str, page: list[StoredEvent] | None) -> None:
        """Read from ``after``; ``page``: the first history page after it, read since ``join``
        (None: ``next`` reads it)."""
        self.cursor = after
        self._page = page

    async def next(self) -> list[StoredEvent]:
        while True:
            if self._phase == _LIVE:
                try:
                    events = self.ready()
                except Reset:
                    self.close()
                    self._phase = _NEW
                    continue
                if events is None:
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                if events:
                    self.cursor = events[-1].id
                return events
            if self._phase == _NEW:
                await self.join()
            page, self._page = self._page, None
            if page is None:
                page = await self._hub._store.read(self.job_id, self.cursor, HISTORY_PAGE)
            if page:
                self.cursor = page[-1].id
            if len(page) < HISTORY_PAGE:
                self.floor = parse_id(self.cursor)
                self._phase = _LIVE
            if page:
                return page

    def idle(self) -> asyncio.Future[None] | None:
        """While live with nothing to hand out: a future the reader can await itself (one frame
        fewer per idle stream than a suspended ``next``), done when there may be; else None (call
        ``next``)."""
        if self._phase != _LIVE or self.queue or self.ticked or self.reset or self.closed or self.gone:
            return None
        if self.overflowed:
            return None
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    def close(self) -> None:
        """Leave the hub (idempotent)."""
        self._hub._leave(self.job_id, self)


class Hub:
    """Implements the ``Feed`` protocol with one subscription connection per process (a ``Link``).

    Three tasks own the link: the reader (connects, reads, reconnects), the writer (sends every
    SUBSCRIBE, UNSUBSCRIBE and PING, queued by the others), and the tick. Callers never await
    redis-py themselves to join or leave: on Python 3.11 a cancellation (a long-poll's deadline, a
    client gone) that lands inside redis-py's ``asyncio.wait_for`` around a send can be swallowed,
    and the caller would wait on past its deadline.
    """

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
        #: (Un)subscribe commands sent per channel and not yet answered: a channel is live once the
        #: reply to its latest SUBSCRIBE arrives, never on an older one's.
        self._inflight: dict[str, int] = {}
        #: Commands for the writer task, in order.
        self._outbox: list[tuple[str, ...]] = []
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        #: Times the Redis subscription was lost and every reader re-read from its last id.
        self.resets = 0
        #: Why the link could not be opened, while it cannot: joins fail at once meanwhile.
        self._link_error: Exception | None = None
        self._last_message_at = 0.0
        self._live_since = 0.0
        self._backoff_s = 0.0

    def __repr__(self) -> str:
        readers = sum(len(channel.subscribers) for channel in self._channels.values())
        return f"Hub(channels={len(self._channels)}, subscribers={readers}, {self._link!r})"

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    async def start(self) -> None:
        if isinstance(self._redis, RedisCluster):
            await self._redis.initialize()  # learn every node, to pick one at random
        self._tasks = [
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._write_loop()),
            asyncio.create_task(self._tick_loop()),
        ]

    def stop_readers(self) -> None:
        """End every follower now (gateway shutdown): their readers reconnect, to another gateway."""
        self._closed = True
        for channel in list(self._channels.values()):
            for sub in channel.subscribers:
                sub.closed = True
                sub.wake()

    async def close(self) -> None:
        self.stop_readers()
        self._outbox_ready.set()  # the writer sees the flag
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._link.close()

    # ---- the Feed protocol

    def follower(self, job_id: str, after: str) -> Follower:
        """A reader of ``job_id`` from ``after``: see ``Follower``. Its owner closes it."""
        return Follower(self, job_id, after)

    async def follow(self, job_id: str, after: str) -> AsyncGenerator[list[StoredEvent]]:
        follower = self.follower(job_id, after)
        try:
            while True:
                yield await follower.next()
        finally:
            follower.close()

    async def wait(self, job_id: str, after: str, timeout_s: float) -> list[StoredEvent]:
        """Events after ``after`` as soon as there is one, or [] by the deadline. The deadline is
        checked between steps too, not only by cancellation: a tiny ``timeout_s`` answers at once."""
        if self._closed:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        sub = self._subscription()
        try:
            await self._join(job_id, sub, min(JOIN_TIMEOUT_S, timeout_s))
            history = await self._store.read(job_id, after, HISTORY_PAGE)
            if history or loop.time() >= deadline:
                return history
            sub.floor = parse_id(after)
            while (remaining_s := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(remaining_s):  # around futures only: never swallowed
                        batch = await sub.next()
                except Reset:
                    return await self._store.read(job_id, after, HISTORY_PAGE)
                if batch:
                    return batch
            return []
        except (TimeoutError, JobGone, SubscriberOverflow, HubClosed):
            return []
        finally:
            self._leave(job_id, sub)

    # ---- subscriptions

    def _subscription(self) -> Subscription:
        if self._closed:
            raise HubClosed()
        return Subscription(self._max_events, self._max_bytes)

    @property
    def store(self) -> JobStore:
        return self._store

    async def join_all(self, subs: Mapping[str, Subscription], timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Register each subscription for its job (or user feed, keys.user_feed) and wait until
        every one's channel is live, their SUBSCRIBEs sent together; callers ``leave`` each.
        Raises HubClosed, a Redis error if the hub has no link, TimeoutError."""
        if self._closed:
            raise HubClosed()
        waits = [ready for job_id, sub in subs.items() if (ready := self._register(job_id, sub)) is not None]
        if waits:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(asyncio.gather(*waits))

    def leave(self, job_id: str, sub: Subscription) -> None:
        self._leave(job_id, sub)

    async def _join(self, job_id: str, sub: Subscription, timeout_s: float) -> None:
        """Register ``sub`` and wait until the job's channel subscription is live (callers `_leave`)."""
        ready = self._register(job_id, sub)
        if ready is None:
            return  # most joins: the job already has readers here
        # History is read only once the subscription is live, so nothing falls between the two.
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(ready)

    def _register(self, job_id: str, sub: Subscription) -> asyncio.Future[None] | None:
        """Add ``sub`` to the job's channel (subscribing it if new); the channel's readiness to wait
        for, or None if it is live already."""
        if not self._link.live and self._link_error is not None:
            raise RedisConnectionError(f"no redis subscription: {self._link_error}")
        channel = self._channels.get(job_id)
        if channel is None:
            channel = _Channel(job_id)
            self._channels[job_id] = channel
            name = keys.live_channel(job_id)
            self._by_name[name] = channel
            self._queue("SUBSCRIBE", name)
        channel.subscribers.add(sub)
        return None if channel.ready.done() else channel.ready

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
                self._queue("UNSUBSCRIBE", name)

    # ---- the writer: the one task that sends on the link

    def _queue(self, *command: str) -> None:
        self._outbox.append(command)
        self._outbox_ready.set()

    async def _write_loop(self) -> None:
        # Checks the flag too: redis-py can swallow a cancellation that lands inside one of its calls.
        while not self._closed:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            commands, self._outbox = self._outbox, []
            for command in commands:
                await self._write(command)

    async def _write(self, command: tuple[str, ...]) -> None:
        """Send one command while the link is live; (un)subscribes count the replies to come. While
        the link is down nothing is sent: the reader subscribes every followed channel when it is
        back, and a channel left meanwhile is simply not among them."""
        verb, names = command[0], command[1:]
        if verb == "UNSUBSCRIBE":
            names = tuple(name for name in names if name not in self._by_name)  # unless re-joined
            if not names:
                return
        for name in names:
            self._inflight[name] = self._inflight.get(name, 0) + 1
        if not await self._link.send(*command):
            for name in names:
                self._count_reply(name)

    def _count_reply(self, name: str) -> bool:
        """One (un)subscribe of ``name`` answered (or never sent); True if it was the latest one."""
        left = self._inflight.pop(name, 0) - 1
        if left > 0:
            self._inflight[name] = left
        return left <= 0

    # ---- the reader: the one task that connects and reads the link

    async def _read_loop(self) -> None:
        failed = False
        while not self._closed:
            if not self._link.live:
                if not await self._go_live(failed=failed):
                    failed = True
                    await asyncio.sleep(max(self._backoff_s, 0.5))
                    continue
                failed = False
            try:
                response = await self._link.read()
            except Exception as exc:
                self._log_lost(exc)
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
            await self._link.drop()
            return False
        if self._link_error is not None:
            logger.info("hub subscription back: readers re-read from their last ids")
            self._link_error = None
        self._last_message_at = self._live_since = asyncio.get_running_loop().time()
        self._inflight.clear()
        # Live before the list is taken: a channel joined from here on is queued by its join.
        self._link.live = True
        if self._by_name:
            self._outbox.insert(0, ("SUBSCRIBE", *self._by_name))
            self._outbox_ready.set()
        return True

    def _log_lost(self, exc: Exception) -> None:
        if isinstance(exc, ResponseError):
            # Redis refused a command (an ACL without channel rights, say): retrying cannot help
            # until the operator acts, so it is an error, and the reconnects back off.
            logger.error("hub subscription refused by redis: %s", exc)
        else:
            logger.warning("hub lost its redis subscription: %s", exc)

    async def _link_lost(self) -> None:
        """Readers re-read from their last ids: events published meanwhile were lost to pub/sub. A
        link that fails again soon after it came back reconnects after a growing pause."""
        await self._link.drop()
        self._reset_all()
        now = asyncio.get_running_loop().time()
        quick = now - self._live_since < RECONNECT_QUIET_S
        self._backoff_s = min(max(RECONNECT_MIN_S, 2 * self._backoff_s), RECONNECT_MAX_S) if quick else 0.0
        if self._backoff_s:
            await asyncio.sleep(self._backoff_s)

    def _handle(self, response: Any) -> None:
        if not isinstance(response, list) or len(response) < 2:
            return  # a PONG while nothing was followed
        kind = response[0]
        if kind == "message":
            self._publish(response[1], response[2])  # the hot path
        elif kind in ("subscribe", "unsubscribe"):
            if self._count_reply(response[1]) and kind == "subscribe":
                self._mark_live(response[1])

    def _mark_live(self, name: str) -> None:
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
        self._queue("PING")

    async def _drop_expired(self) -> None:
        """Jobs whose TTL ran out publish nothing: look for them once per tick, for all readers at once."""
        job_ids = [job_id for job_id in self._channels if not keys.is_user_feed(job_id)]
        if not job_ids:
            return
        for job_id, exists in zip(job_ids, await self._store.exist(job_ids), strict=True):
            channel = self._channels.get(job_id)
            if not exists and channel is not None:
                self._end(channel, gone=True)
