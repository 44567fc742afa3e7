"""What clients may send (API.md, 1.1 "Hardening"): strict JSON bodies (finite numbers, valid
Unicode, at most 64 levels deep), resume ids Redis can read after, event types the gateway keeps
for itself, strict integers; no redirect built from the request's Host; and read-token readers
counted per job, so that a shared token cannot lock its owner out of their event streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, cast

import httpx
import jwt
import pytest

from jobstream import keys
from jobstream.errors import ValidationFailed
from jobstream.producer import EventWriter, JobContext
from tests.conftest import ALICE, JWT_SECRET, LiveStack, SyncRedis, append, create_job
from tests.helpers import assert_problem, wait_until

MAX = 2**64 - 1
#: The gateway's own event types (jobstream.models.RESERVED_EVENT_TYPES), spelled out here.
RESERVED_EVENT_TYPES = ("snapshot", "truncated")
JSON = {**ALICE, "Content-Type": "application/json"}


@pytest.fixture
def http(make_stack: Callable[..., LiveStack]) -> Iterator[httpx.Client]:
    with make_stack(with_worker=False).client() as client:
        yield client


def strict_json(text: str) -> Any:
    """What a browser's JSON.parse accepts: no NaN, no Infinity."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} in a response body")

    return json.loads(text, parse_constant=refuse)


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return not [record for record in caplog.records if record.levelno >= logging.ERROR]


def fill(template: str, value: str) -> str:
    """``template`` with its ``@`` replaced by ``value`` (JSON text, built by hand)."""
    return template.replace("@", value)


def nested(depth: int) -> str:
    """JSON text of ``depth`` arrays, one inside the other."""
    return "[" * depth + "]" * depth


# ---- 5. strict JSON


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_append_whenNumberNotFinite_then422AndTheJobStaysReadable(
    http: httpx.Client, number: str, caplog: pytest.LogCaptureFixture
) -> None:
    job = create_job(http)
    url = f"/v1/jobs/{job['id']}/events"
    body = fill('{"type": "result", "data": {"score": @}}', number)
    problem = assert_problem(http.post(url, content=body, headers=JSON), 422)
    assert "finite" in str(problem["detail"])
    progress = fill('[{"type": "progress", "data": {"current": 1, "total": @}}]', number)
    assert_problem(http.post(url, content=progress, headers=JSON), 422)
    # Nothing was stored: the status document and both readers' bodies are plain JSON.
    status = http.get(f"/v1/jobs/{job['id']}", headers=ALICE)
    assert status.status_code == 200 and strict_json(status.text)["result"] is None
    poll = http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"]})
    assert poll.status_code == 200 and strict_json(poll.text)["events"] == []
    assert no_errors_logged(caplog)


def test_create_whenNumberNotFinite_then422(http: httpx.Client) -> None:
    for body in ('{"type": "external", "input": {"x": NaN}}', '{"type": "external", "ttl": 1e400}'):
        assert_problem(http.post("/v1/jobs", content=body, headers=JSON), 422)


@pytest.mark.parametrize(
    "text",
    [r'"\ud800"', r'"\udfff"', r'"\ud800\u0041"', r'"a\udc00b"'],
    ids=["high", "low", "high-then-letter", "inside"],
)
def test_body_whenLoneSurrogate_then422Everywhere(
    http: httpx.Client, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    job = create_job(http)
    bodies = {
        "/v1/jobs": [
            fill('{"type": "external", "input": {"q": @}}', text),
            fill('{"type": "external", "input": {@: 1}}', text),
        ],
        f"/v1/jobs/{job['id']}/events": [
            fill('{"type": "delta", "data": {"text": @}}', text),
            fill('[{"type": "log", "data": {"m": [1, {@: 2}]}}]', text),
        ],
    }
    for url, payloads in bodies.items():
        for body in payloads:
            problem = assert_problem(http.post(url, content=body, headers=JSON), 422)
            assert "surrogate" in json.dumps(problem["errors"])
    assert strict_json(http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"]}).text)["events"] == []
    assert no_errors_logged(caplog)


def test_body_whenPairedSurrogates_thenOneCharacterStoredAsIs(http: httpx.Client) -> None:
    pair = r'"\ud83d\ude00"'
    created = http.post("/v1/jobs", content=fill('{"type": "external", "input": {"emoji": @}}', pair), headers=JSON)
    assert created.status_code == 201
    job = created.json()
    url = f"/v1/jobs/{job['id']}/events"
    assert http.post(url, content=fill('{"type": "delta", "data": {"text": @}}', pair), headers=JSON).status_code == 201
    events = http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"]}).json()["events"]
    assert events[-1]["data"] == {"text": "\U0001f600"}


def test_body_whenNestedDeep_then422UpTo64Allowed(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    # The body is level 1, "input" level 2: 62 arrays inside it make 64.
    allowed = fill('{"type": "external", "input": {"a": @}}', nested(62))
    assert http.post("/v1/jobs", content=allowed, headers=JSON).status_code == 201
    one_more = fill('{"type": "external", "input": {"a": @}}', nested(63))
    problem = assert_problem(http.post("/v1/jobs", content=one_more, headers=JSON), 422)
    assert "64" in json.dumps(problem["errors"])
    job = create_job(http)
    url = f"/v1/jobs/{job['id']}/events"
    for depth in (63, 200, 3000, 30000):
        for body in (fill('{"type": "external", "input": {"a": @}}', nested(depth)), nested(depth)):
            assert_problem(http.post("/v1/jobs", content=body, headers=JSON), 422)
        assert_problem(
            http.post(url, content=fill('{"type": "log", "data": {"a": @}}', nested(depth)), headers=JSON), 422
        )
    deep_object = '{"type": "log", "data": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}"
    assert_problem(http.post(url, content=deep_object, headers=JSON), 422)
    assert no_errors_logged(caplog)


def test_userJwt_whenSubIsALoneSurrogate_then401(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    job = create_job(http)
    forged = {"Authorization": "Bearer " + jwt.encode({"sub": "\ud800"}, JWT_SECRET, algorithm="HS256")}
    for response in (
        http.post("/v1/jobs", json={"type": "external"}, headers=forged),
        http.get(f"/v1/jobs/{job['id']}", headers=forged),
        http.get(f"/v1/jobs/{job['id']}/poll", headers=forged),
        http.post(f"/v1/jobs/{job['id']}/events", json={"type": "log"}, headers=forged),
    ):
        assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert no_errors_logged(caplog)


def _sse_status(http: httpx.Client, job: dict[str, Any], **kwargs: Any) -> httpx.Response:
    """The head of an event stream request; its body is read only if it is not a stream."""
    with http.stream("GET", f"/v1/jobs/{job['id']}/events", **kwargs) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
        return response


@pytest.mark.parametrize(
    "event_id", [f"{MAX}-{MAX}", f"{MAX + 1}-0", f"0-{MAX + 1}", "\u0661-0"], ids=["last", "ms", "seq", "digit"]
)
def test_resumeId_whenRedisCannotReadAfterIt_then400OnPollAndSse(
    http: httpx.Client, event_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    job = create_job(http)
    append(http, job, {"type": "delta", "data": {"text": "hi"}})
    token = {"token": job["token"]}
    assert_problem(http.get(f"/v1/jobs/{job['id']}/poll", params={**token, "after": event_id}), 400)
    assert_problem(_sse_status(http, job, params={**token, "last_event_id": event_id}), 400)
    if event_id.isascii():  # header values are Latin-1
        assert_problem(_sse_status(http, job, params=token, headers={"Last-Event-ID": event_id}), 400)
    assert no_errors_logged(caplog)


def test_resumeId_whenJustBelowTheLast_thenReadsNothingAfterIt(http: httpx.Client) -> None:
    job = create_job(http)
    append(http, job, {"type": "delta", "data": {"text": "hi"}})
    for after in (f"{MAX}-{MAX - 1}", f"{MAX - 1}-{MAX}"):
        poll = http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "after": after})
        assert poll.status_code == 200 and poll.json()["events"] == [] and poll.json()["next"] == after
    # The largest seq of a small ms still reads on from the next millisecond.
    poll = http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"], "after": f"0-{MAX}"})
    assert [event["type"] for event in poll.json()["events"]] == ["status", "delta"]


# ---- 6. the gateway's own event types


@pytest.mark.parametrize("name", RESERVED_EVENT_TYPES)
def test_append_whenGatewayOwnEventType_then422(http: httpx.Client, name: str) -> None:
    job = create_job(http)
    url = f"/v1/jobs/{job['id']}/events"
    for body in (
        {"type": name, "data": {"first_id": "1-0"}},
        [{"type": "delta", "data": {"text": "a"}}, {"type": name, "data": {"text": "forged"}}],
    ):
        problem = assert_problem(http.post(url, json=body, headers=ALICE), 422)
        assert "gateway's own" in json.dumps(problem["errors"])
    assert http.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"]}).json()["events"] == []
    # Names that merely start the same are a producer's to use.
    append(http, job, {"type": f"{name}.custom", "data": {}})


def test_openapi_whenEventIn_thenTheGatewayOwnTypesAreExcluded(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()["components"]["schemas"]["EventIn"]["properties"]["type"]
    assert sorted(schema["not"]["enum"]) == ["snapshot", "truncated"]


class _RecordingWriter:
    """Stands for the worker's EventWriter: records what a handler's context appends."""

    job_id = "00000000-0000-4000-8000-000000000000"
    attempt = 1

    def __init__(self) -> None:
        self.appended: list[Any] = []

    async def append(self, events: list[Any]) -> list[str]:
        self.appended += events
        return ["1-0"] * len(events)


def test_handlerEmit_whenGatewayOwnTypeOrNotFinite_thenRefused() -> None:
    writer = _RecordingWriter()
    ctx = JobContext(cast(EventWriter, writer), "test.any")

    async def scenario() -> None:
        for name in RESERVED_EVENT_TYPES:
            with pytest.raises(ValidationFailed):
                await ctx.emit(name, {"text": "forged"})
        with pytest.raises(ValidationFailed):
            await ctx.emit("log", {"x": float("nan")})
        with pytest.raises(ValueError):
            await ctx.progress(1, float("inf"))  # kept in the status document, which must stay JSON
        await ctx.emit("custom.step", {"n": 1})

    asyncio.run(scenario())
    assert [event.type for event in writer.appended] == ["custom.step"]


# ---- 7a. no redirect from the request's Host


def test_trailingSlash_whenAnyPath_then404WithoutLocation(http: httpx.Client) -> None:
    job = create_job(http)
    evil = {"Host": "evil.example"}
    for method, url, headers in [
        ("GET", "/v1/jobs/", {**ALICE, **evil}),
        ("POST", "/v1/jobs/", {**ALICE, **evil}),
        ("GET", f"/v1/jobs/{job['id']}/", {**ALICE, **evil}),
        ("GET", f"/v1/jobs/{job['id']}/events/?token={job['token']}", evil),
        ("GET", f"/v1/jobs/{job['id']}/poll/?token={job['token']}", evil),
        ("GET", "/static", evil),
        ("GET", "/healthz/", evil),
    ]:
        response = http.request(method, url, headers=headers)
        assert_problem(response, 404)
        assert "location" not in response.headers, (method, url)
    # The routes themselves, and their 405s, are unchanged.
    assert http.get(f"/v1/jobs/{job['id']}/cancel", headers=ALICE).status_code == 405
    assert http.put("/v1/jobs", headers=ALICE).status_code == 405
    assert http.get("/healthz").status_code == 200


# ---- 7b. strict integers


def test_create_whenTtlIsNotAnInteger_then422(http: httpx.Client) -> None:
    for ttl in (True, False, "600", 600.0, [600]):
        problem = assert_problem(http.post("/v1/jobs", json={"type": "external", "ttl": ttl}, headers=ALICE), 422)
        assert problem["errors"] and problem["errors"][0]["loc"] == ["ttl"]  # type: ignore[index]
    assert create_job(http, ttl=600)["status"] == "pending"


def test_append_whenProgressNumberIsABoolean_then422(http: httpx.Client) -> None:
    job = create_job(http)
    url = f"/v1/jobs/{job['id']}/events"
    for data in ({"current": True}, {"current": 1, "total": True}, {"current": "1"}):
        assert_problem(http.post(url, json={"type": "progress", "data": data}, headers=ALICE), 422)
    append(http, job, {"type": "progress", "data": {"current": 1, "total": 2.5}})


# ---- 7c. read-token readers count per job


def test_sse_whenTokenReadersFillTheirJob_thenOwnerStillStreamsAndTokenLimitIs429(
    make_stack: Callable[..., LiveStack], rdb: SyncRedis
) -> None:
    stack = make_stack(with_worker=False, max_sse_per_user=5, max_sse_per_token_job=5)
    with stack.client() as http, contextlib.ExitStack() as held:
        job, other_job = create_job(http), create_job(http)
        url = f"/v1/jobs/{job['id']}/events"

        def open_stream(target: str, **kwargs: Any) -> httpx.Response:
            return held.enter_context(http.stream("GET", target, **kwargs))

        readers = [open_stream(url, params={"token": job["token"]}) for _ in range(5)]
        assert [reader.status_code for reader in readers] == [200] * 5
        # The five token readers did not take the owner's slots: the owner's own key still streams.
        assert open_stream(url, headers=ALICE).status_code == 200
        assert rdb.zcard(keys.token_sse_leases_key(job["id"])) == 5
        assert rdb.zcard(keys.sse_leases_key("alice")) == 1
        # The job's token readers are at their bound; another job's are not.
        refused = http.get(url, params={"token": job["token"]})
        assert "per job" in str(assert_problem(refused, 429)["detail"])
        assert "retry-after" in refused.headers
        other_url = f"/v1/jobs/{other_job['id']}/events"
        assert open_stream(other_url, params={"token": other_job["token"]}).status_code == 200
        # A token reader that leaves gives its slot back.
        readers[0].close()

        def reopened() -> bool:
            with http.stream("GET", url, params={"token": job["token"]}) as again:
                return again.status_code == 200

        wait_until(reopened, timeout_s=5, interval_s=0.1, message="a closed token stream never gave its slot back")


def test_sse_whenOwnerStreamsWithTheirKey_thenPerUserLimitStillHolds(make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(with_worker=False, max_sse_per_user=2)
    with stack.client() as http, contextlib.ExitStack() as held:
        job = create_job(http)
        url = f"/v1/jobs/{job['id']}/events"
        for _ in range(2):
            assert held.enter_context(http.stream("GET", url, headers=ALICE)).status_code == 200
        assert "per user" in str(assert_problem(http.get(url, headers=ALICE), 429)["detail"])
        # Token readers do not count against it.
        assert held.enter_context(http.stream("GET", url, params={"token": job["token"]})).status_code == 200
