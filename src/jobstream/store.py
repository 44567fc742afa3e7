"""JobStore: every Redis read and write of a job's metadata and event stream."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster

from jobstream import keys, scripts, sse
from jobstream.connection import RedisClient
from jobstream.errors import JobEnded, JobNotFound
from jobstream.models import TERMINAL_EVENT, JobStatus, iso, to_json
from jobstream.settings import Settings

logger = logging.getLogger("jobstream.store")

#: Stream entries as redis-py returns them with decode_responses=True.
Entries = list[tuple[str, dict[str, str]]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class StoredEvent:
    """An event as kept in the stream; ``data`` stays encoded JSON so it is written to readers as is.

    Its SSE frame is encoded on first use and kept: the hub hands one object to every local reader.
    """

    __slots__ = ("_frame", "data", "id", "type")

    def __init__(self, id: str, type: str, data: str) -> None:
        self.id = id
        self.type = type
        self.data = data
        self._frame: bytes | None = None

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
class Appended:
    """What an append wrote: the new events' ids (none for a repeated batch) and the job's status after it."""

    ids: list[str]
    status: JobStatus


def done_event(status: JobStatus) -> OutgoingEvent:
    return OutgoingEvent(TERMINAL_EVENT, to_json({"status": status.value}))


@dataclass(frozen=True)
class JobRecord:
    """A job's metadata hash, decoded."""

    fields: Mapping[str, str]

    @classmethod
    def new(cls, *, job_id: str, owner: str, job_type: str, input: Mapping[str, Any], ttl_s: int) -> JobRecord:
        created = now_ms()
        return cls(
            {
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
        )

    @property
    def id(self) -> str:
        return self.fields["id"]

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
        }

    def created_view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "status": self.status.value,
            "created_at": iso(self._ms("created_ms")),
            "expires_at": iso(self._ms("expires_ms")),
        }


#: Meta fields that follow the latest event of a type, so GET shows them without reading the stream.
_META_FIELD_OF_EVENT = {"progress": "progress", "result": "result", "failure": "error"}


class JobStore:
    def __init__(self, client: RedisClient, settings: Settings) -> None:
        self._redis = client
        self._settings = settings
        self._append = client.register_script(scripts.APPEND)
        self._request_cancel = client.register_script(scripts.REQUEST_CANCEL)
        self._start_attempt = client.register_script(scripts.START_ATTEMPT)

    async def create(self, job: JobRecord) -> None:
        """Store the metadata with its TTL, then queue the job. Both are done before this returns."""
        job_id, ttl_s = job.id, int(job.fields["ttl_s"])
        meta = keys.meta_key(job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(meta, mapping=cast(Mapping[Any, Any], job.fields))
            pipe.expire(meta, ttl_s)
            await pipe.execute()
        if job.type != "external":
            try:
                await self._redis.xadd(keys.queue_key, {"job": job_id})
            except BaseException:
                # The queue is on another slot than the job: undo the half-made job rather than leave it pending.
                await self._redis.delete(meta)
                raise

    async def get(self, job_id: str) -> JobRecord | None:
        fields = cast(dict[str, str], await self._redis.hgetall(keys.meta_key(job_id)))
        return JobRecord(fields) if fields else None

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
        self, job_id: str, events: Sequence[OutgoingEvent], *, batch: str = "", replicas: int = 0
    ) -> Appended:
        """Append events and apply the status change they carry, atomically. Raises JobNotFound or JobEnded.

        An ending (a `done` completed or failed) written after a cancel was accepted is written as
        `cancelled`, without its result or failure event: the returned status says which.
        ``batch`` names this batch for its producer: appending the same name twice in a row adds it
        once (the second call returns no ids, and the job's status: how it ended, for a batch that
        ended it), so a producer may retry after a lost reply, its ending included.
        ``replicas`` > 0 then waits (Redis WAIT, on the same connection) until that many replicas
        have the write, up to the configured timeout; fewer is logged, not raised."""
        if not events:
            raise ValueError("nothing to append")
        args = self._append_args(job_id, events, batch)
        if not replicas:
            return _appended(await self._append(keys=self._append_keys(job_id), args=args))
        timeout_ms = self._settings.durable_end_timeout_ms
        reply, acked = await self._append_and_wait(job_id, args, replicas, timeout_ms)
        if int(acked) < replicas:
            logger.warning("job %s: write reached %s of %d replicas within %d ms", job_id, acked, replicas, timeout_ms)
        return _appended(reply)

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
            return [_appended(reply).ids for reply in await asyncio.gather(*calls)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id, events in appends:
                await self._append(keys=self._append_keys(job_id), args=self._append_args(job_id, events), client=pipe)
            replies = await pipe.execute()
        return [_appended(reply).ids for reply in replies]

    @staticmethod
    def _append_keys(job_id: str) -> list[str]:
        return [keys.meta_key(job_id), keys.events_key(job_id)]

    def _append_args(self, job_id: str, events: Sequence[OutgoingEvent], batch: str = "") -> list[str | int]:
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
        ]
        for name, value in meta_fields.items():
            args += [name, value]
        for event in events:
            args += [event.type, event.data]
        return args

    async def request_cancel(self, job_id: str) -> bool:
        """Accept a cancel (raises JobEnded once the job has ended, JobNotFound if it is gone).

        Returns True when the job ended `cancelled` here, in the same step (no worker holds it: it
        is pending, or external), False when its worker will stop it; either way any ending
        written from now on is `cancelled`."""
        args = self._append_args(job_id, [done_event(JobStatus.cancelled)])
        reply = await self._request_cancel(keys=self._append_keys(job_id), args=args)
        if reply[0] == "cancelling":
            return False
        _appended(reply)  # raises for a job gone or ended
        return True

    async def start_attempt(self, job_id: str) -> tuple[str, int]:
        """Count a worker's run of a job. Returns ('ok', attempt), ('gone'|'ended'|'cancelled', 0)."""
        reply = await self._start_attempt(keys=[keys.meta_key(job_id)])
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

    async def delete(self, job_id: str) -> bool:
        removed = await self._redis.delete(keys.meta_key(job_id), keys.events_key(job_id))
        # An empty message tells the hubs that the job is gone, so open readers close at once.
        await self._redis.publish(keys.live_channel(job_id), "")
        return bool(removed)

    async def read(self, job_id: str, after: str, count: int) -> list[StoredEvent]:
        """Events strictly after ``after`` (a stream id), oldest first."""
        entries = cast(
            Entries, await self._redis.xrange(keys.events_key(job_id), min=f"({after}", max="+", count=count)
        )
        return [decode_entry(entry_id, fields) for entry_id, fields in entries]

    async def trimmed_first_id(self, job: JobRecord) -> str | None:
        """The oldest kept event id if the stream has lost old events to its MAXLEN cap, else None.

        Costs no round trip until the append script has marked the job as trimmed."""
        if job.fields.get("trimmed") != "1":
            return None
        return await self.oldest_event_id(job.id)

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


def _appended(reply: list[str]) -> Appended:
    """The append script's reply: {'ok', status, id...} | {'repeat', status} | {'gone'} | {'ended', status}."""
    if reply[0] == "gone":
        raise JobNotFound()
    if reply[0] == "ended":
        raise JobEnded(f"The job has already ended ({reply[1]}).")
    return Appended(list(reply[2:]), JobStatus(reply[1]))


def decode_entry(entry_id: str, fields: Mapping[str, str]) -> StoredEvent:
    return StoredEvent(entry_id, fields["t"], fields["d"])
