"""JobStore: every Redis read and write of a job's metadata and event stream."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from jobstream import keys, metrics, scripts, sse
from jobstream.connection import RedisClient
from jobstream.cursor import is_before
from jobstream.errors import Forbidden, JobEnded, JobNotFound
from jobstream.jobindex import JobIndex
from jobstream.models import SNAPSHOT_EVENT, TERMINAL_EVENT, JobStatus, iso, to_json
from jobstream.outbox import ARCHIVE_CONSUMER, WEBHOOK_CONSUMER, Outbox
from jobstream.pipelines import ScriptCall, run_scripts
from jobstream.settings import Settings

logger = logging.getLogger("jobstream.store")

#: Separators of a published batch (set in scripts.APPEND): events by US (0x1f), an event's id,
#: type and data by RS (0x1e). Neither can occur in compact JSON (control characters are
#: escaped), in an event type, or in a stream id.
EVENT_SEP = "\x1f"
FIELD_SEP = "\x1e"
#: Stream entries as redis-py returns them with decode_responses=True.
Entries = list[tuple[str, dict[str, str]]]
#: What a caller is told when a job is not theirs (by authorization, or by a script that checks it).
NOT_YOURS = "This job belongs to another user or token."
#: What a producer is told when it appends over HTTP to a job that a worker writes.
NOT_EXTERNAL = "Only jobs of type 'external' take events over HTTP; a worker writes this one."


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class StoredEvent:
    """An event as kept in the stream; ``data`` stays encoded JSON so it is written to readers as is.

    Its SSE frame is encoded on first use and kept: the hub hands one object to every local reader.
    So is the rest of its frame for many-jobs readers (``wrapped``), whose ``id:`` line is each
    reader's own.
    """

    __slots__ = ("_frame", "data", "id", "type", "wrapped")

    def __init__(self, id: str, type: str, data: str) -> None:
        self.id = id
        self.type = type
        self.data = data
        self._frame: bytes | None = None
        #: Set by routes.many on first use: its frame for many-jobs readers after the ``id:`` line.
        self.wrapped: str | None = None

    def __repr__(self) -> str:
        return f"StoredEvent({self.id!r}, {self.type!r}, {self.data!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StoredEvent):
            return NotImplemented
        return (self.id, self.type, self.data) == (other.id, other.type, other.data)

    __hash__ = None  # type: ignore[assignment]

    @property
    def frame(self) -> bytes:
        if self._frame is None:
            self._frame = sse.frame(self.id, self.type, self.data)
        return self._frame

    @property
    def is_done(self) -> bool:
        return self.type == TERMINAL_EVENT


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    type: str
    data: str


@dataclass(frozen=True, slots=True)
class Nudge:
    """Who must hear of a record a write put in the job's outbox, and the record's time (epoch ms)."""

    record_ms: int
    consumers: tuple[str, ...]

    @classmethod
    def of(cls, reply: str) -> Nudge | None:
        """From the write script's "<ms>:<consumer>,<consumer>" ('' = no record)."""
        if not reply:
            return None
        record_ms, _, consumers = reply.partition(":")
        return cls(int(record_ms), tuple(consumers.split(",")))


@dataclass(frozen=True, slots=True)
class Appended:
    """What an append wrote: the new events' ids (none for a repeated batch) and the job's status
    after it; and when the job started running (epoch ms; None if it has not, or not told)."""

    ids: list[str]
    status: JobStatus
    started_ms: int | None = field(default=None, compare=False)
    #: When the append moved the job's status: its owner and new expiry (epoch ms), for the index.
    moved: tuple[str, int] | None = field(default=None, compare=False)
    #: When the append wrote a record into the job's outbox: its time (epoch ms) and the job's
    #: consumers, for the nudge.
    outbox: Nudge | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A job that a cancel ended at once: its type, and when it started running (epoch ms; None if
    it had not)."""

    job_type: str
    started_ms: int | None


def done_event(status: JobStatus) -> OutgoingEvent:
    return OutgoingEvent(TERMINAL_EVENT, to_json({"status": status.value}))


@dataclass(frozen=True)
class JobRecord:
    """A job's metadata hash, decoded."""

    fields: Mapping[str, str]

    @classmethod
    def new(
        cls,
        *,
        job_id: str,
        owner: str,
        job_type: str,
        input: Mapping[str, Any],
        ttl_s: int,
        tags: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        output_max: int = 0,
        webhook_url: str = "",
        webhook_statuses: Sequence[str] = (),
        archived: bool = False,
    ) -> JobRecord:
        """``output_max``: the bound of the job's snapshot text in bytes (0: it keeps none).
        ``webhook_statuses``: the statuses whose moves its webhook is told of (none: no webhook),
        at ``webhook_url`` (empty: the operator's JOBSTREAM_WEBHOOK_URL). ``archived``: the job is
        copied to the archive once it ends (its status document says when: ``archived``)."""
        created = now_ms()
        fields = {
            "id": job_id,
            "type": job_type,
            "owner": owner,
            "status": JobStatus.pending.value,
            "created_ms": str(created),
            "updated_ms": str(created),
            "expires_ms": str(created + ttl_s * 1000),
            "ttl_s": str(ttl_s),
            "input": to_json(input),
            "attempt": "0",
        }
        # Kept as JSON, as given (absent: none), and returned as stored.
        if tags:
            fields["tags"] = to_json(list(tags))
        if metadata:
            fields["metadata"] = to_json(metadata)
        if output_max:
            fields["output_max"] = str(output_max)
        # `outbox`: the moves recorded for the outbox's consumers (outbox.py), `consumers`: who they are.
        wanted: list[str] = []
        consumers: list[str] = []
        if webhook_statuses:
            fields["webhook_statuses"] = ",".join(webhook_statuses)
            if webhook_url:
                fields["webhook_url"] = webhook_url
            wanted += webhook_statuses
            consumers.append(WEBHOOK_CONSUMER)
        if archived:
            # "0" until the archive holds the job; also what makes Redis keep it until then (scripts._WRITE).
            fields["archived"] = "0"
            wanted += [s.value for s in JobStatus if s.terminal and s.value not in wanted]
            consumers.append(ARCHIVE_CONSUMER)
        if consumers:
            fields["outbox"] = ",".join(dict.fromkeys(wanted))
            fields["consumers"] = ",".join(consumers)
        return cls(fields)

    @property
    def id(self) -> str:
        return self.fields["id"]

    @property
    def tags(self) -> list[str]:
        stored = self.fields.get("tags")
        return cast(list[str], json.loads(stored)) if stored else []

    @property
    def metadata(self) -> dict[str, Any]:
        stored = self.fields.get("metadata")
        return cast(dict[str, Any], json.loads(stored)) if stored else {}

    @property
    def type(self) -> str:
        return self.fields["type"]

    @property
    def owner(self) -> str:
        return self.fields["owner"]

    @property
    def status(self) -> JobStatus:
        return JobStatus(self.fields["status"])

    @property
    def input(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.fields.get("input", "{}"))
        return value

    @property
    def expires_ms(self) -> int:
        return int(self.fields["expires_ms"])

    @property
    def last_event_id(self) -> str | None:
        return self.fields.get("last_event_id")

    def _ms(self, name: str) -> int | None:
        value = self.fields.get(name)
        return int(value) if value else None

    def _json(self, name: str) -> Any:
        value = self.fields.get(name)
        return json.loads(value) if value else None

    def view(self) -> dict[str, Any]:
        """The body of ``GET /v1/jobs/{id}``."""
        return {
            "id": self.id,
            "type": self.type,
            "status": self.status.value,
            "progress": self._json("progress"),
            "created_at": iso(self._ms("created_ms")),
            "updated_at": iso(self._ms("updated_ms")),
            "started_at": iso(self._ms("started_ms")),
            "completed_at": iso(self._ms("completed_ms")),
            "expires_at": iso(self._ms("expires_ms")),
            "error": self._json("error"),
            "result": self._json("result"),
            "last_event_id": self.last_event_id,
            "tags": self.tags,
            "metadata": self.metadata,
            **self._archived(),
        }

    def _archived(self) -> dict[str, bool]:
        """``archived``, for a job created with an archive configured (else absent)."""
        stored = self.fields.get("archived")
        return {} if stored is None else {"archived": stored == "1"}

    def view_json(self) -> bytes:
        """``view()`` encoded as ``to_json`` encodes it, byte for byte, without decoding and encoding
        again what is stored as JSON already (progress, error, result): those are spliced in as is.
        Strings Redis holds for the job's id and last event id need no escaping (a uuid, a stream
        id); its status is a known one (else ValueError, as ``view()`` raises); its type goes
        through the encoder."""
        fields = self.fields
        last_event_id = fields.get("last_event_id")
        last = "null" if last_event_id is None else f'"{last_event_id}"'
        return (
            f'{{"id":"{fields["id"]}","type":{to_json(fields["type"])},"status":"{self.status.value}"'
            f',"progress":{fields.get("progress") or "null"}'
            f',"created_at":{_iso_json(fields.get("created_ms"))}'
            f',"updated_at":{_iso_json(fields.get("updated_ms"))}'
            f',"started_at":{_iso_json(fields.get("started_ms"))}'
            f',"completed_at":{_iso_json(fields.get("completed_ms"))}'
            f',"expires_at":{_iso_json(fields.get("expires_ms"))}'
            f',"error":{fields.get("error") or "null"},"result":{fields.get("result") or "null"}'
            f',"last_event_id":{last}'
            f',"tags":{fields.get("tags") or "[]"},"metadata":{fields.get("metadata") or "{}"}'
            f"{_archived_json(fields.get('archived'))}}}"
        ).encode()

    def created_view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "status": self.status.value,
            "created_at": iso(self._ms("created_ms")),
            "expires_at": iso(self._ms("expires_ms")),
            "tags": self.tags,
            "metadata": self.metadata,
        }


def _archived_json(stored: str | None) -> str:
    return "" if stored is None else ',"archived":true' if stored == "1" else ',"archived":false'


def _iso_json(ms: str | None) -> str:
    return f'"{iso(int(ms))}"' if ms else "null"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a job's events up to ``last_event_id`` (every type but `done`) add up to: the text of
    its deltas and its progress (JSON as stored). ``last_event_id`` None: it covers no event yet."""

    last_event_id: str | None
    text: str
    progress: str

    @classmethod
    def of_reply(cls, reply: list[str]) -> Snapshot | None:
        """From a script's ``snapshot_of()`` (scripts._SNAPSHOT): None when the job keeps none."""
        if not reply:
            return None
        last_event_id, text, progress = reply
        return cls(last_event_id or None, text, progress)

    def output_json(self) -> str:
        """The status document's ``output``."""
        return to_json({"text": self.text, "last_event_id": self.last_event_id})

    def event(self, status: JobStatus) -> StoredEvent:
        """The `snapshot` event a late reader starts with (``last_event_id`` must be set)."""
        assert self.last_event_id is not None
        data = f'{{"text":{to_json(self.text)},"progress":{self.progress},"status":"{status.value}"}}'
        return StoredEvent(self.last_event_id, SNAPSHOT_EVENT, data)


@dataclass(frozen=True, slots=True)
class JobRead:
    """A job as one reader's round trip found it: its metadata (``id``, ``owner``, ``status``,
    ``last_event_id`` and ``tags`` only: what authorization and the end check use), where reading starts (an
    exclusive stream id), the oldest kept event id when the reader's cursor is older (events were
    trimmed away), and the events from there (none unless asked for, and only for its owner); and,
    when asked for, its snapshot, after which reading then starts. ``archived``: read from the
    archive (archived.py), Redis having forgotten the job: every field, and nothing live follows."""

    job: JobRecord
    after: str
    first_kept: str | None
    events: list[StoredEvent]
    snapshot: Snapshot | None = None
    archived: bool = False


#: What a status document shows of a job's metadata hash (``id`` first: absent means no job).
_VIEW_FIELDS = (
    "id",
    "type",
    "owner",
    "status",
    "progress",
    "created_ms",
    "updated_ms",
    "started_ms",
    "completed_ms",
    "expires_ms",
    "error",
    "result",
    "last_event_id",
    "tags",
    "metadata",
    "archived",
)
#: Index pages one listing reads at most, when entries that fell behind left a page short.
_LIST_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class ListQuery:
    """Which of a user's jobs a listing shows: statuses (none: any), type and tag (None: any), how
    many, and after which index sequence (None: from the newest)."""

    limit: int
    statuses: tuple[str, ...] = ()
    job_type: str | None = None
    tag: str | None = None
    after_seq: int | None = None

    def matches(self, job: JobRecord) -> bool:
        return (
            (not self.statuses or job.status.value in self.statuses)
            and (self.job_type is None or job.type == self.job_type)
            and (self.tag is None or self.tag in job.tags)
        )


#: Meta fields that follow the latest event of a type, so GET shows them without reading the stream.
_META_FIELD_OF_EVENT = {"progress": "progress", "result": "result", "failure": "error"}


class JobStore:
    def __init__(self, client: RedisClient, settings: Settings) -> None:
        self._redis = client
        self._settings = settings
        self._append = client.register_script(scripts.APPEND)
        self._request_cancel = client.register_script(scripts.REQUEST_CANCEL)
        self._start_attempt = client.register_script(scripts.START_ATTEMPT)
        self._read = client.register_script(scripts.READ)
        self._status_with_output = client.register_script(scripts.STATUS_WITH_OUTPUT)
        self._create = client.register_script(scripts.CREATE)
        self._delete = client.register_script(scripts.DELETE)
        self.index = JobIndex(client)
        self.outbox = Outbox(client)

    async def create(self, job: JobRecord) -> None:
        """Store the metadata with its TTL, then queue the job. Both are done before this returns:
        in one step on a single Redis; on a cluster, where the queue lives on another slot than the
        job, one after the other."""
        job_id, ttl_s = job.id, int(job.fields["ttl_s"])
        meta = keys.meta_key(job_id)
        queued = job.type != "external"
        together = queued and not isinstance(self._redis, RedisCluster)
        channels = [keys.live_channel(keys.user_feed(job.owner, tag)) for tag in job.tags]
        args: list[str | int] = [ttl_s, job_id, f"0-0{FIELD_SEP}job{FIELD_SEP}{job_id}", len(channels), *channels]
        for name, value in job.fields.items():
            args += [name, value]
        # The owner's index entry first: one whose job never came to be is dropped when listed.
        index_call = self.index.add_call(
            user=job.owner,
            job_id=job_id,
            job_type=job.type,
            tags=job.tags,
            now_ms=int(job.fields["created_ms"]),
            expires_ms=int(job.fields["expires_ms"]),
            retention_ms=max(self._settings.retention_s, self._settings.failed_retention_s) * 1000,
        )
        # A job with an outbox (webhooks) is registered with its consumers before it exists, as
        # its index entry is: one whose job never came to be is dropped when looked at.
        first = [index_call]
        consumers = job.fields.get("consumers")
        if consumers:
            first += self.outbox.create_calls(job_id, int(job.fields["created_ms"]), ttl_s, consumers.split(","))
        create_keys = [meta, keys.queue_key] if together else [meta]
        try:
            if isinstance(self._redis, RedisCluster):
                # Each in its own slot, none depending on another: at once.
                await asyncio.gather(*(self.index.run(call) for call in first))
                await self._create(keys=create_keys, args=args)
            else:  # one round trip
                await run_scripts(self._redis, [*first, (self._create, create_keys, args)])
        except ResponseError:
            if together:  # the script stopped after storing the job, before queueing it: undo
                await self._redis.delete(meta)
            raise
        if queued and not together:
            try:
                await self._redis.xadd(keys.queue_key, {"job": job_id})
            except BaseException:
                # Undo the half-made job rather than leave it pending.
                await self._redis.delete(meta)
                raise

    async def get(self, job_id: str) -> JobRecord | None:
        # HGETALL, input and all: an HMGET of the status document's fields costs the gateway more
        # (its arguments), unless the input is tens of KiB.
        fields = cast(dict[str, str], await self._redis.hgetall(keys.meta_key(job_id)))
        return JobRecord(fields) if fields else None

    async def get_with_output(self, job_id: str) -> tuple[JobRecord, Snapshot | None] | None:
        """The job and its snapshot (None: it keeps none), in one step; None if there is no such job."""
        reply = await self._status_with_output(keys=self._append_keys(job_id))
        if not reply:
            return None
        flat, snapshot = reply
        return JobRecord(dict(zip(flat[::2], flat[1::2], strict=True))), Snapshot.of_reply(snapshot)

    async def read_job(
        self, job_id: str, cursor: str | None, limit: int = 0, *, reader: str = "", snapshot: bool = False
    ) -> JobRead | None:
        """A job (the fields a reader needs: id, owner, status, last event id) and where reading it
        starts, in one round trip; None if there is no such job.

        ``cursor``: None (from the start), ``$`` (after the newest event) or a validated stream id.
        With ``limit`` > 0 the events after the start come along, but only for a job of
        ``reader``: a caller who may read the job passes its user. Reading them is speculative:
        the caller must still authorize the job before answering anything of it.

        ``snapshot`` (with no cursor): the job's snapshot comes along too, if it keeps one that
        covers an event, on the same terms as the events, and reading starts after it."""
        args: list[str | int] = [cursor or "", limit, reader, "1" if snapshot else ""]
        reply = await self._read(keys=self._append_keys(job_id), args=args)
        return _job_read(reply, cursor)

    async def list_jobs(self, user: str, query: ListQuery) -> tuple[list[JobRecord], int | None]:
        """A page of ``user``'s jobs that pass ``query``, newest first, and the index sequence the
        next page starts after (None: no more). Two round trips (the index, then the jobs), unless
        the index had entries that fell behind their jobs (gone, or a status it missed): those are
        repaired and the page is topped up from where it stopped."""
        found: list[JobRecord] = []
        after_seq = query.after_seq
        for _ in range(_LIST_ROUNDS):
            page = await self.index.page(
                user,
                now_ms=now_ms(),
                after_seq=after_seq,
                limit=query.limit - len(found),
                statuses=query.statuses,
                job_type=query.job_type,
                tag=query.tag,
            )
            jobs = await self._view_fields(page.job_ids)
            gone = [job_id for job_id, job in zip(page.job_ids, jobs, strict=True) if job is None]
            present = [job for job in jobs if job is not None and job.owner == user]
            found += [job for job in present if query.matches(job)]
            await self.index.remove(user, gone, gone_at_ms=now_ms())
            for job in present:
                if not query.matches(job) or job.id in page.unsure:
                    # Its status, or (running) its expiry, moved on without the index.
                    await self.index.status_changed(user, job.id, job.status.value, job.expires_ms, now_ms())
            after_seq = page.next_seq
            if len(found) == query.limit or after_seq is None:
                break
        return found, after_seq

    async def _view_fields(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """The status-document fields of several jobs (not their input), in one round trip."""
        if not job_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.meta_key(job_id), _VIEW_FIELDS)
            replies = await pipe.execute()
        return [
            JobRecord({name: value for name, value in zip(_VIEW_FIELDS, values, strict=True) if value is not None})
            if values[0] is not None
            else None
            for values in replies
        ]

    async def read_jobs(
        self, positions: Sequence[tuple[str, str | None]], limit: int, *, reader: str
    ) -> list[JobRead | None]:
        """``read_job`` for several jobs (job id, cursor) in one round trip (on a cluster, one
        concurrent call each)."""
        if isinstance(self._redis, RedisCluster):
            calls = [
                self._read(keys=self._append_keys(job_id), args=[cursor or "", limit, reader])
                for job_id, cursor in positions
            ]
            replies = await asyncio.gather(*calls)
        else:
            reads: list[ScriptCall] = [
                (self._read, self._append_keys(job_id), [cursor or "", limit, reader]) for job_id, cursor in positions
            ]
            replies = await run_scripts(self._redis, reads)
        return [_job_read(reply, cursor) for reply, (_, cursor) in zip(replies, positions, strict=True)]

    async def read_many(self, positions: Sequence[tuple[str, str]], count: int) -> list[list[StoredEvent]]:
        """``read`` for several jobs (job id, id to read after) in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id, after in positions:
                pipe.xrange(keys.events_key(job_id), min=f"({after}", max="+", count=count)
            replies = cast(list[Entries], await pipe.execute())
        return [[decode_entry(entry_id, fields) for entry_id, fields in entries] for entries in replies]

    async def owners(self, job_ids: Sequence[str]) -> list[str | None]:
        """Each job's owner (None: no such job), in one round trip."""
        if not job_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.meta_key(job_id), "owner")
            return list(await pipe.execute())

    async def exist(self, job_ids: Sequence[str]) -> list[bool]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(keys.meta_key(job_id))
            return [bool(found) for found in await pipe.execute()]

    async def append(
        self, job_id: str, events: Sequence[OutgoingEvent], *, batch: str = "", replicas: int = 0
    ) -> list[str]:
        """Append events and apply the status change they carry, atomically; returns their ids.
        Raises JobNotFound or JobEnded. See ``write``."""
        if not events:
            return []
        return (await self.write(job_id, events, batch=batch, replicas=replicas)).ids

    async def write(
        self,
        job_id: str,
        events: Sequence[OutgoingEvent],
        *,
        batch: str = "",
        replicas: int = 0,
        owner: str = "",
        external_only: bool = False,
    ) -> Appended:
        """Append events and apply the status change they carry, atomically. Raises JobNotFound or JobEnded.

        An ending (a `done` completed or failed) written after a cancel was accepted is written as
        `cancelled`, without its result or failure event: the returned status says which.
        ``batch`` names this batch for its producer: appending the same name twice in a row adds it
        once (the second call returns no ids, and the job's status: how it ended, for a batch that
        ended it), so a producer may retry after a lost reply, its ending included.
        ``replicas`` > 0 then waits (Redis WAIT, on the same connection) until that many replicas
        have the write, up to the configured timeout; fewer is logged, not raised.
        ``owner`` (an append on a user's behalf) and ``external_only`` (an append over HTTP) are
        checked in the same step, before anything is written, after the job's existence and before
        its end, as the HTTP API orders its answers: Forbidden, then JobEnded (not `external`)."""
        if not events:
            raise ValueError("nothing to append")
        args = self._append_args(job_id, events, batch, owner=owner, external_only=external_only)
        if not replicas:
            return await self._indexed(job_id, _appended(await self._append(keys=self._append_keys(job_id), args=args)))
        timeout_ms = self._settings.durable_end_timeout_ms
        reply, acked = await self._append_and_wait(job_id, args, replicas, timeout_ms)
        if int(acked) < replicas:
            logger.warning("job %s: write reached %s of %d replicas within %d ms", job_id, acked, replicas, timeout_ms)
        return await self._indexed(job_id, _appended(reply))

    async def _indexed(self, job_id: str, appended: Appended) -> Appended:
        """Tell the owner's index a status the write moved, and the outbox's consumers a record it
        wrote (second steps: the index lives in the owner's slot, the consumers' due sets in their
        own; one left behind by a crash here is repaired when a listing reads the job, and when the
        consumers look at the job as registered)."""
        if appended.moved is not None:
            owner, expires_ms = appended.moved
            await self._moved(job_id, owner, appended.status, expires_ms, appended.outbox)
        return appended

    async def _moved(self, job_id: str, owner: str, status: JobStatus, expires_ms: int, outbox: Nudge | None) -> None:
        now = now_ms()
        await self.index.status_changed(owner, job_id, status.value, expires_ms, now)
        if outbox is not None:
            try:
                await self.outbox.nudge(job_id, outbox.record_ms, now, outbox.consumers)
            except RedisError as exc:
                metrics.redis_errors.labels("outbox").inc()
                logger.warning("job %s: its outbox record waits for a consumer's look (%s)", job_id, type(exc).__name__)

    async def _append_and_wait(
        self, job_id: str, args: list[str | int], replicas: int, timeout_ms: int
    ) -> tuple[list[str], int]:
        """The append script, then WAIT on the same connection: WAIT counts the replicas that have
        this connection's writes, so on another connection it would count nothing of ours."""
        job_keys = self._append_keys(job_id)
        if isinstance(self._redis, RedisCluster):
            # WAIT names no key: pin it to the node of the job's slot, where the script runs.
            node = self._redis.get_node_from_key(job_keys[0])
            async with self._redis.pipeline() as cluster_pipe:
                cluster_pipe.execute_command("EVAL", scripts.APPEND, len(job_keys), *job_keys, *args)
                cluster_pipe.execute_command("WAIT", replicas, timeout_ms, target_nodes=node)
                reply, acked = await cluster_pipe.execute()
            return reply, int(acked)
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._append(keys=job_keys, args=args, client=pipe)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            reply, acked = await pipe.execute()
        return reply, int(acked)

    async def append_many(self, appends: Sequence[tuple[str, Sequence[OutgoingEvent]]]) -> list[list[str]]:
        """Several appends (each atomic on its own) in one round trip, or on a cluster one
        concurrent call each; raises as ``append`` on the first failure."""
        if isinstance(self._redis, RedisCluster):
            calls = [
                self._append(keys=self._append_keys(job_id), args=self._append_args(job_id, events))
                for job_id, events in appends
            ]
            replies = await asyncio.gather(*calls)
        else:
            writes: list[ScriptCall] = [
                (self._append, self._append_keys(job_id), self._append_args(job_id, events))
                for job_id, events in appends
            ]
            replies = await run_scripts(self._redis, writes)
        return [
            (await self._indexed(job_id, _appended(reply))).ids
            for (job_id, _), reply in zip(appends, replies, strict=True)
        ]

    @staticmethod
    def _append_keys(job_id: str) -> list[str]:
        return [keys.meta_key(job_id), keys.events_key(job_id), keys.output_key(job_id)]

    def _append_args(
        self,
        job_id: str,
        events: Sequence[OutgoingEvent],
        batch: str = "",
        *,
        owner: str = "",
        external_only: bool = False,
    ) -> list[str | int]:
        new_status = ""
        meta_fields: dict[str, str] = {}
        for event in events:
            if event.type in ("status", TERMINAL_EVENT):
                new_status = json.loads(event.data)["status"]
            if event.type in _META_FIELD_OF_EVENT:
                meta_fields[_META_FIELD_OF_EVENT[event.type]] = event.data
        args: list[str | int] = [
            now_ms(),
            self._settings.stream_maxlen,
            self._settings.retention_s,
            self._settings.failed_retention_s,
            new_status,
            keys.live_channel(job_id),
            len(meta_fields),
            batch,
            owner,
            "1" if external_only else "",
        ]
        for name, value in meta_fields.items():
            args += [name, value]
        for event in events:
            args += [event.type, event.data]
        return args

    async def request_cancel(self, job_id: str, *, owner: str = "") -> Cancelled | None:
        """Accept a cancel (raises JobEnded once the job has ended, JobNotFound if it is gone, and
        Forbidden if it is not ``owner``'s, when given: checked in the same step, in that order).

        Returns what ended here when the job ended `cancelled` in the same step (no worker holds
        it: it is pending, or external), None when its worker will stop it; either way any ending
        written from now on is `cancelled`."""
        args = self._append_args(job_id, [done_event(JobStatus.cancelled)], owner=owner)
        reply = await self._request_cancel(keys=self._append_keys(job_id), args=args)
        if reply[0] == "cancelling":
            return None
        if reply[0] != "cancelled":
            _appended(reply)  # raises for a job gone, not the owner's, or ended
        job_type, started, moved_owner, expires, outbox_ms = reply[1:6]
        await self._moved(job_id, moved_owner, JobStatus.cancelled, int(expires), Nudge.of(outbox_ms))
        return Cancelled(job_type, int(started) if started else None)

    async def start_attempt(self, job_id: str, entry_id: str) -> tuple[str, int]:
        """Count a worker's run of a job from its queue entry ``entry_id``. Returns ('ok', attempt),
        ('gone'|'ended'|'duplicate'|'cancelled', 0); see scripts.START_ATTEMPT."""
        reply = await self._start_attempt(keys=[keys.meta_key(job_id)], args=[entry_id])
        if reply[0] == "ok":
            return "ok", int(reply[1])
        return reply[0], 0

    async def should_stop(self, job_ids: Sequence[str]) -> set[str]:
        """Of running jobs, those a worker must stop: cancel requested, ended elsewhere, or gone."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.meta_key(job_id), ["cancel", "status"])
            replies = await pipe.execute()
        return {
            job_id
            for job_id, (cancel, status) in zip(job_ids, replies, strict=True)
            if status is None or cancel == "1" or JobStatus(status).terminal
        }

    async def delete(self, job_id: str, *, owner: str = "") -> str | None:
        """Remove the job's keys and tell the hubs it is gone (an empty message), so that open
        readers close at once; one step. With ``owner``, the job must exist (else JobNotFound) and
        be theirs (else Forbidden), checked first in the same step. Returns the job's ``archived``
        flag as it was ("1": the archive holds it; "0": not yet; None: no job, or no archive)."""
        args = [owner, keys.live_channel(job_id)]
        if owner and not isinstance(self._redis, RedisCluster):
            # The owner's index forgets it in the same round trip (harmless if the job is not
            # theirs: then it is not in their index).
            calls = [(self._delete, self._append_keys(job_id), args), self.index.remove_call(owner, [job_id])]
            reply, _ = await run_scripts(self._redis, calls)
        else:
            reply = await self._delete(keys=self._append_keys(job_id), args=args)
            if reply[0] == "deleted" and reply[2]:
                await self.index.remove(reply[2], [job_id])
        if reply[0] != "deleted":
            _appended(reply)  # raises for a job gone or not the owner's
        return cast(str, reply[3]) or None

    async def read(self, job_id: str, after: str, count: int) -> list[StoredEvent]:
        """Events strictly after ``after`` (a stream id), oldest first."""
        entries = cast(
            Entries, await self._redis.xrange(keys.events_key(job_id), min=f"({after}", max="+", count=count)
        )
        return [decode_entry(entry_id, fields) for entry_id, fields in entries]

    async def oldest_event_id(self, job_id: str) -> str | None:
        entries = cast(Entries, await self._redis.xrange(keys.events_key(job_id), count=1))
        return entries[0][0] if entries else None

    async def newest_event_id(self, job_id: str) -> str | None:
        entries = cast(Entries, await self._redis.xrevrange(keys.events_key(job_id), count=1))
        return entries[0][0] if entries else None

    async def remember_idempotent(self, key: str, value: Mapping[str, Any], ttl_s: int) -> dict[str, Any] | None:
        """Store ``value`` under ``key`` unless one exists; returns the existing value or None if stored."""
        stored = await self._redis.set(key, to_json(value), nx=True, ex=ttl_s)
        if stored:
            return None
        return await self.recall_idempotent(key)

    async def recall_idempotent(self, key: str) -> dict[str, Any] | None:
        raw = await self._redis.get(key)
        return json.loads(raw) if raw else None

    async def forget_idempotent(self, key: str) -> None:
        await self._redis.delete(key)


def _job_read(reply: list[Any], cursor: str | None) -> JobRead | None:
    """The READ script's reply (see scripts.READ); None when there is no such job."""
    if not reply:
        return None
    (record_id, owner, status, last_event_id, tags), after, oldest, flat, found = reply
    fields = {"id": record_id, "owner": owner, "status": status}
    if last_event_id:
        fields["last_event_id"] = last_event_id
    if tags:  # what a tag's read token is checked against
        fields["tags"] = tags
    kept = Snapshot.of_reply(found)
    if kept is not None and kept.last_event_id is None:
        kept = None  # it covers nothing: reading starts at the first event
    start = kept.last_event_id if kept is not None else cursor
    first_kept = oldest if oldest and start and is_before(start, oldest) else None
    events = [StoredEvent(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
    return JobRead(JobRecord(fields), after, first_kept, events, kept)


def _appended(reply: list[str]) -> Appended:
    """The append script's reply: {'ok', status, started_ms, owner, expires_ms, outbox_ms, id...} |
    {'repeat', status} | {'gone'} |
    {'forbidden'} | {'not_external'} | {'ended', status}."""
    kind = reply[0]
    if kind == "ok":
        _, status, started, owner, expires, outbox_ms, *ids = reply
        moved = (owner, int(expires)) if owner else None
        return Appended(ids, JobStatus(status), int(started) if started else None, moved, Nudge.of(outbox_ms))
    if kind == "repeat":
        return Appended([], JobStatus(reply[1]))
    if kind == "gone":
        raise JobNotFound()
    if kind == "forbidden":
        raise Forbidden(NOT_YOURS)
    if kind == "not_external":
        raise JobEnded(NOT_EXTERNAL)
    raise JobEnded(f"The job has already ended ({reply[1]}).")


def decode_entry(entry_id: str, fields: Mapping[str, str]) -> StoredEvent:
    return StoredEvent(entry_id, fields["t"], fields["d"])
