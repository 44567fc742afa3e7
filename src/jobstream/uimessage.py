"""A job's events rendered as an AI SDK UI message stream (protocol v1): one more encoding of the
same events and ids, for `useChat` (``GET /v1/jobs/{id}/events?format=ui-message-stream``).

Each SSE event is a ``data:`` line with one UI message chunk. ``start`` (its ``messageId`` the
job's id) opens a stream read from the job's first event; deltas and reasoning become text and
reasoning parts (opened on their first text, ended when another kind of output comes), tool
calls and results tool parts, ``failure`` an ``error`` chunk, ``done`` the ``finish`` (after
``abort`` for a cancelled job), followed by ``data: [DONE]``; every other event but ``status``
a ``data-<type>`` part. The SSE ``id:`` of the last chunk of each event is the event's id, so a
reader resuming after it misses none of that event's chunks. A rendering is a function of the
events alone: read again from the start, a job gives the same chunks.
"""

from __future__ import annotations

import json
from typing import Any

from jobstream.models import SNAPSHOT_EVENT, TERMINAL_EVENT, to_json
from jobstream.store import StoredEvent

FORMAT = "ui-message-stream"
HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
DONE_FRAME = b"data: [DONE]\n\n"
#: Events a UI message stream does not render (the status moves it shows by its own chunks).
_HIDDEN = frozenset({"status"})
_TEXT_KINDS = {"delta": "text", "reasoning": "reasoning"}


class UIMessageRenderer:
    """One stream's rendering: which text or reasoning part is open."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        #: The open part: (kind, id), kind "text" or "reasoning"; None when none is.
        self._open: tuple[str, str] | None = None

    @staticmethod
    def start(job_id: str) -> bytes:
        """The first chunk of a stream read from the job's start."""
        return _frame({"type": "start", "messageId": job_id})

    def encode(self, batch: list[StoredEvent]) -> tuple[bytes, bool]:
        """Frames of a batch up to and including `done`, and whether `done` was among them."""
        frames: list[bytes] = []
        for event in batch:
            frames.append(self.event(event))
            if event.is_done:
                frames.append(DONE_FRAME)
                return b"".join(frames), True
        return b"".join(frames), False

    def event(self, event: StoredEvent) -> bytes:
        """The frames of one event, the last carrying its id."""
        if event.type in _HIDDEN:
            return b""
        chunks = self._chunks(event.type, json.loads(event.data), event.id)
        if not chunks:
            return b""
        return b"".join(_frame(chunk) for chunk in chunks[:-1]) + _frame(chunks[-1], event.id)

    def _chunks(self, kind: str, data: Any, event_id: str) -> list[dict[str, Any]]:
        fields = data if isinstance(data, dict) else {}
        if kind in _TEXT_KINDS:
            return self._text(_TEXT_KINDS[kind], str(fields.get("text", "")), event_id)
        if kind == SNAPSHOT_EVENT:
            chunks = self._text("text", str(fields.get("text", "")), event_id)
            if fields.get("progress") is not None:
                chunks.append({"type": "data-progress", "data": fields["progress"]})
            return chunks
        chunks = self._close()
        if kind == "tool-call":
            chunks.append(
                {
                    "type": "tool-input-available",
                    "toolCallId": str(fields.get("id")),
                    "toolName": str(fields.get("name")),
                    "input": fields.get("input"),
                }
            )
        elif kind == "tool-result":
            if fields.get("error") is not None:
                chunks.append(
                    {
                        "type": "tool-output-error",
                        "toolCallId": str(fields.get("id")),
                        "errorText": str(fields["error"]),
                    }
                )
            else:
                chunks.append(
                    {
                        "type": "tool-output-available",
                        "toolCallId": str(fields.get("id")),
                        "output": fields.get("output"),
                    }
                )
        elif kind == "failure":
            chunks.append({"type": "error", "errorText": str(fields.get("message", "The job failed."))})
        elif kind == TERMINAL_EVENT:
            status = fields.get("status")
            if status == "cancelled":
                chunks += [{"type": "abort"}, {"type": "finish"}]
            else:
                chunks.append({"type": "finish", "finishReason": "stop" if status == "completed" else "error"})
        else:  # progress, result, log, truncated and the job's own types
            chunks.append({"type": f"data-{kind}", "data": data})
        return chunks

    def _text(self, part: str, text: str, event_id: str) -> list[dict[str, Any]]:
        if not text:
            return []
        chunks: list[dict[str, Any]] = []
        if self._open is None or self._open[0] != part:
            chunks = self._close()
            self._open = (part, f"{part}-{event_id}")
            chunks.append({"type": f"{part}-start", "id": self._open[1]})
        chunks.append({"type": f"{part}-delta", "id": self._open[1], "delta": text})
        return chunks

    def _close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        part, part_id = self._open
        self._open = None
        return [{"type": f"{part}-end", "id": part_id}]


def _frame(chunk: dict[str, Any], event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {to_json(chunk)}\n\n".encode()
