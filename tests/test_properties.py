"""Property tests of the parsers and encoders that stand between untrusted input and the wire."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from jobstream import sse
from jobstream.cursor import NEWEST, is_before, parse_id, resolve_cursor
from jobstream.errors import BadRequest, PayloadTooLarge, ProblemError
from jobstream.routes._common import read_json

U64 = st.integers(min_value=0, max_value=2**64 - 1)
ID_TEXT = re.compile(r"^\d+-\d+$")


@given(U64, U64)
def test_parseId_whenWellFormed_thenRoundTrips(ms: int, seq: int) -> None:
    assert str(parse_id(f"{ms}-{seq}")) == f"{ms}-{seq}"


@given(st.text(max_size=60))
def test_parseId_whenAnyText_thenIdOrBadRequestNothingElse(text: str) -> None:
    try:
        parsed = parse_id(text)
    except BadRequest as exc:
        assert "Traceback" not in exc.detail and len(exc.detail) < 200
        return
    assert ID_TEXT.match(text) and str(parsed) == f"{int(text.split('-')[0])}-{int(text.split('-')[1])}"


@given(U64, U64, U64, U64)
def test_isBefore_whenTwoIds_thenNumericOrderNotTextOrder(ms1: int, seq1: int, ms2: int, seq2: int) -> None:
    assert is_before(f"{ms1}-{seq1}", f"{ms2}-{seq2}") == ((ms1, seq1) < (ms2, seq2))


@given(U64, U64)
@example(2**64 - 1, 2**64 - 1)
@example(2**64 - 1, 2**64 - 2)
def test_resolveCursor_whenAnyU64Parts_thenOnlyTheLastPossibleIdRefused(ms: int, seq: int) -> None:
    # XRANGE refuses "(2^64-1-2^64-1" as an exclusive start: nothing can follow it.
    last = ms == seq == 2**64 - 1
    try:
        assert resolve_cursor(None, f"{ms}-{seq}") == f"{ms}-{seq}" and not last
    except BadRequest:
        assert last


@given(st.one_of(st.none(), st.text(max_size=40)), st.one_of(st.none(), st.text(max_size=40)))
def test_resolveCursor_whenAnyHeaderAndQuery_thenValidCursorOrBadRequest(header: str | None, query: str | None) -> None:
    try:
        cursor = resolve_cursor(header, query)
    except BadRequest:
        return
    assert cursor is None or cursor == NEWEST or ID_TEXT.match(cursor)


def parse_stream(body: str) -> list[dict[str, str]]:
    """Events as a browser's EventSource parses them (WHATWG HTML, "interpreting an event stream")."""
    events: list[dict[str, str]] = []
    data: list[str] = []
    fields: dict[str, str] = {}
    for line in re.split(r"\r\n|\r|\n", body):
        if line == "":
            if data or fields:
                events.append({**fields, "data": "\n".join(data)})
            data, fields = [], {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name in ("event", "id"):
            fields[name] = value
    return events


#: Text made of line breaks and field-looking pieces: what an injection attempt would send.
LINE_BREAKY = st.lists(st.sampled_from(["a", " ", ":", "\n", "\r", "é", "data: x", "id: 9", "\r\n"])).map("".join)


@given(U64, U64, st.one_of(LINE_BREAKY, st.text()), st.one_of(LINE_BREAKY, st.from_regex(r"[a-z][a-z0-9_.]{0,20}")))
def test_frame_whenDataAndTypeHoldLineBreaks_thenExactlyOneEventNoInjection(
    ms: int, seq: int, data: str, event_type: str
) -> None:
    event_id = f"{ms}-{seq}"
    events = parse_stream(sse.frame(event_id, event_type, data).decode())
    assert len(events) == 1
    (event,) = events
    assert event["id"] == event_id
    # A line break cannot travel inside an SSE field: data keeps it as "\n", a type loses it.
    assert event["data"] == re.sub(r"\r\n|\r", "\n", data)
    assert event.get("event", "") == event_type.replace("\r", "").replace("\n", "")


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=5))
def test_frame_whenCompactJson_thenDataParsesBackToTheSameObject(obj: dict[str, str]) -> None:
    data = json.dumps(obj, separators=(",", ":"))
    (event,) = parse_stream(sse.frame("1-0", "log", data).decode())
    assert json.loads(event["data"]) == obj


def _request(body: bytes, chunk_sizes: list[int], content_length: bool) -> Request:
    chunks: list[bytes] = []
    rest = body
    for size in chunk_sizes:
        chunks.append(rest[:size])
        rest = rest[size:]
    chunks.append(rest)
    headers = [(b"content-type", b"application/json")]
    if content_length:
        headers.append((b"content-length", str(len(body)).encode()))
    messages = iter(
        [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)]
    )

    async def receive() -> dict[str, Any]:
        return next(messages)

    return Request({"type": "http", "method": "POST", "headers": headers, "query_string": b""}, receive)


@settings(max_examples=150)
@given(
    st.integers(min_value=0, max_value=3000),
    st.lists(st.integers(min_value=0, max_value=700), max_size=6),
    st.booleans(),
)
def test_readJson_whenBodyAroundTheLimit_then413ExactlyPastIt(
    size: int, chunk_sizes: list[int], declared: bool
) -> None:
    max_bytes = 1500
    body = json.dumps({"pad": "x" * max(0, size - 11)}).encode()  # 11 bytes of JSON around the padding
    request = _request(body, chunk_sizes, declared)
    if len(body) > max_bytes:
        with pytest.raises(PayloadTooLarge):
            asyncio.run(read_json(request, max_bytes))
    else:
        assert asyncio.run(read_json(request, max_bytes)) == json.loads(body)


@given(st.binary(max_size=200))
def test_readJson_whenArbitraryBytes_thenJsonOr422NeverACrash(body: bytes) -> None:
    try:
        asyncio.run(read_json(_request(body, [], True), 1000))
    except ProblemError as exc:
        assert exc.status == 422


#: JSON values as clients send them: finite numbers, valid Unicode (hypothesis' text has no surrogates).
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)
#: What the standard library's json.loads takes and API.md's strict JSON does not.
NOT_STRICT = ["NaN", "Infinity", "-Infinity", "1e999", "-1e400", '"\\ud800"', '"\\udfff"', '"a\\udc00b"']


def _read(body: bytes) -> Any:
    return asyncio.run(read_json(_request(body, [], True), 1 << 20))


@given(JSON_VALUES)
def test_readJson_whenStrictJson_thenTheSameValue(value: Any) -> None:
    for body in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert _read(body.encode()) == value


@given(JSON_VALUES, st.sampled_from(NOT_STRICT), st.integers(min_value=0, max_value=40))
def test_readJson_whenOneBadLeafAnywhere_then422(value: Any, bad: str, depth: int) -> None:
    marker = "\ue000marker\ue000"
    text = json.dumps({"value": value, "bad": marker}).replace(json.dumps(marker), "[" * depth + bad + "]" * depth)
    json.loads(text)  # the standard library takes it
    with pytest.raises(ProblemError) as refused:
        _read(text.encode())
    assert refused.value.status == 422


@given(st.integers(min_value=1, max_value=400), st.sampled_from(["[]", "{}"]), st.booleans())
def test_readJson_whenNested_thenAcceptedUpTo64Levels(depth: int, brackets: str, as_strings: bool) -> None:
    opening, closing = ("[", "]") if brackets == "[]" else ('{"k":', "}")
    text = opening * (depth - 1) + ("[]" if brackets == "[]" else "{}") + closing * (depth - 1)
    if as_strings:  # brackets inside strings nest nothing
        text = json.dumps([text])
        depth = 1
    if depth <= 64:
        assert _read(text.encode()) == json.loads(text)
    else:
        with pytest.raises(ProblemError) as refused:
            _read(text.encode())
        assert refused.value.status == 422
