"""The OpenAPI 3.1 document served at /openapi.json, built from the same models the routes use."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from jobstream import __version__
from jobstream.models import TAG_PATTERN, EventIn, JobCreate, Progress, ReadTokenCreate
from jobstream.ratelimit import RATE_LIMIT_HEADERS

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_TOKEN = {
    "name": "token",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "Read token, for clients that cannot send headers (EventSource).",
}
_SNAPSHOT = {
    "name": "snapshot",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean", "default": False},
    "description": "Start with the job's snapshot (one `snapshot` event, see Snapshot), then the events after it."
    " Ignored when a resume point is given. A job with no event yet, or one that keeps no snapshot, is read"
    " from its first event.",
}
_FORMAT = {
    "name": "format",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["ui-message-stream"]},
    "description": "`ui-message-stream`: the job as an AI SDK UI message stream (protocol v1: header"
    " `x-vercel-ai-ui-message-stream: v1`, one chunk per `data:` line, `data: [DONE]` last), for `useChat`."
    " Absent: jobstream's own events.",
}
#: A job Redis has forgotten is read from the archive (when one is configured), which may be down.
_UNAVAILABLE = _problem("Redis unavailable, or the archive, for a job only it holds")
_AUTH_ERRORS = {
    "401": _problem("Missing or invalid credentials"),
    "403": _problem("Another user's job"),
    "404": _problem("No such job"),
    "503": _UNAVAILABLE,
}

_LIST_PARAMETERS = [
    {
        "name": "status",
        "in": "query",
        "schema": {"type": "string"},
        "description": "One or several statuses, comma-separated (pending, running, completed, failed, cancelled).",
    },
    {"name": "type", "in": "query", "schema": {"type": "string"}, "description": "An unknown type matches nothing."},
    {"name": "tag", "in": "query", "schema": {"type": "string", "pattern": TAG_PATTERN}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "The previous page's next_cursor."},
]

_RESUME = [
    {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
]


def _event_stream(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/event-stream": {"schema": {"type": "string"}}}}


def _poll_limits(max_wait_s: float) -> list[dict[str, Any]]:
    return [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
        {
            "name": "wait",
            "in": "query",
            "schema": {"type": "number", "minimum": 0, "maximum": max_wait_s, "default": 0},
        },
    ]


_MANY_PARAMETERS = [
    {
        "name": "jobs",
        "in": "query",
        "schema": {"type": "string"},
        "description": "1 to 100 job ids, comma-separated (or tag).",
    },
    {
        "name": "tag",
        "in": "query",
        "schema": {"type": "string", "pattern": TAG_PATTERN},
        "description": "The caller's jobs with this tag, and on an event stream those created while it is open.",
    },
]

_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                        "msg": {"type": "string"},
                    },
                },
            },
        },
    },
    "JobCreated": {
        "type": "object",
        "required": ["id", "type", "status", "created_at", "expires_at", "token", "links", "tags", "metadata"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "type": {"type": "string"},
            "status": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": "string", "format": "date-time"},
            "token": {"type": "string"},
            "links": {"type": "object", "additionalProperties": {"type": "string"}},
            "tags": {"type": "array", "items": {"type": "string"}},
            "metadata": {"type": "object"},
        },
    },
    "Job": {
        "type": "object",
        "required": [
            "id",
            "type",
            "status",
            "progress",
            "created_at",
            "updated_at",
            "started_at",
            "completed_at",
            "expires_at",
            "error",
            "result",
            "last_event_id",
            "tags",
            "metadata",
        ],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "type": {"type": "string"},
            "status": {"enum": ["pending", "running", "completed", "failed", "cancelled"]},
            "progress": {"anyOf": [_ref("Progress"), {"type": "null"}]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": _NULLABLE_TIME,
            "started_at": _NULLABLE_TIME,
            "completed_at": _NULLABLE_TIME,
            "expires_at": _NULLABLE_TIME,
            "error": {"anyOf": [{"type": "object", "properties": {"message": {"type": "string"}}}, {"type": "null"}]},
            "result": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            "last_event_id": {"type": ["string", "null"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "metadata": {"type": "object"},
            "output": {**_ref("Output"), "description": "With `include=output` only."},
            "archived": {
                "type": "boolean",
                "description": "With an archive configured (JOBSTREAM_ARCHIVE_URL) when the job was created: whether"
                " the archive holds it yet (it is written once the job ends).",
            },
        },
    },
    "Output": {
        "type": "object",
        "description": "The job's snapshot: every event up to `last_event_id` (of any type but `done`).",
        "required": ["text", "last_event_id"],
        "properties": {
            "text": {"type": "string", "description": "Every delta's text so far, concatenated."},
            "last_event_id": {"type": ["string", "null"], "description": "The last event covered; null: none yet."},
        },
    },
    "Snapshot": {
        "type": "object",
        "description": "The data of a `snapshot` event, whose id is the last event it covers (of any type but"
        " `done`): what a reader would have from every event up to there. `status` is the job's as it is read.",
        "required": ["text", "progress", "status"],
        "properties": {
            "text": {"type": "string"},
            "progress": {"anyOf": [_ref("Progress"), {"type": "null"}]},
            "status": {"enum": ["running", "completed", "failed", "cancelled"]},
        },
    },
    "JobPage": {
        "type": "object",
        "required": ["jobs", "next_cursor"],
        "properties": {
            "jobs": {"type": "array", "items": _ref("Job")},
            "next_cursor": {"type": ["string", "null"], "description": "Opaque; null on the last page."},
        },
    },
    "ReadToken": {
        "type": "object",
        "required": ["token", "expires_at"],
        "properties": {"token": {"type": "string"}, "expires_at": {"type": "string", "format": "date-time"}},
    },
    "ManyPollResult": {
        "type": "object",
        "required": ["events", "cursor", "done"],
        "properties": {
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["job_id", "id", "type", "data"],
                    "properties": {
                        "job_id": {"type": "string", "format": "uuid"},
                        "id": {"type": "string"},
                        "type": {"type": "string"},
                        "data": {},
                    },
                },
            },
            "cursor": {"type": "string", "description": "Opaque; send it back as cursor."},
            "done": {"type": "boolean", "description": "Every listed job has ended (always false with tag)."},
        },
    },
    "EventOut": {
        "type": "object",
        "required": ["id", "type", "data"],
        "properties": {"id": {"type": "string"}, "type": {"type": "string"}, "data": {}},
    },
    "PollResult": {
        "type": "object",
        "required": ["events", "next", "status", "done"],
        "properties": {
            "events": {"type": "array", "items": _ref("EventOut")},
            "next": {"type": "string"},
            "status": {"type": "string"},
            "done": {"type": "boolean"},
            "truncated": {"type": "object", "properties": {"first_id": {"type": "string"}}},
        },
    },
}


def _model_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    models = (
        ("JobCreate", JobCreate),
        ("EventIn", EventIn),
        ("Progress", Progress),
        ("ReadTokenCreate", ReadTokenCreate),
    )
    for name, model in models:
        schema = TypeAdapter(model).json_schema(ref_template=_REF + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return schemas


def _paths(max_wait_s: float) -> dict[str, Any]:
    job = "/v1/jobs/{job_id}"
    rate_headers = {name: {"schema": {"type": "integer"}} for name in RATE_LIMIT_HEADERS}
    return {
        "/v1/jobs": {
            "get": {
                "summary": "The caller's jobs, newest first",
                "description": "The jobs Redis holds, newest first; then, with an archive, those only the archive"
                " holds, newest first by creation.",
                "parameters": _LIST_PARAMETERS,
                "responses": {
                    "200": _json("A page of jobs", _ref("JobPage")),
                    "400": _problem("Unknown status, bad tag, limit or cursor"),
                    "401": _problem("Missing or invalid credentials"),
                    "403": _problem("A read token cannot list jobs"),
                    "503": _problem("Redis unavailable, or the archive, for the page of the jobs only it holds"),
                },
            },
            "post": {
                "summary": "Create a job",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "maxLength": 255},
                    }
                ],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("JobCreate")}}},
                "responses": {
                    "201": {**_json("Created", _ref("JobCreated")), "headers": rate_headers},
                    "200": _json("The job an earlier request with this Idempotency-Key created", _ref("JobCreated")),
                    "400": _problem("Bad Idempotency-Key"),
                    "401": _problem("Missing or invalid credentials"),
                    "403": _problem("A read token cannot create"),
                    "413": _problem("Body too large"),
                    "415": _problem("Not JSON"),
                    "422": _problem("Invalid request"),
                    "429": _problem("Rate limited"),
                    "503": _problem("Redis unavailable"),
                },
            },
        },
        job: {
            "get": {
                "summary": "Job status",
                "parameters": [
                    _JOB_ID,
                    _TOKEN,
                    {
                        "name": "include",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": ["output"]},
                        "description": "`output`: add the job's snapshot as `output`.",
                    },
                ],
                "responses": {
                    "200": _json("The job", _ref("Job")),
                    "304": {"description": "Not modified"},
                    "400": _problem("An `include` other than `output`"),
                    "409": _problem("`include=output` of a job that keeps no snapshot (snapshots off when created)"),
                    **_AUTH_ERRORS,
                },
            },
            "delete": {
                "summary": "Delete a job",
                "parameters": [_JOB_ID],
                "responses": {"204": {"description": "Deleted"}, **_AUTH_ERRORS},
            },
        },
        f"{job}/events": {
            "get": {
                "summary": "Follow events (server-sent events)",
                "parameters": [
                    _JOB_ID,
                    _TOKEN,
                    *_RESUME,
                    _SNAPSHOT,
                    _FORMAT,
                ],
                "responses": {
                    "200": _event_stream("Event stream"),
                    "204": {"description": "The reader has already seen `done`"},
                    "400": _problem(
                        "Malformed event id, or one nothing can follow, a `snapshot` not boolean, an unknown `format`"
                    ),
                    "429": _problem("Too many streams: per user, or per job for readers with its read token"),
                    **_AUTH_ERRORS,
                },
            },
            "post": {
                "summary": "Append events (external producers)",
                "parameters": [_JOB_ID],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"anyOf": [_ref("EventIn"), {"type": "array", "items": _ref("EventIn")}]}
                        }
                    },
                },
                "responses": {
                    "201": _json(
                        "Appended",
                        {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "string"}}}},
                    ),
                    "409": _problem("Job ended, or not an external job"),
                    "413": _problem("Body too large"),
                    "415": _problem("Not JSON"),
                    "422": _problem("Invalid events: not strict JSON, or a type that is the gateway's own"),
                    **_AUTH_ERRORS,
                },
            },
        },
        f"{job}/poll": {
            "get": {
                "summary": "Poll events (long-poll with wait)",
                "parameters": [
                    _JOB_ID,
                    _TOKEN,
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    *_poll_limits(max_wait_s),
                    {
                        **_SNAPSHOT,
                        "description": "Without `after`: the job's snapshot is the answer's first event (one of"
                        " `limit`), then the events after it.",
                    },
                ],
                "responses": {
                    "200": _json("Events", _ref("PollResult")),
                    "400": _problem("Bad query, or an `after` that is no event id"),
                    "429": _problem("Too many long-polls of this user waiting at once"),
                    **_AUTH_ERRORS,
                },
            }
        },
        f"{job}/cancel": {
            "post": {
                "summary": "Cancel a job",
                "parameters": [_JOB_ID],
                "responses": {
                    "202": _json("Cancelling", {"type": "object", "properties": {"status": {"type": "string"}}}),
                    "409": _problem("Job already ended"),
                    **_AUTH_ERRORS,
                },
            }
        },
        "/v1/read-tokens": {
            "post": {
                "summary": "A read token for several of the caller's jobs, or for a tag",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ReadTokenCreate")}}},
                "responses": {
                    "201": _json("Issued", _ref("ReadToken")),
                    "401": _problem("Missing or invalid credentials"),
                    "403": _problem("A read token cannot issue tokens, or a listed job is another user's"),
                    "404": _problem("A listed job does not exist"),
                    "413": _problem("Body too large"),
                    "415": _problem("Not JSON"),
                    "422": _problem("Invalid request: neither or both of jobs and tag, a bad ttl"),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/events": {
            "get": {
                "summary": "Follow many jobs on one event stream (by ids or by tag)",
                "parameters": [
                    *_MANY_PARAMETERS,
                    _TOKEN,
                    *_RESUME,
                ],
                "responses": {
                    "200": _event_stream(
                        "Event stream: each event's data is {job_id, id, data}; its id an opaque cursor"
                    ),
                    "204": {"description": "The reader has seen every listed job's `done`"},
                    "400": _problem("Neither or both of jobs and tag, too many jobs, a bad tag or cursor"),
                    "429": _problem("Too many streams (one counts once, however many jobs it follows)"),
                    **_AUTH_ERRORS,
                },
            }
        },
        "/v1/poll": {
            "get": {
                "summary": "Poll many jobs (by ids or by tag)",
                "parameters": [
                    *_MANY_PARAMETERS,
                    _TOKEN,
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}, "description": "Opaque."},
                    *_poll_limits(max_wait_s),
                ],
                "responses": {
                    "200": _json("Events of the jobs", _ref("ManyPollResult")),
                    "400": _problem("Neither or both of jobs and tag, too many jobs, a bad tag, query or cursor"),
                    "429": _problem("Too many long-polls of this user waiting at once"),
                    **_AUTH_ERRORS,
                },
            }
        },
        # Operations endpoints take no credentials (keep /metrics to the internal network).
        "/healthz": {"get": {"summary": "Process alive", "security": [], "responses": {"200": {"description": "OK"}}}},
        "/readyz": {
            "get": {
                "summary": "Redis reachable",
                "security": [],
                "responses": {"200": {"description": "Ready"}, "503": _problem("Not ready")},
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "security": [], "responses": {"200": {"description": "Metrics"}}}
        },
    }


def openapi_document(max_wait_s: float = 30) -> dict[str, Any]:
    """The API as this gateway serves it: ``max_wait_s`` is its JOBSTREAM_POLL_MAX_WAIT_S."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobstream", "version": __version__},
        "components": {
            "schemas": {**_model_schemas(), **_SCHEMAS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": _paths(max_wait_s),
    }
