"""One reader following several jobs (``GET /v1/events``, long-polls of ``GET /v1/poll``).

Each job is a subscription of its own in the hub, so a job is subscribed once per process however
many readers follow it, alone or in groups; all of a group's subscriptions wake the group's one
waiter, and the group looks only at those that woke it. History is read for every job that needs
it in one round trip, then each goes live as a single reader's follower does (``hub.Follower``).
With a tag, the group also listens to the user's feed of that tag (keys.user_feed) and takes in
each job created with it, from its first event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from jobstream.cursor import parse_id
from jobstream.feed import Feed
from jobstream.hub import HISTORY_PAGE
from jobstream.store import StoredEvent
from jobstream.subscription import HubClosed, JobGone, Reset, Subscription

_JOIN, _READ, _LIVE = 0, 1, 2
#: What a group hands out: events with the job each belongs to.
Batch = list[tuple[str, StoredEvent]]
#: Lists a tag's jobs again: job id -> the event id to read after.
Relist = Callable[[], Awaitable[dict[str, str]]]


class _Member(Subscription):
    """One job of a group: its live events, where its reading stands, and its phase."""

    __slots__ = ("_group", "after", "job_id", "phase")

    def __init__(self, group: JobGroup, job_id: str, after: str) -> None:
        super().__init__(group.max_events, group.max_bytes)
        self._group = group
        self.job_id = job_id
        #: The id of the last event handed out (exclusive start of what comes next).
        self.after = after
        self.phase = _JOIN

    def wake(self) -> None:
        self._group._woken(self)


class _TagFeed(Subscription):
    """The user's feed of new jobs with one tag: each announcement's data is a job id."""

    __slots__ = ("_group",)

    def __init__(self, group: JobGroup) -> None:
        super().__init__(group.max_events, group.max_bytes)
        self._group = group

    def wake(self) -> None:
        self._group._woken(None)


class JobGroup:
    """The jobs one reader follows. ``next`` hands out batches of (job id, event) in each job's
    order, [] for a heartbeat tick; jobs that expire or are deleted leave the group and are told
    by ``take_gone``. Raises as a follower does when reading ends (HubClosed, SubscriberOverflow,
    Redis errors). The owner closes it."""

    def __init__(
        self, hub: Feed, *, page_size: int = HISTORY_PAGE, max_events: int = 1000, max_bytes: int = 1 << 20
    ) -> None:
        self._hub = hub
        #: Events of history read per job and step: a group's step reads every job that needs it.
        self.page_size = page_size
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._members: dict[str, _Member] = {}
        #: Live members woken since last looked at (a wake looks at these alone).
        self._due: dict[str, _Member] = {}
        #: Members still joining the hub or reading history (new, or reset while live).
        self._unsettled: dict[str, _Member] = {}
        self._feed: tuple[str, _TagFeed] | None = None
        self._relist: Relist | None = None
        self._feed_due = False
        self._gone: list[str] = []
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._members

    async def follow_feed(self, feed: str, relist: Relist) -> None:
        """Take in every job the feed announces from now on (join before listing the tag's jobs:
        a job created in between is then announced, not missed). ``relist`` lists the tag's jobs
        again (id -> the event id to read after) once the feed is back after a lost link, when
        announcements may have been missed."""
        sub = _TagFeed(self)
        self._feed = (feed, sub)
        self._relist = relist
        await self._hub.join_all({feed: sub})

    async def add(self, positions: dict[str, str]) -> None:
        """Follow these jobs (id -> the event id to read after), joined to the hub when this
        returns, so that history read from here on (``start``) misses nothing."""
        members = {job_id: _Member(self, job_id, after) for job_id, after in positions.items() if job_id not in self}
        self._members.update(members)
        self._unsettled.update(members)
        await self._join(list(members.values()))

    def start(self, job_id: str, page: list[StoredEvent]) -> Batch:
        """A joined job's first history page, read by the caller after ``add``: the events to hand
        out first (the job goes live if the page was its last)."""
        member = self._members[job_id]
        return [(job_id, event) for event in self._take_page(member, page)]

    def remove(self, job_id: str) -> None:
        member = self._members.pop(job_id, None)
        self._due.pop(job_id, None)
        self._unsettled.pop(job_id, None)
        if member is not None:
            self._hub.leave(job_id, member)

    def take_gone(self) -> list[str]:
        """Jobs that expired or were deleted since last asked (they have left the group)."""
        gone, self._gone = self._gone, []
        return gone

    async def next(self) -> Batch:
        while True:
            if self._closed:
                raise HubClosed()
            ticked = await self._take_feed() if self._feed_due else False
            out = await self._settle() if self._unsettled else []
            due, self._due = self._due, {}
            for member in due.values():
                events = self._live(member)
                if events is None:
                    continue
                if not events:
                    ticked = True
                out += [(member.job_id, event) for event in events]
            if out or ticked or self._gone:
                return out
            if self._unsettled:
                continue  # reset while live: join again and re-read, before waiting on anything
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _settle(self) -> Batch:
        """Join the members that need it, then read one step of history for every member that
        needs it, in one round trip; those whose history ends go live."""
        joining = [member for member in self._unsettled.values() if member.phase == _JOIN]
        if joining:
            await self._join(joining)
        reading = list(self._unsettled.values())
        pages = await self._hub.store.read_many([(m.job_id, m.after) for m in reading], self.page_size)
        out: Batch = []
        for member, page in zip(reading, pages, strict=True):
            out += [(member.job_id, event) for event in self._take_page(member, page)]
        return out

    def close(self) -> None:
        """Leave the hub (idempotent)."""
        self._closed = True
        for job_id, member in self._members.items():
            self._hub.leave(job_id, member)
        self._members.clear()
        self._due.clear()
        self._unsettled.clear()
        if self._feed is not None:
            self._hub.leave(*self._feed)
            self._feed = None

    # ---- inside

    def _woken(self, member: _Member | None) -> None:
        if member is None:
            self._feed_due = True
        elif member.phase == _LIVE and member.job_id in self._members:
            self._due[member.job_id] = member
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _join(self, members: list[_Member]) -> None:
        await self._hub.join_all({member.job_id: member for member in members})
        for member in members:
            member.phase = _READ

    def _take_page(self, member: _Member, page: list[StoredEvent]) -> list[StoredEvent]:
        if page:
            member.after = page[-1].id
        if len(page) < self.page_size:
            # Live from here: events the hub queued meanwhile up to this id were in the page.
            member.floor = parse_id(member.after)
            member.phase = _LIVE
            self._unsettled.pop(member.job_id, None)
            self._due[member.job_id] = member  # look at what queued while reading
        return page

    def _live(self, member: _Member) -> list[StoredEvent] | None:
        """What a live member has now (as Subscription.ready); a reset sends it back to join
        and re-read from its last id, and a job gone leaves the group."""
        try:
            events = member.ready()
        except Reset:
            self._hub.leave(member.job_id, member)
            member.phase = _JOIN
            self._unsettled[member.job_id] = member
            return None
        except JobGone:
            self.remove(member.job_id)
            self._gone.append(member.job_id)
            return None
        if events:
            member.after = events[-1].id
        return events

    async def _take_feed(self) -> bool:
        """Join the jobs the tag's feed announced; True for a heartbeat tick of the feed."""
        if self._feed is None:
            return False
        self._feed_due = False
        feed, sub = self._feed
        try:
            announced = sub.ready()
        except Reset:
            # Announcements may have been missed while the link was down: join the feed again,
            # then list the tag's jobs again.
            self._hub.leave(feed, sub)
            await self._hub.join_all({feed: sub})
            if self._relist is not None:
                await self.add(await self._relist())
            return False
        if announced is None:
            return False
        if not announced:
            return True
        await self.add({event.data: "0-0" for event in announced})
        return False
