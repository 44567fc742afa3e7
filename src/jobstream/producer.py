"""JobContext: the handle a job body writes its events through; EventWriter: the worker's side of it.

Deltas are coalesced before they reach Redis (flushed every ``flush_ms`` or ``flush_bytes``), so a
model that yields one token per call costs one XADD per batch, not one per token. Any other event
flushes pending text first, so readers always see events in the order the job produced them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from pydantic import JsonValue, ValidationError

from jobstream import metrics, sentry
from jobstream.connection import UNAVAILABLE
from jobstream.errors import ValidationFailed, pydantic_errors
from jobstream.models import TERMINAL_EVENT, EventIn, JobStatus, Progress, to_json
from jobstream.store import Appended, JobStore, OutgoingEvent

logger = logging.getLogger("jobstream.producer")

#: How long a job's writes wait for Redis to come back before the job fails.
OUTAGE_S = 30.0


class JobFailed(Exception):
    """Raise from a handler to fail the job with ``message`` shown to readers as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EventWriter:
    """The worker's side of a job's output, which handlers never see (they get a JobContext).

    Coalesces deltas into batches, appends each batch (riding out a Redis outage), and writes the
    job's ending, the one append that may wait for replicas and that reports how the job ended.
    """

    def __init__(
        self, store: JobStore, job_id: str, *, attempt: int = 1, flush_ms: int = 100, flush_bytes: int = 4096
    ) -> None:
        self._store = store
        self.job_id = job_id
        self.attempt = attempt
        self._flush_s = flush_ms / 1000
        self._flush_bytes = flush_bytes
        #: Text not written yet, by kind (``delta``, ``reasoning``) in the order it came.
        self._pending: list[tuple[str, list[str]]] = []
        self._pending_bytes = 0
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._error: BaseException | None = None
        self._batches = 0

    def __repr__(self) -> str:
        return f"EventWriter(job_id={self.job_id!r}, attempt={self.attempt})"

    async def delta(self, text: str, kind: str = "delta") -> None:
        """Add text (of a ``delta``, or a ``reasoning`` event) to the pending batch; written once
        it is big or old enough, consecutive text of one kind as one event."""
        self._raise_deferred()
        if not text:
            return
        if self._pending and self._pending[-1][0] == kind:
            self._pending[-1][1].append(text)
        else:
            self._pending.append((kind, [text]))
        self._pending_bytes += len(text.encode())
        if self._pending_bytes >= self._flush_bytes or self._flush_s == 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_later())

    async def append(self, events: list[OutgoingEvent]) -> list[str]:
        """Flush pending text, then append ``events`` in one atomic step; returns their ids."""
        self._raise_deferred()
        async with self._lock:
            return (await self._write(self._take_pending() + events)).ids

    async def end(self, events: list[OutgoingEvent], *, replicas: int = 0) -> JobStatus:
        """Write the job's ending (pending text, then ``events``, the last a `done`) and wait for
        ``replicas``. Returns the status the job ended with: `cancelled` whenever a cancel was
        accepted before this write, whatever ``events`` said.

        A background flush that failed meanwhile is not raised here, as it is by the handler's own
        calls: the ending is written all the same (riding out an outage like any append), so that
        the job ends now rather than when its lease lapses. Its text is lost, and logged as such."""
        if self._error is not None:
            error, self._error = self._error, None
            logger.warning(
                "job %s: a delta batch could not be written (%r); writing the job's ending", self.job_id, error
            )
        async with self._lock:
            return (await self._write(self._take_pending() + events, replicas)).status

    async def flush(self) -> None:
        """Write pending text now."""
        async with self._lock:
            pending = self._take_pending()
            if pending:
                await self._write(pending)

    async def close(self) -> None:
        """Stop the flush timer (the run is over; its ending carried any pending text)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _write(self, events: list[OutgoingEvent], replicas: int = 0) -> Appended:
        """Append, riding out a Redis outage of up to OUTAGE_S (a restart, a failover) rather than
        failing the job; each batch carries a name, so a retry after a lost reply adds nothing twice."""
        self._batches += 1
        batch = f"{self.attempt}.{self._batches}"
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + OUTAGE_S
        delay_s = 0.1
        while True:
            try:
                return await self._store.write(self.job_id, events, batch=batch, replicas=replicas)
            except UNAVAILABLE as exc:
                metrics.redis_errors.labels("append").inc()
                if loop.time() + delay_s > give_up_at:
                    raise
                logger.warning("job %s: redis unavailable (%s), retrying its append", self.job_id, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    def _take_pending(self) -> list[OutgoingEvent]:
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        self._timer = None
        if not self._pending:
            return []
        events = [
            OutgoingEvent(kind, json.dumps({"text": "".join(parts)}, ensure_ascii=False, separators=(",", ":")))
            for kind, parts in self._pending
        ]
        self._pending.clear()
        self._pending_bytes = 0
        return events

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_s)
        try:
            await self.flush()
        except Exception as exc:  # surfaced at the handler's next call
            self._error = exc

    def _raise_deferred(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class JobContext:
    """What a handler gets as its first argument: the job's identity and the calls that write its
    events, which readers receive in the order they were made.

    The handler's return value becomes the job's ``result`` event; raising :class:`JobFailed`
    fails it with a message for readers. The worker writes that ending (``result`` or ``failure``,
    then ``done``) itself, once the handler returns or raises.
    """

    def __init__(self, writer: EventWriter, job_type: str) -> None:
        self._writer = writer
        self._job_type = job_type

    def __repr__(self) -> str:
        return f"JobContext(job_id={self.job_id!r}, type={self.job_type!r}, attempt={self.attempt})"

    @property
    def job_id(self) -> str:
        """The job's id, as clients see it."""
        return self._writer.job_id

    @property
    def job_type(self) -> str:
        """The job's registered type, e.g. ``demo.story``."""
        return self._job_type

    @property
    def attempt(self) -> int:
        """Which run of the job this is: 1, then 2 and more when an idempotent job is retried after
        its worker was lost."""
        return self._writer.attempt

    async def delta(self, text: str) -> None:
        """
        Append text to the job's output. Consecutive deltas are coalesced into one event per
        ``JOBSTREAM_DELTA_FLUSH_MS`` (or ``JOBSTREAM_DELTA_FLUSH_BYTES``), so calling this once per
        token is cheap; any other event flushes them first.

        :param text: the text to add; an empty string adds nothing
        """
        await self._writer.delta(text)

    async def reasoning(self, text: str) -> None:
        """
        Append to the model's reasoning, shown apart from its answer (a ``reasoning`` event;
        AI SDK readers get reasoning parts). Coalesced as ``delta`` is.

        :param text: the reasoning text to add; an empty string adds nothing
        """
        await self._writer.delta(text, "reasoning")

    async def tool_call(self, call_id: str, name: str, input: JsonValue) -> None:
        """
        Tell readers that the job calls a tool: a ``tool-call`` event ``{"id", "name", "input"}``.

        :param call_id: the call's id, unique within the job; its result names it
        :param name: the tool's name, e.g. ``"search"``
        :param input: what the tool is called with, any JSON value
        """
        await self.emit("tool-call", {"id": call_id, "name": name, "input": input})

    async def tool_result(self, call_id: str, output: JsonValue = None, *, error: str | None = None) -> None:
        """
        Tell readers what a tool call gave: a ``tool-result`` event ``{"id", "output"}``, or
        ``{"id", "error"}`` when the call failed.

        :param call_id: the id given to :meth:`tool_call`
        :param output: the tool's output, any JSON value
        :param error: why the call failed, for people (then ``output`` is not sent)
        """
        data: dict[str, JsonValue] = (
            {"id": call_id, "error": error} if error is not None else {"id": call_id, "output": output}
        )
        await self.emit("tool-result", data)

    async def progress(self, current: float, total: float | None = None, message: str | None = None) -> None:
        """
        Report progress: a ``progress`` event, also kept in the job's status document.

        :param current: how far the job is, e.g. items done (not negative)
        :param total: how far it will go, if known; readers then get a ``percent``
        :param message: a short text for people, e.g. ``"3 of 10 pages"``
        :raises ValueError: if the values are not valid progress
        """
        try:
            data = Progress(current=current, total=total, message=message).model_dump(mode="json")
        except ValidationError as exc:
            raise ValueError(f"invalid progress: {pydantic_errors(exc)}") from None
        sentry.job_breadcrumb("progress", self.job_id, current=current, total=total)
        await self.emit("progress", data)

    async def log(self, message: str, **fields: JsonValue) -> None:
        """
        Append a ``log`` event ``{"message": message, **fields}`` for readers to show.

        :param message: what happened, for people
        :param fields: any JSON values to send with it
        """
        await self.emit("log", {"message": message, **fields})

    async def emit(self, type: str, data: JsonValue) -> None:
        """
        Append one event of any type. Known types (``delta``, ``progress``, ``log``, ...) have their
        data checked. ``done`` is the worker's to write, once the handler returns or raises.

        :param type: the event's type, e.g. ``"custom.step"``
        :param data: its data, any JSON value
        :raises ValidationFailed: if the type or its data are not valid, or the type is ``done``
        """
        if type == TERMINAL_EVENT:
            raise ValidationFailed("a handler ends its job by returning or raising, not with a 'done' event")
        try:
            event = EventIn(type=type, data=data)
        except ValidationError as exc:
            raise ValidationFailed(f"invalid {type!r} event", errors=pydantic_errors(exc)) from None
        await self._writer.append([OutgoingEvent(event.type, to_json(event.data))])

    async def flush(self) -> None:
        """Write pending delta text now instead of at the next flush interval (e.g. before a long
        pause, so readers see everything so far)."""
        await self._writer.flush()


def result_data(value: Any) -> dict[str, Any]:
    """A handler's return value as the ``result`` event's object."""
    if isinstance(value, dict):
        return value
    if hasattr(value, "model_dump"):
        dumped: dict[str, Any] = value.model_dump(mode="json")
        return dumped
    return {"value": value}
