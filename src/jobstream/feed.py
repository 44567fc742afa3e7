"""The reading side: how a gateway waits for new events of a job.

``Feed`` is the seam between the HTTP routes and Redis for live reads; ``hub.Hub`` implements it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Mapping
from typing import Protocol

from jobstream.store import JobStore, StoredEvent
from jobstream.subscription import Subscription


class Follower(Protocol):
    """One reader following one job (``Feed.follower``): its history, then its live events."""

    @property
    def joined(self) -> bool: ...

    async def join(self) -> None:
        """Register for the job's live events now, so that history read from here on misses
        nothing (then pass it to ``start``)."""
        ...

    def start(self, after: str, page: list[StoredEvent] | None) -> None:
        """Read from ``after``; ``page`` is the first history page after it if read since ``join``."""
        ...

    async def next(self) -> list[StoredEvent]:
        """The next batch: history pages, then live events; [] is a heartbeat tick."""
        ...

    def idle(self) -> Awaitable[None] | None:
        """Something to await until ``next`` may have more (None: call ``next`` now)."""
        ...

    def close(self) -> None: ...


class Feed(Protocol):
    def follower(self, job_id: str, after: str) -> Follower:
        """A reader of ``job_id`` from ``after`` (the caller closes it)."""
        ...

    def follow(self, job_id: str, after: str) -> AsyncGenerator[list[StoredEvent]]:
        """Batches of events after ``after``, forever; an empty batch is a heartbeat tick."""
        ...

    async def wait(self, job_id: str, after: str, timeout_s: float) -> list[StoredEvent]:
        """Events after ``after`` as soon as there is at least one, or [] when ``timeout_s`` ends."""
        ...

    @property
    def store(self) -> JobStore: ...

    async def join_all(self, subs: Mapping[str, Subscription], timeout_s: float = ...) -> None:
        """Register each subscription for its job (or a user feed) and wait until all are live."""
        ...

    def leave(self, job_id: str, sub: Subscription) -> None: ...

    async def start(self) -> None: ...

    def stop_readers(self) -> None:
        """End every follower now, so that its reader reconnects elsewhere."""
        ...

    async def close(self) -> None: ...
