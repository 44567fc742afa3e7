"""The SSE wire format of jobstream's events.

Event data is compact JSON (line breaks inside strings are escaped), types match a lowercase
pattern and ids are stream ids, so a frame is three lines. Anything else goes through
sse-starlette's encoder, which splits every line break into its own ``data:`` line so no content
can ever start a frame of its own.
"""

from __future__ import annotations

from sse_starlette import ServerSentEvent

PING = b": ping\n\n"


def frame(event_id: str, event_type: str, data: str) -> bytes:
    if "\n" in data or "\r" in data or "\n" in event_type or "\r" in event_type:
        encoded: bytes = ServerSentEvent(data=data, event=event_type, id=event_id, sep="\n").encode()
        return encoded
    return f"id: {event_id}\nevent: {event_type}\ndata: {data}\n\n".encode()


def unnamed_frame(event_type: str, data: str) -> bytes:
    """An event without an id, so it does not move the reader's Last-Event-ID."""
    return f"event: {event_type}\ndata: {data}\n\n".encode()


def retry(ms: int) -> bytes:
    return f"retry: {ms}\n\n".encode()
