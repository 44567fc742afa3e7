"""The HTTP protocol of the gateway without any I/O: what to send for each call, what an answer
means, and the follow state machine. `Client` and `AsyncClient` only move bytes for it, so both
behave the same by construction."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypedDict, TypeVar, Unpack
from urllib.parse import quote

from jobstream.client.errors import ProblemError
from jobstream.client.models import CreatedJob, JobPage, JobStatus, ReadToken

T = TypeVar("T")

#: Statuses that retrying cannot change: the request itself is wrong, or not allowed.
_RETRYABLE_4XX = frozenset({408, 425, 429})


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    #: Server-sent events: the answer is read as a stream.
    stream: bool = False
    #: Read timeout of this request when it differs from the client's (a long-poll waits longer).
    timeout_s: float | None = None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how to read its answer."""

    request: Request
    parse: Callable[[Any], T]

    def finish(self, status: int, headers: Mapping[str, str], content: bytes) -> T:
        return self.parse(answer(status, headers, content))


def answer(status: int, headers: Mapping[str, str], content: bytes) -> Any:
    """The JSON body of a successful answer (None for 204), or ProblemError for an error."""
    if status >= 400:
        raise problem_error(status, headers, content)
    if status == 204 or not content:
        return None
    return json.loads(content)


def problem_error(status: int, headers: Mapping[str, str], content: bytes) -> ProblemError:
    try:
        problem = json.loads(content) if content else None
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        # Not problem+json: a proxy's page, say. Keep its first line as the detail.
        text = content.decode("utf-8", "replace").strip().splitlines()
        problem = {"title": f"HTTP {status}", "status": status, "detail": text[0][:200] if text else None}
    return ProblemError(status, problem, retry_after(headers))


def retry_after(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (the delta form, which the gateway sends); None otherwise."""
    try:
        seconds = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def is_retryable(status: int) -> bool:
    return status >= 500 or status in _RETRYABLE_4XX


def job_path(job_id: str, *rest: str) -> str:
    # Quoted whole: an id can never reach another path.
    return "/".join(["/v1/jobs", quote(job_id, safe=""), *rest])


def job_ref(id_or_job: Any) -> tuple[str, str | None]:
    """The id, and the read token when there is one, of an id, a create answer, a status
    document or a mapping with an ``id``."""
    if isinstance(id_or_job, str):
        return id_or_job, None
    if isinstance(id_or_job, Mapping):
        return str(id_or_job["id"]), id_or_job.get("token")
    job_id = getattr(id_or_job, "id", None)
    if not isinstance(job_id, str):
        raise TypeError("expected a job id, or a job with an id")
    return job_id, getattr(id_or_job, "token", None)


# ---- the calls


class CreateOptions(TypedDict, total=False):
    """The optional parts of a create: ``ttl`` (idle timeout, seconds), ``tags``, ``metadata``,
    ``webhook`` (``{"url", "events"}``) and ``idempotency_key`` (a retried create with the same
    key returns the first job)."""

    ttl: int | None
    tags: Iterable[str] | None
    metadata: Mapping[str, Any] | None
    webhook: Mapping[str, Any] | None
    idempotency_key: str | None


def create(job_type: str, input: Any = None, **options: Unpack[CreateOptions]) -> Call[CreatedJob]:
    body: dict[str, Any] = {"type": job_type}
    if input is not None:
        body["input"] = input
    for name in ("ttl", "metadata", "webhook"):
        if options.get(name) is not None:
            body[name] = options.get(name)
    tags = options.get("tags")
    if tags is not None:
        body["tags"] = list(tags)
    key = options.get("idempotency_key")
    headers = {"Idempotency-Key": key} if key else {}
    return Call(Request("POST", "/v1/jobs", headers=headers, json=body), CreatedJob.model_validate)


def get(job_id: str) -> Call[JobStatus]:
    return Call(Request("GET", job_path(job_id)), JobStatus.model_validate)


def list_jobs(
    *,
    status: str | Iterable[str] | None = None,
    type: str | None = None,
    tag: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Call[JobPage]:
    params: dict[str, str] = {}
    if status is not None:
        params["status"] = status if isinstance(status, str) else ",".join(status)
    optional = {"type": type, "tag": tag, "limit": limit, "cursor": cursor}
    params.update({name: str(value) for name, value in optional.items() if value is not None})
    return Call(Request("GET", "/v1/jobs", params=params), JobPage.model_validate)


def cancel(job_id: str) -> Call[str]:
    """Answers the new status (``cancelling``): the job ends ``cancelled`` soon after."""
    return Call(Request("POST", job_path(job_id, "cancel")), lambda body: str(body["status"]))


def delete(job_id: str) -> Call[None]:
    return Call(Request("DELETE", job_path(job_id)), lambda body: None)


def append(job_id: str, events: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> Call[list[str]]:
    """Append one event ``{"type", "data"}`` or several; answers their ids."""
    body = dict(events) if isinstance(events, Mapping) else [dict(event) for event in events]
    return Call(Request("POST", job_path(job_id, "events"), json=body), lambda answer: [str(i) for i in answer["ids"]])


def read_token(jobs: Iterable[str] | None = None, *, tag: str | None = None, ttl: int | None = None) -> Call[ReadToken]:
    body: dict[str, Any] = {"jobs": list(jobs)} if jobs is not None else {"tag": tag}
    if ttl is not None:
        body["ttl"] = ttl
    return Call(Request("POST", "/v1/read-tokens", json=body), ReadToken.model_validate)


def client_headers(api_key: str | None, token: str | None) -> dict[str, str]:
    """Headers of every request: the credential, an API key or a JWT or read token."""
    if api_key and token:
        raise ValueError("pass api_key or token, not both")
    credential = api_key or token
    return {"Authorization": f"Bearer {credential}"} if credential else {}


def follow_token(client_has_credential: bool, job_token: str | None) -> str | None:
    """The job's own read token goes in the query only when the client has no credential."""
    return None if client_has_credential else job_token
