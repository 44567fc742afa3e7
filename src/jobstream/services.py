"""What a gateway process holds while it runs, built in the app's lifespan and shared by the routes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import Request

from jobstream.archive import Archive
from jobstream.auth import Authenticator
from jobstream.connection import RedisClient
from jobstream.feed import Feed
from jobstream.ratelimit import ConnectionLeases, CreateLimiter
from jobstream.registry import Registry
from jobstream.sendwatch import SendWatch
from jobstream.settings import Settings
from jobstream.store import JobStore


@dataclass
class Services:
    settings: Settings
    registry: Registry
    redis: RedisClient
    store: JobStore
    feed: Feed
    auth: Authenticator
    limiter: CreateLimiter
    leases: ConnectionLeases
    long_polls: ConnectionLeases
    send_watch: SendWatch
    #: Set when the gateway shuts down: open streams end so that their readers reconnect elsewhere.
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    #: The API key `jobstream dev` made up, for its demo page; None everywhere else.
    dev_key: str | None = None
    #: Where jobs Redis has forgotten are read (archived.py): a BoundedArchive; None without one.
    archive: Archive | None = None

    def begin_shutdown(self) -> None:
        """End open streams and waiting long-polls now; their readers reconnect elsewhere."""
        self.shutdown.set()
        self.feed.stop_readers()


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found
