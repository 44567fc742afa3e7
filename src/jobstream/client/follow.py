"""Following one job, as a careful production reader does, without any I/O: the rules of the
browser client (static/jobstream.js) for Python.

- Resume from the last event id after any disconnect; deliver every event once, in order.
- Reconnect after a stream that delivered events by the server's ``retry:`` delay.
- Back off on failures (2, 4, 8, 16 s with jitter, at least ``Retry-After``), and give up with
  `FollowError` after ``max_failures`` in a row; errors that retrying cannot fix raise at once.
- 204 on the stream, or ``done`` in a poll answer, is the end as much as a ``done`` event.
- ``truncated`` is delivered as an event (its id is None).
- Long-poll when told to, or when server-sent events fail before delivering any event (a proxy
  buffering or blocking them)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from jobstream.client.errors import FollowError, ProblemError
from jobstream.client.models import Event
from jobstream.client.protocol import Request, is_retryable, job_path, problem_error

Transport = Literal["auto", "sse", "poll"]
TRANSPORTS = ("auto", "sse", "poll")


@dataclass(frozen=True)
class RetryPolicy:
    """How a follow retries. ``backoff_s[n - 1]`` (the last one beyond) is the wait before retry
    ``n``, each stretched or shrunk by up to ``jitter``; ``retry_s`` is the reconnect delay until
    the server sends its own ``retry:``."""

    max_failures: int = 5
    backoff_s: tuple[float, ...] = (2, 4, 8, 16)
    jitter: float = 0.25
    retry_s: float = 3.0
    poll_wait_s: float = 25
    poll_limit: int = 1000


DEFAULT_RETRY = RetryPolicy()


def stream_id(event_id: str) -> tuple[int, int] | None:
    milliseconds, _, sequence = event_id.partition("-")
    try:
        return int(milliseconds), int(sequence or 0)
    except ValueError:
        return None


def is_after(event_id: str, last_id: str | None) -> bool:
    """True when ``event_id`` comes after ``last_id`` (anything does after None or ``$``)."""
    last = stream_id(last_id) if last_id else None
    this = stream_id(event_id)
    return last is None or (this is not None and this > last)


class Follower:
    """The state of one follow. The driver asks `next_request`, performs it, reports what came
    back (`take_sse`, `take_stream_end`, `take_answer`, `take_error`), and then waits `pause()`
    seconds before asking again; it stops once `ended` is true."""

    def __init__(
        self,
        job_id: str,
        *,
        token: str | None = None,
        after: str | None = None,
        transport: Transport = "auto",
        policy: RetryPolicy | None = None,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        self.job_id = job_id
        self.token = token
        self.last_id = after
        self.transport: Transport = transport
        self.using: Literal["sse", "poll"] = "poll" if transport == "poll" else "sse"
        self.policy = policy or DEFAULT_RETRY
        self.deadline = deadline
        self.clock = clock
        self.ended = False
        #: The ``done`` status, once known (None after a 204: the end was seen by an earlier follow).
        self.final_status: str | None = None
        self.failures = 0
        self.retry_s = self.policy.retry_s
        self._delivered = 0  # by the current attempt
        self._delay = 0.0

    # ---- what to send

    def next_request(self) -> Request:
        self._delivered = 0
        self._delay = 0.0
        params = {"token": self.token} if self.token else {}
        if self.using == "sse":
            if self.last_id:
                params["last_event_id"] = self.last_id
            return Request("GET", job_path(self.job_id, "events"), params=params, stream=True)
        wait_s = self.policy.poll_wait_s
        if self.deadline is not None:
            wait_s = max(0.0, min(wait_s, self.deadline - self.clock()))
        params.update({"wait": f"{wait_s:g}", "limit": str(self.policy.poll_limit)})
        if self.last_id:
            params["after"] = self.last_id
        # The read must outlast the long-poll's wait.
        return Request("GET", job_path(self.job_id, "poll"), params=params, timeout_s=wait_s + 15)

    # ---- what came back

    def take_sse(self, event_type: str, data: str, event_id: str, retry_ms: int | None) -> Event | None:
        """One block of the stream; the event to deliver, if it is a new one."""
        if retry_ms is not None:
            self.retry_s = retry_ms / 1000
        if not data:
            return None  # the opening `retry:` block
        self._delivered += 1
        self.failures = 0
        if event_type == "truncated":
            # Sent without an id line: whatever id the parser carries over is an earlier event's.
            return Event(id=None, type=event_type, data=_json_or_text(data))
        return self._deliver(Event(id=event_id or None, type=event_type, data=_json_or_text(data)))

    def take_stream_end(self) -> None:
        """The stream closed (after `done`, at its lifetime's end, or because its gateway left)."""
        if self.ended:
            return
        if self._delivered:
            self._delay = self.retry_s  # a reader that was fed: reconnect as EventSource does
        else:
            self._failed(None)  # open, yet nothing: a proxy in the way, or the gateway leaving

    def take_answer(self, status: int, headers: Mapping[str, str], content: bytes) -> list[Event]:
        """A whole answer: a poll page, or a stream that did not open (204, or an error)."""
        if status == 204:
            self.ended = True
            return []
        if status >= 400 or (self.using == "sse" and status != 200):
            error = problem_error(status, headers, content)
            if not is_retryable(status):
                raise error
            self._failed(error)
            return []
        try:
            page = json.loads(content)
            events = [Event.model_validate(item) for item in page["events"]]
        except (ValueError, KeyError, TypeError) as exc:
            self._failed(exc)
            return []
        self.failures = 0
        delivered = [Event(id=None, type="truncated", data=page["truncated"])] if page.get("truncated") else []
        delivered += [event for event in map(self._deliver, events) if event is not None]
        if page.get("done") and not self.ended:
            # `done` was delivered before this follow began.
            self.ended = True
            self.final_status = page.get("status")
        return delivered

    def take_error(self, error: Exception) -> None:
        """The connection failed (refused, reset, timed out, not an event stream)."""
        if self.using == "sse" and self._delivered:
            self._delay = self.retry_s
        else:
            self._failed(error)

    def pause(self) -> float:
        """Seconds to wait before the next request; TimeoutError past the deadline."""
        if self.deadline is not None and self.clock() + self._delay >= self.deadline:
            raise TimeoutError(f"job {self.job_id} did not end in time")
        return self._delay

    # ---- inside

    def _deliver(self, event: Event) -> Event | None:
        if event.id is None or not is_after(event.id, self.last_id):
            return None  # seen already: a resume overlaps what was delivered
        self.last_id = event.id
        if event.type == "done":
            self.ended = True
            self.final_status = event.data.get("status") if isinstance(event.data, dict) else None
        return event

    def _failed(self, error: Exception | None) -> None:
        self.failures += 1
        if self.failures >= self.policy.max_failures:
            raise FollowError(f"gave up following job {self.job_id} after {self.failures} failures", error)
        if self.using == "sse" and self.transport == "auto":
            # Server-sent events failed before any event: long-polling, its first answer
            # saying whether the gateway itself is the trouble.
            self.using = "poll"
            return
        base = self.policy.backoff_s[min(self.failures, len(self.policy.backoff_s)) - 1]
        jittered = base * random.uniform(1 - self.policy.jitter, 1 + self.policy.jitter)
        waited = error.retry_after_s if isinstance(error, ProblemError) else None
        self._delay = max(jittered, waited or 0.0)


def _json_or_text(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data
