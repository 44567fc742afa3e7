"""POST /v1/jobs against a real Redis: storage, queueing, validation, idempotency, rate limits."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import httpx
import jwt
import pytest
import redis

from jobstream import keys
from tests.conftest import ALICE, BOB, JWT_SECRET, LiveStack, create_job
from tests.helpers import assert_problem, value

pytestmark = pytest.mark.on_cluster


def test_create_whenValid_thenStoresMetaWithTtlAndQueuesBeforeAnswering(
    make_stack: Callable[..., LiveStack], rdb: redis.Redis
) -> None:
    stack = make_stack(with_worker=False)
    started = time.monotonic()
    with stack.client() as http:
        response = http.post("/v1/jobs", json={"type": "test.slow", "input": {"steps": 3}, "ttl": 120}, headers=ALICE)
    assert response.status_code == 201
    body = response.json()
    job_id = body["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    assert body["status"] == "pending" and body["type"] == "test.slow" and body["token"]
    assert body["links"] == {
        "self": f"/v1/jobs/{job_id}",
        "events": f"/v1/jobs/{job_id}/events",
        "poll": f"/v1/jobs/{job_id}/poll",
        "cancel": f"/v1/jobs/{job_id}/cancel",
    }
    assert body["created_at"].endswith("Z") and body["expires_at"] > body["created_at"]
    for header in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"):
        assert header in response.headers
    meta = rdb.hgetall(keys.meta_key(job_id))
    assert meta["owner"] == "alice" and meta["status"] == "pending"
    ttl_s = rdb.ttl(keys.meta_key(job_id))
    # The TTL set at creation, less (at most) the time this test took since (Redis rounds it).
    assert 120 - math.ceil(time.monotonic() - started) - 1 <= ttl_s <= 120
    queued = rdb.xrange(keys.queue_key)
    assert [fields["job"] for _, fields in queued] == [job_id]


def test_create_whenExternal_thenNotQueued(client: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(client, "external")
    assert rdb.exists(keys.meta_key(job["id"]))
    assert rdb.xlen(keys.queue_key) == 0


def test_create_whenNoOrBadCredentials_then401WithChallenge(client: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5OnZhbHVl"}):
        response = client.post("/v1/jobs", json={"type": "external"}, headers=headers)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_create_whenJwt_thenSubIsTheOwner(client: httpx.Client, rdb: redis.Redis) -> None:
    token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")
    job = create_job(client, "external", headers={"Authorization": f"Bearer {token}"})
    assert rdb.hget(keys.meta_key(job["id"]), "owner") == "carol"


def test_create_whenReadToken_then403(client: httpx.Client) -> None:
    job = create_job(client, "external")
    response = client.post("/v1/jobs", json={"type": "external"}, headers={"Authorization": f"Bearer {job['token']}"})
    assert_problem(response, 403)


def test_create_whenUnknownType_then422NamingTheField(client: httpx.Client) -> None:
    body = assert_problem(client.post("/v1/jobs", json={"type": "nope"}, headers=ALICE), 422)
    assert body["errors"][0]["loc"] == ["type"]  # type: ignore[index]


def test_create_whenInputInvalidForHandler_then422WithFieldErrors(client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json={"type": "test.slow", "input": {"steps": "many"}}, headers=ALICE)
    body = assert_problem(response, 422)
    assert body["errors"][0]["loc"] == ["input", "steps"]  # type: ignore[index]


def test_create_whenBodyMalformed_thenClear4xx(client: httpx.Client) -> None:
    assert_problem(
        client.post("/v1/jobs", content=b"{not json", headers={**ALICE, "Content-Type": "application/json"}), 422
    )
    assert_problem(client.post("/v1/jobs", content=b"type=x", headers={**ALICE, "Content-Type": "text/plain"}), 415)
    assert_problem(client.post("/v1/jobs", json=["a", "list"], headers=ALICE), 422)
    assert_problem(client.post("/v1/jobs", json={"type": "external", "extra": 1}, headers=ALICE), 422)
    assert_problem(client.post("/v1/jobs", json={"type": "external", "ttl": 0}, headers=ALICE), 422)
    assert_problem(client.post("/v1/jobs", json={"type": "external", "ttl": 10**9}, headers=ALICE), 422)


def test_create_whenBodyTooLarge_then413(client: httpx.Client) -> None:
    big = {"type": "external", "input": {"blob": "x" * 70000}}
    assert_problem(client.post("/v1/jobs", json=big, headers=ALICE), 413)

    def chunks() -> object:
        yield b'{"type": "external", "input": {"blob": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}}'

    # No Content-Length (chunked): the limit still holds while reading.
    response = client.post("/v1/jobs", content=chunks(), headers={**ALICE, "Content-Type": "application/json"})
    assert_problem(response, 413)


def test_create_whenIdempotencyKeyRepeated_thenSameJob(client: httpx.Client, rdb: redis.Redis) -> None:
    headers = {**ALICE, "Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json={"type": "external", "input": {"a": 1}}, headers=headers)
    again = client.post("/v1/jobs", json={"type": "external", "input": {"a": 1}}, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == first.json()
    assert len(list(rdb.scan_iter(match=keys.meta_key("*")))) == 1
    other_body = client.post("/v1/jobs", json={"type": "external", "input": {"a": 2}}, headers=headers)
    assert_problem(other_body, 422)
    bob = client.post(
        "/v1/jobs", json={"type": "external", "input": {"a": 1}}, headers={**BOB, "Idempotency-Key": "order-42"}
    )
    assert bob.status_code == 201 and bob.json()["id"] != first.json()["id"]
    assert_problem(client.post("/v1/jobs", json={"type": "external"}, headers={**ALICE, "Idempotency-Key": "a b"}), 400)


def test_rateLimit_whenSharedByTwoGateways_thenCountsAcrossBoth(make_stack: Callable[..., LiveStack]) -> None:
    one = make_stack(with_worker=False, create_rate="3/minute")
    two = make_stack(with_worker=False, create_rate="3/minute")
    with one.client() as a, two.client() as b:
        answers = [http.post("/v1/jobs", json={"type": "external"}, headers=ALICE) for http in (a, b, a)]
        assert [r.status_code for r in answers] == [201, 201, 201]
        assert [r.headers["ratelimit-remaining"] for r in answers] == ["2", "1", "0"]
        refusals = value(b.get("/metrics").text, "jobstream_rate_limited_total", limit="create")
        refused = b.post("/v1/jobs", json={"type": "external"}, headers=ALICE)
        assert_problem(refused, 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert value(b.get("/metrics").text, "jobstream_rate_limited_total", limit="create") == refusals + 1
        assert refused.headers["ratelimit-limit"] == "3" and refused.headers["ratelimit-remaining"] == "0"
        # Another user has a window of their own.
        assert a.post("/v1/jobs", json={"type": "external"}, headers=BOB).status_code == 201
