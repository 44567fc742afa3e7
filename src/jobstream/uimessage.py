"""A job's events rendered as an AI SDK UI message stream (protocol v1): one more encoding of the
same events and ids, for `useChat` (``GET /v1/jobs/{id}/events?format=ui-message-stream``).

Each SSE event is a ``data:`` line with one UI message chunk. ``start`` (its ``messageId`` the
job's id) opens a stream read from the job's first event; deltas and reasoning become text and
reasoning parts (opened on their first text, ended when another kind of output comes), tool
calls and results tool parts, ``failure`` an ``error`` chunk, ``done`` the ``finish`` (after
``abort`` for a cancelled job), followed by ``data: [DONE]``; every other event but ``status``
a ``data-<type>`` part (``data-progress`` one part, each replacing the last). Output is grouped
in steps as a model's is: output after tool results starts a new step, so that a reply that
called tools and then answered does not look like one still waiting for its tools. The SSE
``id:`` of the last chunk of each event is the event's id, so a reader resuming after it misses
none of that event's chunks. A rendering is a function of the events alone: read again from the
start, a job gives the same chunks.
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

Chunk = dict[str, Any]


class UIMessageRenderer:
    """One stream's rendering: the open text or reasoning part, the open step, the tool calls."""

    __slots__ = ("_after_results", "_calls", "_open", "_step_open")

    def __init__(self) -> None:
        #: The open part: (kind, id), kind "text" or "reasoning"; None when none is.
        self._open: tuple[str, str] | None = None
        self._step_open = False
        #: Tool results came since the step's last other output: more output starts a new step.
        self._after_results = False
        #: Tool calls rendered, when read from the start (None: resumed, earlier calls unknown).
        self._calls: set[str] | None = None

    def start(self, job_id: str) -> bytes:
        """The first chunks of a stream read from the job's start (or from its snapshot)."""
        self._calls = set()
        self._step_open = True
        return _frame({"type": "start", "messageId": job_id}) + _frame({"type": "start-step"})

    @staticmethod
    def notice(kind: str, data: Any) -> bytes:
        """A ``data-<kind>`` chunk of the gateway's own (a truncation notice): no id, so that it
        does not move a reader's resume point, and no effect on the open part."""
        return _frame({"type": f"data-{kind}", "data": data})

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

    def _chunks(self, kind: str, data: Any, event_id: str) -> list[Chunk]:
        fields = data if isinstance(data, dict) else {}
        if kind in _TEXT_KINDS:
            return self._text(_TEXT_KINDS[kind], str(fields.get("text", "")), event_id)
        if kind == SNAPSHOT_EVENT:
            chunks = self._text("text", str(fields.get("text", "")), event_id)
            if fields.get("progress") is not None:
                chunks.append(_progress(fields["progress"]))
            return chunks
        if kind == "tool-call":
            return self._tool_call(str(fields.get("id")), str(fields.get("name")), fields.get("input"))
        if kind == "tool-result":
            return self._tool_result(str(fields.get("id")), fields, data)
        if kind == "failure":
            return [*self._end_step(), {"type": "error", "errorText": str(fields.get("message", "The job failed."))}]
        if kind == TERMINAL_EVENT:
            status = fields.get("status")
            if status == "cancelled":
                return [*self._end_step(), {"type": "abort"}, {"type": "finish"}]
            reason = "stop" if status == "completed" else "error"
            return [*self._end_step(), {"type": "finish", "finishReason": reason}]
        if kind == "progress":
            return [_progress(data)]
        return [{"type": f"data-{kind}", "data": data}]  # result, log and the job's own types

    def _text(self, part: str, text: str, event_id: str) -> list[Chunk]:
        if not text:
            return []
        chunks: list[Chunk] = []
        if self._after_results or self._open is None or self._open[0] != part:
            chunks = self._close() + self._step()
            self._open = (part, f"{part}-{event_id}")
            chunks.append({"type": f"{part}-start", "id": self._open[1]})
        chunks.append({"type": f"{part}-delta", "id": self._open[1], "delta": text})
        return chunks

    def _tool_call(self, call_id: str, name: str, input: Any) -> list[Chunk]:
        chunks = self._close() + self._step()
        if self._calls is not None:
            self._calls.add(call_id)
        return [*chunks, {"type": "tool-input-available", "toolCallId": call_id, "toolName": name, "input": input}]

    def _tool_result(self, call_id: str, fields: dict[str, Any], data: Any) -> list[Chunk]:
        if self._calls is not None and call_id not in self._calls:
            # Of a call this stream never showed (appended without one): a tool part for it would
            # end the reader's stream.
            return [{"type": "data-tool-result", "data": data}]
        self._after_results = True
        chunks = self._close()
        if fields.get("error") is not None:
            return [*chunks, {"type": "tool-output-error", "toolCallId": call_id, "errorText": str(fields["error"])}]
        return [*chunks, {"type": "tool-output-available", "toolCallId": call_id, "output": fields.get("output")}]

    def _step(self) -> list[Chunk]:
        """What comes before output: a step, if none is open; a new one after tool results."""
        if self._after_results:
            self._after_results = False
            chunks: list[Chunk] = [{"type": "finish-step"}] if self._step_open else []
            self._step_open = True
            return [*chunks, {"type": "start-step"}]
        if self._step_open:
            return []
        self._step_open = True
        return [{"type": "start-step"}]

    def _end_step(self) -> list[Chunk]:
        chunks = self._close()
        if self._step_open:
            self._step_open = False
            chunks.append({"type": "finish-step"})
        return chunks

    def _close(self) -> list[Chunk]:
        if self._open is None:
            return []
        part, part_id = self._open
        self._open = None
        return [{"type": f"{part}-end", "id": part_id}]


def _progress(data: Any) -> Chunk:
    # One part, replaced by each progress: a long job's progress does not pile up in the message.
    return {"type": "data-progress", "id": "progress", "data": data}


def _frame(chunk: Chunk, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {to_json(chunk)}\n\n".encode()
