"""Credentials in URLs and logs, and what a bad credential may cost (API.md, 1.1 "Hardening"):
only a job's read token is accepted in the query; credential-looking query parameters never reach
a log line in clear, however their names are encoded; an Authorization value over 8 KiB is 401
without being decoded, and a credential is decoded at most once."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from jobstream.devredis import free_port
from tests.conftest import ALICE, JWT_SECRET, LiveStack, create_job
from tests.helpers import app_env, assert_problem, jobstream, kill_all, wait_ready, wait_until

WRONG_SECRET = "not-the-jwt-secret-0123456789abcdef"


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every jwt.decode call made from now on (the live stack runs in this process)."""
    calls: list[str] = []
    original = jwt.decode

    def counting(token: str | bytes, *args: Any, **kwargs: Any) -> Any:
        calls.append(token if isinstance(token, str) else token.decode())
        return original(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


@pytest.fixture
def http(make_stack: Callable[..., LiveStack]) -> Iterator[httpx.Client]:
    with make_stack(with_worker=False).client() as client:
        yield client


def _read_paths(job_id: str) -> list[str]:
    return [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/poll", f"/v1/jobs/{job_id}/events"]


def _status(http: httpx.Client, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """GET ``url``; an event stream is left as soon as its head has arrived."""
    with http.stream("GET", url, headers=headers) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
        return response


def test_queryToken_whenApiKeyOrUserJwt_then401_andReadTokenStillReads(http: httpx.Client) -> None:
    job = create_job(http)
    user_jwt = jwt.encode({"sub": "alice"}, JWT_SECRET, algorithm="HS256")
    assert http.get(f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {user_jwt}"}).status_code == 200
    for path in _read_paths(job["id"]):
        for query in (f"token={'key-alice'}", f"token={user_jwt}", "tok%65n=key-alice", f"%74oken={user_jwt}"):
            refused = _status(http, f"{path}?{query}")
            body = assert_problem(refused, 401)
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert "Authorization header" in str(body["detail"])
        assert _status(http, f"{path}?token={job['token']}").status_code == 200
        assert _status(http, f"{path}?tok%65n={job['token']}").status_code == 200  # the same parameter, decoded
        assert _status(http, path, headers=ALICE).status_code == 200  # keys and JWTs belong in the header


def _jwt_of_size(size: int, secret: str = WRONG_SECRET) -> str:
    """A JWT-shaped credential about ``size`` characters long (a valid JWT signed with ``secret``)."""
    return jwt.encode({"sub": "alice", "pad": "x" * (size * 3 // 4)}, secret, algorithm="HS256")


def test_authorization_whenOver8KiB_then401WithoutDecoding(http: httpx.Client, decodes: list[str]) -> None:
    job = create_job(http)
    status_url = f"/v1/jobs/{job['id']}"
    long_valid = _jwt_of_size(9 * 1024, JWT_SECRET)  # even a well-signed one: too long to look at
    assert len(long_valid) > 8192
    for credential in (_jwt_of_size(9 * 1024), long_valid, "k" * 8200):
        refused = http.get(status_url, headers={"Authorization": f"Bearer {credential}"})
        assert "8192" in str(assert_problem(refused, 401)["detail"])
        refused = http.get(status_url, params={"token": credential})
        assert_problem(refused, 401)
    # Past 16 KiB of headers the request is refused before any credential is looked at (431);
    # a 6 MB bad bearer cost two decodes and ~1 s of a blocked event loop before.
    huge = http.get(status_url, headers={"Authorization": f"Bearer {_jwt_of_size(6_000_000)}"})
    assert_problem(huge, 431)
    assert decodes == []


def test_credentials_whenChecked_thenEachDecodedAtMostOnce(http: httpx.Client, decodes: list[str]) -> None:
    job = create_job(http)
    status_url = f"/v1/jobs/{job['id']}"

    def decodes_of(status: int, credential: str, *, in_query: bool = False) -> int:
        decodes.clear()
        if in_query:
            response = http.get(status_url, params={"token": credential})
        else:
            response = http.get(status_url, headers={"Authorization": f"Bearer {credential}"})
        assert response.status_code == status, (credential[:40], response.text)
        return len(decodes)

    bad_signature = jwt.encode({"sub": "alice"}, WRONG_SECRET, algorithm="HS256")
    forged_read = jwt.encode({"sub": "alice", "job": job["id"], "aud": "jobstream:read"}, WRONG_SECRET)
    assert decodes_of(401, bad_signature) == 1  # was 2: read token, then user JWT
    assert decodes_of(401, forged_read) == 1
    assert decodes_of(200, jwt.encode({"sub": "alice"}, JWT_SECRET, algorithm="HS256")) == 1
    assert decodes_of(200, job["token"]) == 1
    assert decodes_of(200, job["token"], in_query=True) == 0  # verified just above: remembered
    assert decodes_of(200, "key-alice") == 0
    assert decodes_of(401, "not-a-key-and-not-a-jwt") == 0  # was 2
    assert decodes_of(401, "a.b.c") == 0
    assert decodes_of(401, bad_signature, in_query=True) == 0  # a user JWT is never read from the query


# ---- access logs of a real `serve` process

API_KEY = "hardening-api-key-0123456789"
TOKEN_SECRET = "hardening-token-secret-0123456789abcdef"


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_accessLog_whenCredentialsInQuery_thenNeverInClear(redis_url: str, tmp_path: Path, log_format: str) -> None:
    secrets = {name: f"s3cr3t-{index}-{uuid.uuid4().hex}" for index, name in enumerate(_PARAMETERS)}
    secrets["tok%65n"] = API_KEY  # the gateway's own API key, which this parameter used to accept
    port = free_port()
    env = app_env(redis_url, API_KEY, TOKEN_SECRET, JOBSTREAM_LOG_FORMAT=log_format)
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        gateway = jobstream("serve", "--port", str(port), env=env, stderr=stderr)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            wait_ready(http)
            job_id = str(uuid.uuid4())
            for index, (name, secret) in enumerate(secrets.items()):
                path = _read_paths(job_id)[index % 3]
                response = http.get(f"{path}?after=0-0&{name}={secret}&limit=5")
                assert response.status_code in (401, 404)
                assert response.status_code == 401 or name == "tok%65n"  # never the API key from a query
            # Access lines are written as responses start: one more request, then wait for its line.
            marker = uuid.uuid4().hex
            assert http.get("/healthz", params={"marker": marker}).status_code == 200
            wait_until(lambda: marker in log.read_text(), message="the access lines were never written")
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=20)
        kill_all(gateway)

    text = log.read_text()
    for name, secret in secrets.items():
        assert secret not in text, f"?{name}= written in clear"
        assert f"{name}=REDACTED" in text, f"no access line for ?{name}="
    lines = text.splitlines()
    if log_format == "json":
        requests = [entry for entry in map(json.loads, lines) if entry.get("event") == "request"]
        redacted = [entry["path"] for entry in requests if "REDACTED" in entry["path"]]
        # One line per request, the other parameters kept as they were.
        assert len(redacted) == len(secrets)
        assert all("?after=0-0&" in path and path.endswith("=REDACTED&limit=5") for path in redacted)


#: Query parameters that carry credentials, spelled as careless clients and attackers do.
_PARAMETERS = [
    "tok%65n",
    "tok%2565n",
    "Token",
    "api_key",
    "api%5Fkey",
    "access_token",
    "apikey",
    "password",
    "secret",
    "client_secret",
    "X-Api-Key",
    "%E1%B5%80oken",
]
