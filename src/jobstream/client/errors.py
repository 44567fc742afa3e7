"""The client's exceptions: every one of them is a `ClientError`."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of the errors this client raises."""


class ProblemError(ClientError):
    """The gateway answered an error: ``status`` is the HTTP status, ``problem`` the RFC 9457
    problem+json document (``type``, ``title``, ``status``, ``detail``, and ``errors`` for
    validation errors). ``retry_after_s`` is the ``Retry-After`` header, if any."""

    def __init__(self, status: int, problem: dict[str, Any], retry_after_s: float | None = None) -> None:
        self.status = status
        self.problem = problem
        self.retry_after_s = retry_after_s
        title = problem.get("title") or f"HTTP {status}"
        detail = problem.get("detail")
        super().__init__(f"{status} {title}: {detail}" if detail and detail != title else f"{status} {title}")


class FollowError(ClientError):
    """Following a job failed too many times in a row (the gateway unreachable, or answering 429
    or 5xx); ``last_error`` is the last failure."""

    def __init__(self, message: str, last_error: BaseException | None) -> None:
        self.last_error = last_error
        super().__init__(f"{message}: {last_error}" if last_error is not None else message)
