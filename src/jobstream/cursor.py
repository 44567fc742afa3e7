"""Resume points: parse and compare Redis stream ids; shared by SSE and polling."""

from __future__ import annotations

import re
from typing import NamedTuple

from jobstream.errors import BadRequest

_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
#: Each part of a Redis stream id is an unsigned 64-bit integer.
_MAX_PART = 2**64 - 1
#: "Only new events", as in XREAD.
NEWEST = "$"
START = "0-0"


class StreamId(NamedTuple):
    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


#: The largest stream id Redis takes; no event can come after it.
LAST_POSSIBLE = StreamId(_MAX_PART, _MAX_PART)


def parse_id(value: str) -> StreamId:
    """Parse ``<ms>-<seq>``; anything else raises BadRequest (never reaches Redis)."""
    match = _STREAM_ID.fullmatch(value)
    if match is None:
        # The echo is bounded: repr() of 40 characters can be ten times as long.
        shown = repr(value[:40])[:100]
        raise BadRequest(f"Malformed event id {shown}: expected '<ms>-<seq>', e.g. '1732200000000-0'.")
    ms, seq = int(match[1]), int(match[2])
    if ms > _MAX_PART or seq > _MAX_PART:
        raise BadRequest("Malformed event id: a part is larger than 2^64-1.")
    return StreamId(ms, seq)


def parse_resume_point(value: str) -> StreamId:
    """An id to read after (``Last-Event-ID``, ``?last_event_id``, ``after``): any stream id but the
    largest, ``2^64-1-2^64-1``, after which Redis reads nothing (``XRANGE`` refuses it as an
    exclusive start, so it would fail every poll and every reconnect); raises BadRequest."""
    parsed = parse_id(value)
    if parsed == LAST_POSSIBLE:
        raise BadRequest("Malformed event id: nothing can follow the largest possible id, so it is no resume point.")
    return parsed


def resolve_cursor(header: str | None, query: str | None) -> str | None:
    """The resume point of a reader: Last-Event-ID header, else ``?last_event_id``; None means from the start.

    Returns a validated stream id, ``$`` (only new events) or None.
    """
    for value in (header, query):
        if value is None:
            continue
        value = value.strip()
        if value == "":
            # EventSource sends an empty Last-Event-ID only if an event carried an empty id; treat as absent.
            continue
        if value == NEWEST:
            return NEWEST
        return str(parse_resume_point(value))
    return None


def is_before(a: str, b: str) -> bool:
    return parse_id(a) < parse_id(b)
