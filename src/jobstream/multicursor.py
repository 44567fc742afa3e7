"""The resume point of a reader of many jobs: for each job, the last event delivered and whether
that was its `done`, packed into one opaque string (an SSE ``id:``, a poll ``cursor``).

Packed: a head of three bytes (the version and two zeros), then per job its uuid's 16 bytes and
two unsigned LEB128 varints (the event id's milliseconds, and its sequence times two plus the done
bit), padded with zeros to a multiple of three bytes, in base64url: about 32 characters a job, so
100 jobs stay under 4 KiB. Three-byte groups make each job's entry encode on its own, so the
cursor written with every event re-encodes only the job that moved. Tampering is harmless: a job a
cursor names is followed only if the credential may read it (and, with ``jobs=``, only if it is
listed); a cursor never widens what a request reads.
"""

from __future__ import annotations

import base64
import binascii
import functools
import uuid
from collections.abc import Iterable

from jobstream.cursor import START

VERSION = 2
_HEAD = bytes([VERSION, 0, 0])
_HEAD_TEXT = base64.urlsafe_b64encode(_HEAD).decode("ascii")
#: The longest cursor looked at (a generous bound over 100 jobs' 3.2 KiB); longer is refused.
MAX_CHARS = 8192


class BadCursor(ValueError):
    """Not a cursor this gateway gave out."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(raw) or shift > 63:
            raise BadCursor("truncated")
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


@functools.lru_cache(maxsize=8192)
def _entry(job_id: str, event_id: str, done: bool) -> str:
    """One job's packed entry in base64url. Remembered: an event goes to every reader of its job,
    each of whose cursors takes the same entry (ids come from Redis or a decoded cursor: well
    formed)."""
    ms, _, seq = event_id.partition("-")
    entry = uuid.UUID(job_id).bytes + _varint(int(ms)) + _varint(int(seq) * 2 + done)
    return base64.urlsafe_b64encode(entry + bytes(-len(entry) % 3)).decode("ascii")


class JobsCursor:
    """Where a reader of many jobs stands in each: job id -> (last delivered event id, its `done` seen).

    A job with nothing delivered yet is absent (it is read from its start). Each job's packed
    entry is kept, so that encoding after every event re-packs only the job that moved.
    """

    __slots__ = ("_done", "_packed", "_positions")

    def __init__(self) -> None:
        self._positions: dict[str, str] = {}
        self._done: set[str] = set()
        #: Each job's entry, in base64url already.
        self._packed: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._positions)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._positions

    def jobs(self) -> list[str]:
        return list(self._positions)

    def after(self, job_id: str) -> str:
        """The exclusive start of what ``job_id`` reads next."""
        return self._positions.get(job_id, START)

    def is_done(self, job_id: str) -> bool:
        return job_id in self._done

    def advance(self, job_id: str, event_id: str, *, done: bool = False) -> None:
        self._positions[job_id] = event_id
        if done:
            self._done.add(job_id)
        self._packed[job_id] = _entry(job_id, event_id, done)

    def forget(self, job_id: str) -> None:
        self._positions.pop(job_id, None)
        self._done.discard(job_id)
        self._packed.pop(job_id, None)

    def keep_only(self, job_ids: Iterable[str]) -> None:
        """Forget every job but these (those a request may follow)."""
        wanted = set(job_ids)
        for job_id in [job_id for job_id in self._positions if job_id not in wanted]:
            self.forget(job_id)

    def encode(self) -> str:
        return _HEAD_TEXT + "".join(self._packed.values())

    @classmethod
    def decode(cls, text: str) -> JobsCursor:
        """A cursor from its packed text; BadCursor for anything this gateway would not give out."""
        if not text or len(text) > MAX_CHARS:
            raise BadCursor("empty or too long")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise BadCursor("not base64url") from None
        if raw[:3] != _HEAD:
            raise BadCursor("unknown version")
        cursor = cls()
        at = 3
        while at < len(raw):
            if at + 16 > len(raw):
                raise BadCursor("truncated")
            start = at
            job_id = str(uuid.UUID(bytes=raw[at : at + 16]))
            ms, at = _read_varint(raw, at + 16)
            flagged, at = _read_varint(raw, at)
            at += -(at - start) % 3  # the entry's padding
            seq, done = flagged >> 1, bool(flagged & 1)
            if ms >= 2**64 or seq >= 2**64 or job_id in cursor:
                raise BadCursor("out of range")
            cursor.advance(job_id, f"{ms}-{seq}", done=done)
        return cursor
