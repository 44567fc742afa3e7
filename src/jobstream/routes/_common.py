"""Helpers every job endpoint shares: the job id check, loading with authorization, JSON bodies."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from pydantic_core import from_json
from starlette.requests import Request

from jobstream import archived
from jobstream.auth import Principal, authorize_read, authorize_write
from jobstream.errors import JobNotFound, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from jobstream.services import Services, services
from jobstream.store import JobRecord

_JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
#: JSON bodies nest at most this deep (API.md, "Hardening"); the parser itself stops near 200.
MAX_JSON_DEPTH = 64
#: Parsed JSON values that need no look: neither a container nor a float (which may be infinite).
_PLAIN = frozenset({str, int, bool, type(None)})
_JSON_RULES = f"JSON (RFC 8259) in UTF-8, numbers finite, strings valid Unicode, at most {MAX_JSON_DEPTH} levels deep"


def is_job_id(text: str) -> bool:
    """Job ids are lowercase uuid4s: anything else names no job, without asking Redis."""
    return _JOB_ID.match(text) is not None


def job_id_of(request: Request) -> str:
    """The path's job id; anything but a lowercase uuid4 is 404 before Redis is touched."""
    job_id: str = request.path_params["job_id"]
    if not is_job_id(job_id):
        raise JobNotFound()
    return job_id


def authenticate(request: Request, *, write: bool = False) -> tuple[str, Principal]:
    """The checks that need no Redis, in order: 404 for a malformed job id, then 401."""
    job_id = job_id_of(request)
    return job_id, services(request).auth.authenticate(request, allow_query_token=not write)


def authorize(principal: Principal, job: JobRecord | None, *, write: bool = False) -> JobRecord:
    """The checks of a loaded job, in order: 404 if it is gone, then 403."""
    if job is None:
        raise JobNotFound()
    (authorize_write if write else authorize_read)(principal, job)
    return job


async def find_job(svc: Services, job_id: str) -> JobRecord | None:
    """The job from Redis, else from the archive (every field either way), else None."""
    job = await svc.store.get(job_id)
    return job if job is not None else await archived.find(svc, job_id)


async def load_job(request: Request, *, write: bool = False) -> tuple[Principal, JobRecord]:
    """Authenticate, load and authorize: 404 for a bad id, 401, then 404 if gone, then 403."""
    job_id, principal = authenticate(request, write=write)
    return principal, authorize(principal, await find_job(services(request), job_id), write=write)


async def check_job(request: Request, job_id: str, principal: Principal, *, write: bool = False) -> JobRecord:
    """Load and authorize a job for an answer that must come after 404 and 403 (a bad query or
    body found before the job's own round trip): raises for those, returns the job otherwise."""
    return authorize(principal, await find_job(services(request), job_id), write=write)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON: 415 for another media type, 413 past ``max_bytes``, 422 if not JSON."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"Send JSON ('Content-Type: application/json'), not {media_type[:100]!r}.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"The body is larger than {max_bytes} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"The body is larger than {max_bytes} bytes.")
    return parse_json(body)


def parse_json(body: bytes | bytearray) -> Any:
    """Strict JSON, where every body enters: anything else is 422 before a model or Redis sees it.

    pydantic's own parser (jiter) refuses what the standard library lets through: ``NaN`` and
    ``Infinity``, lone surrogates (``"\\ud800"``, which no UTF-8 encoder can write back), invalid
    UTF-8, a BOM; and it never recurses without bound (it stops near 200 levels, with an error).
    What it accepts and we do not, nesting past MAX_JSON_DEPTH and number literals too large for a
    double (``1e400`` parses as infinity, which would go out as ``Infinity``), one loop then finds.
    """
    try:
        value = from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        problem = str(exc)
        if problem.startswith("recursion limit exceeded"):
            raise _invalid(["body"], f"nested more than {MAX_JSON_DEPTH} levels deep") from None
        if "surrogate" in problem or "hex escape" in problem:
            problem += " (strings must be valid Unicode: no lone surrogates)"
        raise _invalid(["body"], f"invalid JSON: {problem}") from None
    _check_depth_and_numbers(value)
    return value


def _check_depth_and_numbers(value: Any) -> None:
    """Nesting and numbers of a parsed body, with a stack of its own (never recursion). Linear in
    the body's size: at most a few milliseconds for 64 KiB of tiny nested arrays."""
    if type(value) is float and not math.isfinite(value):
        raise _out_of_range(["body"])
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ("body",))]
    while stack:
        # ``loc`` is "body" then one key per level down to ``node``: its depth is len(loc).
        node, loc = stack.pop()
        pairs: Iterable[tuple[str | int, Any]]
        if type(node) is dict:
            if _PLAIN.issuperset(map(type, node.values())):
                continue  # the usual case: strings, integers, booleans and nulls, nothing to look at
            pairs = node.items()
        elif type(node) is list:
            if _PLAIN.issuperset(map(type, node)):
                continue
            pairs = enumerate(node)
        else:
            continue
        for key, item in pairs:
            kind = type(item)
            if kind is dict or kind is list:
                if len(loc) >= MAX_JSON_DEPTH:
                    raise _invalid([*loc, key], f"nested more than {MAX_JSON_DEPTH} levels deep")
                stack.append((item, (*loc, key)))
            elif kind is float and not math.isfinite(item):
                raise _out_of_range([*loc, key])


def _out_of_range(loc: list[str | int]) -> ValidationFailed:
    return _invalid(loc, "number out of range: numbers must be finite (at most about 1.8e308)")


def _invalid(loc: list[str | int], msg: str) -> ValidationFailed:
    return ValidationFailed(f"The body is not valid: {_JSON_RULES}.", errors=[{"loc": loc, "msg": msg}])
