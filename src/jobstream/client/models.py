"""What the gateway answers, as typed results. Unknown fields are kept (``extra="allow"``), so a
newer gateway's additions reach the caller instead of breaking the client."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

#: The statuses after which a job never changes again.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


class _Document(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Links(_Document):
    self: str | None = None
    events: str | None = None
    poll: str | None = None
    cancel: str | None = None


class Progress(_Document):
    current: float | None = None
    total: float | None = None
    message: str | None = None
    percent: float | None = None


class JobError(_Document):
    message: str = ""


class CreatedJob(_Document):
    """The answer to a create: the new job (or, for a repeated idempotency key, the first one)
    with its read token, which a browser can use to follow it."""

    id: str
    type: str
    status: str
    token: str
    created_at: str | None = None
    expires_at: str | None = None
    links: Links = Links()
    tags: list[str] = []
    metadata: dict[str, Any] = {}


class ReadToken(_Document):
    """A read token of several jobs, or of a tag (``POST /v1/read-tokens``), for a browser."""

    token: str
    expires_at: str | None = None


class JobStatus(_Document):
    """A job's status document (``GET /v1/jobs/{id}``)."""

    id: str
    type: str
    status: str
    progress: Progress | None = None
    created_at: str | None = None
    updated_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    expires_at: str | None = None
    error: JobError | None = None
    result: Any = None
    last_event_id: str | None = None
    tags: list[str] = []
    metadata: dict[str, Any] = {}

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobPage(_Document):
    """One page of ``GET /v1/jobs``: pass ``next_cursor`` back as ``cursor`` for the next."""

    jobs: list[JobStatus]
    next_cursor: str | None = None


class Event(_Document):
    """One event of a job: ``type`` is ``status``, ``delta``, ``progress``, ``result``,
    ``failure``, ``log``, ``done``, a producer's own type, or ``truncated`` (the resume point was
    trimmed away; ``data["first_id"]`` is the oldest event still kept, and ``id`` is None)."""

    id: str | None
    type: str
    data: Any = None
