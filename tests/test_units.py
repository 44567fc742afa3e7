"""Pure logic: cursors, settings, credentials, event models, SSE framing, key schema, log redaction."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from pydantic import ValidationError
from starlette.requests import Request

from jobstream import auth as auth_module
from jobstream import keys, sse
from jobstream.auth import Authenticator, authorize_read, authorize_write
from jobstream.cursor import NEWEST, is_before, parse_id, resolve_cursor
from jobstream.errors import BadRequest, Forbidden, Unauthorized
from jobstream.models import EventIn, Progress
from jobstream.redaction import redact
from jobstream.settings import SettingsError, load_settings
from jobstream.store import JobRecord
from tests.conftest import JWT_SECRET, TOKEN_SECRET, make_settings
from tests.helpers import wait_until


def test_parseId_whenValid_thenOrderedNumerically() -> None:
    assert parse_id("1732200000000-0") == (1732200000000, 0)
    assert is_before("9-0", "10-0") and is_before("10-2", "10-10") and not is_before("10-0", "10-0")


@pytest.mark.parametrize("bad", ["", "abc", "1", "1-", "-1", "1-0-0", "1.5-0", " 1-0", "18446744073709551616-0"])
def test_parseId_whenMalformed_thenBadRequest(bad: str) -> None:
    with pytest.raises(BadRequest):
        parse_id(bad)


def test_resolveCursor_whenHeaderAndQuery_thenHeaderFirstAndDollarKept() -> None:
    assert resolve_cursor("5-1", "7-0") == "5-1"
    assert resolve_cursor(None, "7-0") == "7-0"
    assert resolve_cursor("", "7-0") == "7-0"
    assert resolve_cursor(None, "$") == NEWEST
    assert resolve_cursor(None, None) is None


def test_settings_whenEnvironment_thenParsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBSTREAM_API_KEYS", "k1=alice, k2=bob")
    monkeypatch.setenv("JOBSTREAM_APP", "a.b,c")
    monkeypatch.setenv("JOBSTREAM_CREATE_RATE", "5/second")
    settings = load_settings()
    assert settings.api_keys == {"k1": "alice", "k2": "bob"}
    assert settings.app == ["a.b", "c"] and settings.create_rate == "5/second"
    assert settings.job_ttl_s == 600 and settings.stream_maxlen == 10000 and settings.heartbeat_s == 15


@pytest.mark.parametrize(
    ("name", "value"),
    [("JOBSTREAM_CREATE_RATE", "lots"), ("JOBSTREAM_REDIS_URL", "http://x"), ("JOBSTREAM_HEARTBEAT_S", "0")],
)
def test_settings_whenInvalid_thenOneLineNamingTheVariable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert name in str(info.value) and "\n" not in str(info.value)


def _request(authorization: str | None = None, query: str = "") -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "query_string": query.encode()})


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(make_settings("redis://unused"))


def _jwt(claims: dict[str, Any], secret: str = JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def test_auth_whenUserJwtVariants_thenOnlyValidAccepted(auth: Authenticator) -> None:
    now = int(time.time())
    assert auth.authenticate(_request("Bearer " + _jwt({"sub": "carol"}))).user == "carol"
    rejected = [
        _jwt({"sub": "carol"}, secret="wrong-secret-0123456789abcdef0123"),
        _jwt({"sub": "carol", "exp": now - 10}),
        _jwt({"sub": "carol", "nbf": now + 600}),
        _jwt({"name": "no sub"}),
        jwt.encode({"sub": "carol"}, None, algorithm="none"),  # type: ignore[arg-type]
        _jwt({"sub": "carol", "aud": "jobstream:read", "job": "x"}),  # a read token signed with the wrong secret
    ]
    for token in rejected:
        with pytest.raises(Unauthorized):
            auth.authenticate(_request("Bearer " + token))


def test_readToken_whenUsed_thenReadsOnlyItsJob(auth: Authenticator) -> None:
    token = auth.issue_read_token("job-1", "alice")
    principal = auth.authenticate(_request(query=f"token={token}"), allow_query_token=True)
    assert principal.user == "alice" and principal.job_id == "job-1" and principal.read_only
    with pytest.raises(Unauthorized):
        auth.authenticate(_request(query=f"token={token}"))  # the query is only for read endpoints
    mine = JobRecord({"id": "job-1", "owner": "alice"})
    other = JobRecord({"id": "job-2", "owner": "alice"})
    authorize_read(principal, mine)
    with pytest.raises(Forbidden):
        authorize_read(principal, other)
    with pytest.raises(Forbidden):
        authorize_write(principal, mine)


def test_readToken_whenPresentedAgain_thenVerifiedOnceAndNotKept(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes: list[str] = []
    real_decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        decodes.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    token = auth.issue_read_token("job-1", "alice")
    for _ in range(3):
        principal = auth.authenticate(_request(query=f"token={token}"), allow_query_token=True)
        assert principal.user == "alice" and principal.job_id == "job-1"
    assert auth.authenticate(_request("Bearer " + token)).job_id == "job-1"
    assert decodes == [token]
    assert token not in repr(auth.__dict__)  # remembered by digest only
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(Unauthorized):
        auth.authenticate(_request(query=f"token={forged}"), allow_query_token=True)
    user_jwt = _jwt({"sub": "carol"})
    auth.authenticate(_request("Bearer " + user_jwt))
    auth.authenticate(_request("Bearer " + user_jwt))
    assert decodes.count(user_jwt) == 2  # user JWTs expire: verified every time


def test_readTokens_whenMoreThanRemembered_thenOldestForgotten(
    auth: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth_module, "VERIFIED_READ_TOKENS", 3)
    tokens = [auth.issue_read_token(f"job-{n}", "alice") for n in range(5)]
    for token in tokens:
        auth.authenticate(_request(query=f"token={token}"), allow_query_token=True)
    assert len(auth._verified) == 3
    assert auth.authenticate(_request(query=f"token={tokens[0]}"), allow_query_token=True).job_id == "job-0"


def test_readToken_whenSecretsEqual_thenStillNotAUserCredential() -> None:
    same = make_settings("redis://unused", jwt_secret=TOKEN_SECRET)
    auth = Authenticator(same)
    principal = auth.authenticate(_request("Bearer " + auth.issue_read_token("job-1", "alice")))
    assert principal.read_only


def test_progress_whenTotal_thenPercent() -> None:
    assert Progress(current=1, total=4).percent == 25.0
    assert Progress(current=3).percent is None
    with pytest.raises(ValidationError):
        Progress(current=1, total=0)


@pytest.mark.parametrize("name", ["Delta", "a b", "x\ny", "", "a" * 65, "ünï"])
def test_eventIn_whenTypeNotAName_thenRejected(name: str) -> None:
    with pytest.raises(ValidationError):
        EventIn(type=name, data={})


def test_encodeEvent_whenDataHasLineBreaks_thenEveryLineIsData() -> None:
    frame = sse.frame("1-0", "delta", "line1\ninjected\r\nevent: done\rdata: x").decode()
    lines = frame.split("\n")
    assert lines[0] == "id: 1-0" and lines[1] == "event: delta"
    assert all(line.startswith("data: ") for line in lines[2:-2]) and lines[-2:] == ["", ""]


def test_keys_whenJob_thenSameHashTagAndNoRawUserText() -> None:
    job = "6f1c1f4e-4b8f-4c39-9a2e-1c2d3e4f5a6b"
    assert keys.meta_key(job) == "jobstream:{" + job + "}:meta"
    assert keys.events_key(job).startswith("jobstream:{" + job + "}")
    assert "evil" not in keys.idempotency_key("alice", "evil key*") and "bob" not in keys.sse_leases_key("bob")


def test_redact_whenTokenInQuery_thenRemoved() -> None:
    assert redact("GET /v1/jobs/x/events?token=abc.def&x=1") == "GET /v1/jobs/x/events?token=REDACTED&x=1"


def test_unexpectedError_whenRaised_then500ProblemWithoutInternals() -> None:
    import asyncio

    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Route

    from jobstream.errors import EXCEPTION_HANDLERS

    async def explode(request: Request) -> None:
        raise RuntimeError("password=hunter2 at /srv/app.py line 3")

    app = Starlette(routes=[Route("/boom", explode)], exception_handlers=EXCEPTION_HANDLERS)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get("/boom")

    response = asyncio.run(call())
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "hunter2" not in response.text and "Traceback" not in response.text


def test_readToken_whenTimeBound_thenVerifiedEveryTimeSoItsExpiryHolds(auth: Authenticator) -> None:
    claims = {"sub": "alice", "job": "job-1", "aud": "jobstream:read", "exp": int(time.time()) + 2}
    token = _jwt(claims, secret=TOKEN_SECRET)
    assert auth.authenticate(_request(query=f"token={token}"), allow_query_token=True).job_id == "job-1"

    def refused() -> bool:
        try:
            auth.authenticate(_request(query=f"token={token}"), allow_query_token=True)
        except Unauthorized:
            return True
        return False

    wait_until(refused, timeout_s=10, message="an expired read token was still accepted")
