"""A local reader's side of the hub: its bounded buffer of live events, and how reading ends.

Thousands of subscriptions live at once (one per open connection), so each is a slotted object
with a list and a bare future; the hub pushes a published batch to every subscription of the job
once, and the reader takes it from there.
"""

from __future__ import annotations

import asyncio

from jobstream.cursor import StreamId, parse_id
from jobstream.store import EVENT_SEP, FIELD_SEP, StoredEvent


class SubscriberOverflow(Exception):
    """The subscriber fell further behind than its buffer allows."""


class JobGone(Exception):
    """The job was deleted or expired while a reader followed it."""


class HubClosed(Exception):
    """The gateway is shutting down."""


class Reset(Exception):
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

    def ready(self) -> list[StoredEvent] | None:
        """What a reader gets now without waiting: live events, [] for a tick (write a ping if
        idle), None for nothing yet; raises how reading ends (Reset, HubClosed, JobGone,
        SubscriberOverflow)."""
        self._raise_if_ended()
        events = self.take()
        if events:
            return events
        if self.ticked:
            self.ticked = False
            return []
        return None

    async def wait(self) -> None:
        """Until the hub pushes, ticks or ends this subscription."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def next(self) -> list[StoredEvent]:
        """Wait for live events or a tick; [] means a tick (write a ping if idle)."""
        while (events := self.ready()) is None:
            await self.wait()
        return events

    def _raise_if_ended(self) -> None:
        if self.reset:
            self.reset = False
            self.queue = []
            self.size_bytes = 0
            raise Reset()
        if self.closed:
            raise HubClosed()
        if self.gone:
            raise JobGone()
        if self.overflowed:
            raise SubscriberOverflow()
