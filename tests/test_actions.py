"""Append, cancel, delete, TTL and retention, operations endpoints, and errors of unknown routes."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
import redis
from starlette.routing import Mount, Route

from jobstream import keys
from jobstream.routes import build_routes
from tests.conftest import ALICE, BOB, LiveStack, append, create_job, make_settings, read_sse
from tests.helpers import assert_problem, wait_until

pytestmark = pytest.mark.on_cluster


def test_append_whenSingleOrList_thenIdsInOrderAndStatusMoves(client: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(client)
    one = append(client, job, {"type": "delta", "data": {"text": "a"}})
    more = append(client, job, [{"type": "delta", "data": {"text": "b"}}, {"type": "custom.kind", "data": [1, 2]}])
    assert len(one) == 1 and len(more) == 2
    stream = rdb.xrange(keys.events_key(job["id"]))
    # The first append starts the job: readers see 'running' before any output.
    assert [fields["t"] for _, fields in stream] == ["status", "delta", "delta", "custom.kind"]
    assert [entry_id for entry_id, _ in stream][1:] == one + more
    assert client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["status"] == "running"


def test_append_whenResult_thenCompletedWithImpliedDone(client: httpx.Client) -> None:
    job = create_job(client)
    append(client, job, {"type": "result", "data": {"answer": 42}})
    view = client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()
    assert view["status"] == "completed" and view["result"] == {"answer": 42} and view["completed_at"]
    _, events = read_sse(client, job)
    assert [e.event for e in events] == ["status", "result", "done"]
    response = client.post(f"/v1/jobs/{job['id']}/events", json={"type": "delta", "data": {"text": "x"}}, headers=ALICE)
    assert_problem(response, 409)


def test_append_whenFailure_thenFailedWithError(client: httpx.Client) -> None:
    job = create_job(client)
    append(client, job, [{"type": "failure", "data": {"message": "disk full"}}])
    view = client.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()
    assert view["status"] == "failed" and view["error"] == {"message": "disk full"}


def test_append_whenInvalid_then4xx(client: httpx.Client, stack: LiveStack) -> None:
    job = create_job(client)
    url = f"/v1/jobs/{job['id']}/events"
    bad_bodies = [
        {"type": "Bad Type", "data": {}},
        {"type": "delta", "data": {"text": 5}},
        {"type": "done", "data": {"status": "running"}},
        {"type": "status", "data": {"status": "completed"}},
        {"type": "progress", "data": {"current": -1}},
        [{"type": "done", "data": {"status": "completed"}}, {"type": "delta", "data": {"text": "late"}}],
        [],
        {"type": "result", "data": "not an object"},
    ]
    for body in bad_bodies:
        assert_problem(client.post(url, json=body, headers=ALICE), 422)
    assert_problem(client.post(url, json={"type": "delta", "data": {"text": "x"}}, headers=BOB), 403)
    token_auth = {"Authorization": f"Bearer {job['token']}"}
    assert_problem(client.post(url, json={"type": "delta", "data": {"text": "x"}}, headers=token_auth), 403)
    assert_problem(client.post(url, json={"type": "delta", "data": {"text": "x"}}, params={"token": job["token"]}), 401)
    worker_job = create_job(client, "test.echo")
    response = client.post(
        f"/v1/jobs/{worker_job['id']}/events", json={"type": "delta", "data": {"text": "x"}}, headers=ALICE
    )
    assert_problem(response, 409)


def test_cancel_whenExternalOrPending_thenCancelledAtOnce(make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(with_worker=False)
    with stack.client() as http:
        for job_type in ("external", "test.echo"):
            job = create_job(http, job_type)
            response = http.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
            assert response.status_code == 202 and response.json() == {"status": "cancelling"}
            _, events = read_sse(http, job)
            assert [(e.event, e.json()) for e in events] == [("done", {"status": "cancelled"})]
            assert_problem(http.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE), 409)


def test_cancel_whenNotOwnerOrReadToken_then403(client: httpx.Client) -> None:
    job = create_job(client)
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=BOB), 403)
    token_auth = {"Authorization": f"Bearer {job['token']}"}
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=token_auth), 403)


def test_delete_whenOwner_then204AndGone(client: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(client)
    append(client, job, {"type": "delta", "data": {"text": "x"}})
    assert_problem(client.delete(f"/v1/jobs/{job['id']}", headers=BOB), 403)
    assert client.delete(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 204
    assert not rdb.exists(keys.meta_key(job["id"]), keys.events_key(job["id"]))
    assert_problem(client.get(f"/v1/jobs/{job['id']}", headers=ALICE), 404)
    assert_problem(client.get(f"/v1/jobs/{job['id']}/poll", params={"token": job["token"]}), 404)
    assert_problem(client.get(f"/v1/jobs/{job['id']}/events", params={"token": job["token"]}), 404)


def test_ttl_whenIdle_thenJobExpiresAnd404(client: httpx.Client) -> None:
    job = create_job(client, ttl=1)
    assert client.get(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 200
    wait_until(
        lambda: client.get(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 404,
        timeout_s=5,
        interval_s=0.1,
        message="a job idle past its 1 s TTL was still there",
    )
    assert_problem(client.get(f"/v1/jobs/{job['id']}", headers=ALICE), 404)


def test_ttl_whenAppending_thenRefreshedAndNeverExpiresMidRun(client: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(client, ttl=2)
    for _ in range(4):
        time.sleep(0.8)  # on purpose: time passes between appends, longer in all than the TTL
        append(client, job, {"type": "delta", "data": {"text": "."}})
    assert client.get(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 200
    assert rdb.ttl(keys.events_key(job["id"])) > 0


def test_retention_whenJobEnds_thenKeptForRetentionPeriod(
    make_stack: Callable[..., LiveStack], rdb: redis.Redis
) -> None:
    stack = make_stack(with_worker=False, retention_s=100, failed_retention_s=200)
    with stack.client() as http:
        done_job = create_job(http, ttl=5)
        append(http, done_job, {"type": "result", "data": {}})
        failed_job = create_job(http, ttl=5)
        append(http, failed_job, {"type": "failure", "data": {"message": "no"}})
    for job, retention in ((done_job, 100), (failed_job, 200)):
        for key in (keys.meta_key(job["id"]), keys.events_key(job["id"])):
            assert retention - 3 <= rdb.ttl(key) <= retention


def test_unknownRouteOrMethod_thenProblemJson(client: httpx.Client) -> None:
    assert_problem(client.get("/nope"), 404)
    response = client.put("/v1/jobs", headers=ALICE)
    assert_problem(response, 405)
    job = create_job(client)
    response = client.put(f"/v1/jobs/{job['id']}", headers=ALICE)
    assert_problem(response, 405)
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "DELETE"}
    response = client.delete(f"/v1/jobs/{job['id']}/events", headers=ALICE)
    assert_problem(response, 405)
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}


def test_ops_whenRedisUp_thenHealthyReadyMetrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    create_job(client)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "jobstream_jobs_created_total" in metrics.text
    # Outside `jobstream dev` no credential is ever served to the demo page.
    assert_problem(client.get("/dev.json"), 404)


def test_redisDown_whenRequests_then503WithRetryAfterNotHang(redis_url: str) -> None:
    from jobstream.devredis import free_port
    from tests.conftest import LiveStack
    from tests.helpers import value

    stack = LiveStack(make_settings(f"redis://127.0.0.1:{free_port()}/0"), with_worker=False).start()
    try:
        with stack.client() as http:
            errors_before = value(http.get("/metrics").text, "jobstream_redis_errors_total", where="request")
            started = time.monotonic()
            assert http.get("/healthz").status_code == 200
            assert_problem(http.get("/readyz"), 503)
            response = http.post("/v1/jobs", json={"type": "external"}, headers=ALICE)
            body = assert_problem(response, 503)
            assert response.headers["retry-after"]
            assert "127.0.0.1" not in str(body) and "Error" not in str(body["detail"])
            job_path = "/v1/jobs/6f1c1f4e-4b8f-4c39-9a2e-1c2d3e4f5a6b"
            for path in (job_path, f"{job_path}/events", f"{job_path}/poll"):
                assert_problem(http.get(path, headers=ALICE), 503)
            assert time.monotonic() - started < 30
            # /metrics still answers, with what it has: the 503s counted as Redis errors.
            scrape = http.get("/metrics")
            assert scrape.status_code == 200
            assert value(scrape.text, "jobstream_redis_errors_total", where="request") - errors_before == 4
    finally:
        stack.stop()


def test_openapi_whenServed_thenDocumentsEveryRouteAndMethod(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    served: set[tuple[str, str]] = set()
    for route in build_routes():
        # Not the API: the demo page, the document itself, and what only `jobstream dev` serves.
        if (
            isinstance(route, Mount)
            or route.path in ("/", "/openapi.json", "/dev.json")
            or route.path.startswith("/dev/")
        ):
            continue
        assert isinstance(route, Route)
        methods = route.methods or {m.upper() for m in ("get", "post", "delete") if hasattr(route.endpoint, m)}
        served |= {(route.path, m) for m in methods if m != "HEAD"}
    assert served == documented
    # Every $ref resolves.
    schemas = spec["components"]["schemas"]
    import json

    for ref in {part.split('"')[0] for part in json.dumps(spec).split('"$ref": "')[1:]}:
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
