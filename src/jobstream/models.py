"""Wire models: what clients send and what they get back."""

from __future__ import annotations

import functools
import json
import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictFloat, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError


class JobStatus(StrEnum):
    #: Created and queued; no worker has started it.
    pending = "pending"
    #: A worker (or an external producer) is producing events.
    running = "running"
    #: Ended with a result.
    completed = "completed"
    #: Ended with a failure.
    failed = "failed"
    #: Ended by a cancel request.
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.cancelled})
TERMINAL_EVENT = "done"
#: Event names: lowercase words, so a name can never break an SSE frame.
EVENT_TYPE_PATTERN = r"^[a-z][a-z0-9_.\-]{0,63}$"
#: Events the gateway itself sends to readers (`truncated`: the resume point was trimmed away;
#: `snapshot`: a late joiner's summary). No producer may append them, so readers can trust them.
RESERVED_EVENT_TYPES = ("snapshot", "truncated")
SNAPSHOT_EVENT = "snapshot"

# Numbers of request bodies are strict: a JSON number, never `true` or "5" read as one. Finiteness
# (no NaN or Infinity) is each model's `allow_inf_nan=False`, for what handlers pass in Python;
# JSON bodies are already refused at parsing (routes/_common.read_json).
NonNegativeNumber = Annotated[StrictInt, Field(ge=0)] | Annotated[StrictFloat, Field(ge=0)]
PositiveNumber = Annotated[StrictInt, Field(gt=0)] | Annotated[StrictFloat, Field(gt=0)]


#: A job's tag: what an app finds its jobs by (``chat:42``, ``report``).
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
MAX_TAGS = 16
#: The largest metadata object, as the UTF-8 bytes of its compact JSON.
MAX_METADATA_BYTES = 4096
Tag = Annotated[str, Field(pattern=TAG_PATTERN)]


#: Webhook event names, and the status each is sent for.
WEBHOOK_EVENTS = {
    "job.started": JobStatus.running,
    "job.completed": JobStatus.completed,
    "job.failed": JobStatus.failed,
    "job.cancelled": JobStatus.cancelled,
}
WebhookEvent = Literal["job.started", "job.completed", "job.failed", "job.cancelled"]
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("job.completed", "job.failed", "job.cancelled")


class WebhookIn(BaseModel):
    """Where to tell the job's owner of its status moves (webhooks.py)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048, description="http(s); never a private address.")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS), min_length=1, description="Default: the three endings."
    )

    @field_validator("events")
    @classmethod
    def _drop_duplicate_events(cls, events: list[WebhookEvent]) -> list[WebhookEvent]:
        return list(dict.fromkeys(events))


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=128)
    input: dict[str, JsonValue] = Field(default_factory=dict)
    ttl: StrictInt | None = Field(
        default=None, ge=1, description="Idle timeout in seconds, bounded by the server's maximum."
    )
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS, description="Duplicates are dropped.")
    metadata: dict[str, JsonValue] = Field(
        default_factory=dict, description=f"Stored and returned as given; at most {MAX_METADATA_BYTES} bytes of JSON."
    )
    webhook: WebhookIn | None = None

    @field_validator("tags")
    @classmethod
    def _drop_duplicate_tags(cls, tags: list[str]) -> list[str]:
        return list(dict.fromkeys(tags))  # first-seen order

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, metadata: dict[str, JsonValue]) -> dict[str, JsonValue]:
        if len(to_json(metadata).encode()) > MAX_METADATA_BYTES:
            raise PydanticCustomError(
                "metadata_too_large", "must be at most {limit} bytes of compact JSON", {"limit": MAX_METADATA_BYTES}
            )
        return metadata


#: A scoped read token (POST /v1/read-tokens) covers at most this many listed jobs.
MAX_TOKEN_JOBS = 100
MAX_TOKEN_TTL_S = 3600


class ReadTokenCreate(BaseModel):
    """A read token of several of the caller's jobs, or of every job of theirs with a tag."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TOKEN_JOBS)
    tag: Tag | None = None
    ttl: StrictInt = Field(default=MAX_TOKEN_TTL_S, ge=1, le=MAX_TOKEN_TTL_S, description="Seconds.")

    @model_validator(mode="after")
    def _jobs_or_tag(self) -> ReadTokenCreate:
        if (self.jobs is None) == (self.tag is None):
            raise PydanticCustomError("jobs_or_tag", "give either 'jobs' or 'tag'")
        return self


class Progress(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    current: NonNegativeNumber
    total: PositiveNumber | None = None
    message: str | None = Field(default=None, max_length=1000)
    percent: float | None = None

    @model_validator(mode="after")
    def _fill_percent(self) -> Progress:
        if self.total:
            self.percent = round(min(100.0, 100.0 * self.current / self.total), 2)
        else:
            self.percent = None
        return self


class DeltaData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class ReasoningData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class ToolCallData(BaseModel):
    """A tool the job calls (AI SDK readers get a tool part)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=200)
    input: JsonValue = None


class ToolResultData(BaseModel):
    """What a tool call gave: its output, or the error it failed with."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200)
    output: JsonValue = None
    error: str | None = Field(default=None, max_length=4000)


class FailureData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field(max_length=4000)


class StatusData(BaseModel):
    """A `status` event only announces that a job runs; a job ends with `done`."""

    model_config = ConfigDict(extra="forbid")
    status: Literal["running"]


class DoneData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["completed", "failed", "cancelled"]


#: Event types whose data has a fixed shape.
EVENT_SCHEMAS: dict[str, type[BaseModel]] = {
    "delta": DeltaData,
    "reasoning": ReasoningData,
    "tool-call": ToolCallData,
    "tool-result": ToolResultData,
    "progress": Progress,
    "failure": FailureData,
    "status": StatusData,
    "done": DoneData,
}


class EventIn(BaseModel):
    """One event appended by a producer. Known types have their data checked; the gateway's own
    types are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: str = Field(pattern=EVENT_TYPE_PATTERN, json_schema_extra={"not": {"enum": list(RESERVED_EVENT_TYPES)}})
    data: JsonValue = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_EVENT_TYPES:
            raise PydanticCustomError(
                "reserved_event_type",
                "'{name}' is one of the gateway's own event types; producers cannot append it",
                {"name": value},
            )
        return value

    @model_validator(mode="after")
    def _check_data(self) -> EventIn:
        schema = EVENT_SCHEMAS.get(self.type)
        if schema is not None:
            self.data = schema.model_validate(self.data).model_dump(mode="json", exclude_none=self.type != "progress")
        elif self.type in ("result", "log") and not isinstance(self.data, dict):
            raise ValueError(f"'{self.type}' data must be a JSON object")
        return self


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds (``2024-11-21T14:40:00.123Z``), what
    ``datetime.isoformat(timespec="milliseconds")`` writes, at a fifth of its cost: a status
    document has five of these."""
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)
    return f"{_iso_second(seconds)}{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_second(seconds: int) -> str:
    # A job's timestamps are read again and again (every status request), and mostly recent ones.
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds))


def to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
