"""The reading side: how a gateway waits for new events of a job.

``Feed`` is the seam between the HTTP routes and Redis for live reads; ``hub.Hub`` implements it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from jobstream.store import StoredEvent


class Feed(Protocol):
    def follow(self, job_id: str, after: str) -> AsyncGenerator[list[StoredEvent]]:
        """Batches of events after ``after``, forever; an empty batch is a heartbeat tick."""
        ...

    async def wait(self, job_id: str, after: str, timeout_s: float) -> list[StoredEvent]:
        """Events after ``after`` as soon as there is at least one, or [] when ``timeout_s`` ends."""
        ...

    async def start(self) -> None: ...

    def stop_readers(self) -> None:
        """End every follower now, so that its reader reconnects elsewhere."""
        ...

    async def close(self) -> None: ...
