"""Security properties a production deploy relies on: CORS, per-user long-poll slots, key comparison."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from starlette.requests import Request

from jobstream import keys
from jobstream.auth import Authenticator
from jobstream.settings import SettingsError, load_settings
from tests.conftest import ALICE, BOB, LiveStack, append, create_job, make_settings
from tests.helpers import assert_problem, value, wait_until

APP = "https://app.example"


def test_cors_whenOriginConfigured_thenOnlyItIsAllowedAndNeverWithCredentials(
    make_stack: Callable[..., LiveStack],
) -> None:
    stack = make_stack(with_worker=False, cors_origins=[APP])
    with stack.client() as http:
        preflight = http.options(
            "/v1/jobs",
            headers={
                "Origin": APP,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == APP
        assert "access-control-allow-credentials" not in preflight.headers
        created = http.post("/v1/jobs", json={"type": "external"}, headers={**ALICE, "Origin": APP})
        assert created.headers["access-control-allow-origin"] == APP
        exposed = created.headers["access-control-expose-headers"].lower()
        assert "ratelimit-remaining" in exposed and "location" in exposed
        job = created.json()
        with http.stream(
            "GET", f"/v1/jobs/{job['id']}/events", params={"token": job["token"]}, headers={"Origin": APP}
        ) as stream:
            assert stream.status_code == 200 and stream.headers["access-control-allow-origin"] == APP
        elsewhere = http.get(f"/v1/jobs/{job['id']}", headers={**ALICE, "Origin": "https://evil.example"})
        assert elsewhere.status_code == 200 and "access-control-allow-origin" not in elsewhere.headers
        refused = http.options(
            "/v1/jobs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_cors_whenNotConfigured_thenNoCrossOriginHeaders(client: httpx.Client) -> None:
    response = client.get("/healthz", headers={"Origin": APP})
    assert "access-control-allow-origin" not in response.headers


def test_cors_whenWildcard_thenAnyOriginButNoCredentials(make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(with_worker=False, cors_origins=["*"])
    with stack.client() as http:
        response = http.get("/healthz", headers={"Origin": APP})
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


def test_cors_whenOriginSettingMalformed_thenStartupRefused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBSTREAM_CORS_ORIGINS", "https://ok.example, https://bad.example/path")
    with pytest.raises(SettingsError, match="JOBSTREAM_CORS_ORIGINS"):
        load_settings()


def test_longPolls_whenUserHasTooManyWaiting_then429AndOthersUnaffected(
    make_stack: Callable[..., LiveStack], rdb: redis.Redis
) -> None:
    stack = make_stack(with_worker=False, max_long_polls_per_user=2)
    with stack.client() as http:
        job = create_job(http)
        url = f"/v1/jobs/{job['id']}/poll"
        waiting: list[int] = []

        def long_poll() -> None:
            with stack.client() as other:
                # Long enough to outlast the checks below: the event appended after them ends it.
                waiting.append(other.get(url, params={"token": job["token"], "wait": 20}).status_code)

        threads = [threading.Thread(target=long_poll) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_until(
            lambda: rdb.zcard(keys.long_poll_leases_key("alice")) == 2,
            message="the two long-polls never took their slots",
        )
        refusals = value(http.get("/metrics").text, "jobstream_rate_limited_total", limit="long_poll")
        refused = http.get(url, params={"token": job["token"], "wait": 2})
        assert_problem(refused, 429)
        assert refused.headers["retry-after"] == "1"
        assert value(http.get("/metrics").text, "jobstream_rate_limited_total", limit="long_poll") == refusals + 1
        assert http.get(url, params={"token": job["token"]}).status_code == 200  # a short poll needs no slot
        bob_job = create_job(http, headers=BOB)
        bob = http.get(f"/v1/jobs/{bob_job['id']}/poll", params={"token": bob_job["token"], "wait": 0.2})
        assert bob.status_code == 200
        assert waiting == []  # both still waiting
        last_id = append(http, job, {"type": "delta", "data": {"text": "wake up"}})[-1]
        for thread in threads:
            thread.join()
        assert waiting == [200, 200]
        assert rdb.zcard(keys.long_poll_leases_key("alice")) == 0  # every slot given back
        # A long-poll again (nothing after the last event): it gets a slot.
        assert http.get(url, params={"token": job["token"], "after": last_id, "wait": 0.2}).status_code == 200


def test_apiKeys_whenChecked_thenEveryKeyComparedInConstantTime(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[Any] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return original(a, b)

    auth = Authenticator(make_settings("redis://unused"))
    monkeypatch.setattr("jobstream.auth.hmac.compare_digest", spy)
    scope = {"type": "http", "headers": [(b"authorization", b"Bearer key-bob")], "query_string": b""}
    assert auth.authenticate(Request(scope)).user == "bob"
    assert sorted(compared) == [b"key-alice", b"key-bob"]  # no early exit on the first match
