"""The hot paths served in front of the router answer exactly as the router would."""

from __future__ import annotations

import asyncio
import gc
import weakref

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from jobstream.app import create_app
from jobstream.registry import Registry
from jobstream.routes import hotpath
from jobstream.store import JobStore
from tests.conftest import ALICE, append, create_job, make_settings

JOB_EVENTS = "/v1/jobs/6f1c1f4e-4b8f-4c39-9a2e-1c2d3e4f5a6b/events"


def _get(path: str, method: str = "GET") -> httpx.Response:
    app = create_app(make_settings("redis://127.0.0.1:1/0"), Registry())

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.request(method, path)

    return asyncio.run(call())


def test_eventsPath_whenEndpointFailsUnexpectedly_then500ProblemWithoutInternals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def explode(request: object) -> None:
        raise RuntimeError("password=hunter2 at /srv/app.py line 3")

    monkeypatch.setattr(hotpath, "stream_events", explode)
    response = _get(JOB_EVENTS)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "hunter2" not in response.text and "Traceback" not in response.text


def test_eventsPath_whenNoCredential_then401ProblemFromSameHandlers(client: httpx.Client) -> None:
    response = client.get(JOB_EVENTS)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", ["/v1/jobs/x/events/more", "/v2/jobs/x/events", "/v1/jobs//events"])
def test_otherPaths_whenNearlyTheEventsPath_thenRouterAnswers404(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["detail"] == "No route matches this path."


def test_hotPaths_whenRouterUnusable_thenStillAnswered(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    job = create_job(client)
    append(client, job, [{"type": "delta", "data": {"text": "a"}}])

    async def no_router(self: object, scope: object, receive: object, send: object) -> None:
        raise AssertionError("the router was asked")

    monkeypatch.setattr(Router, "app", no_router)
    base = f"/v1/jobs/{job['id']}"
    assert client.get("/healthz").status_code == 200
    assert client.head("/healthz").status_code == 200
    assert create_job(client)["status"] == "pending"
    assert client.get(base, headers=ALICE).json()["id"] == job["id"]
    assert client.head(base, headers=ALICE).status_code == 200
    assert client.get(f"{base}/poll", headers=ALICE).json()["events"][-1]["data"] == {"text": "a"}
    assert (
        client.post(f"{base}/events", json={"type": "delta", "data": {"text": "b"}}, headers=ALICE).status_code == 201
    )


@pytest.mark.parametrize(
    ("method", "suffix", "allow"),
    [
        ("PUT", "", {"GET", "HEAD", "DELETE"}),
        ("PATCH", "/events", {"GET", "HEAD", "POST"}),
        ("POST", "/poll", {"GET", "HEAD"}),
        ("DELETE", "/poll", {"GET", "HEAD"}),
    ],
)
def test_hotPaths_whenOtherMethod_then405ListingAllowed(
    client: httpx.Client, method: str, suffix: str, allow: set[str]
) -> None:
    job = create_job(client)
    response = client.request(method, f"/v1/jobs/{job['id']}{suffix}", headers=ALICE)
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == allow
    assert response.headers["content-type"] == "application/problem+json"


def test_fixedHotPaths_whenOtherMethod_then405(client: httpx.Client) -> None:
    assert client.put("/v1/jobs", headers=ALICE).status_code == 405
    assert client.post("/healthz").status_code == 405


@pytest.mark.parametrize("path", ["/v1/jobs/", "/healthz/", "/v1/jobs/{id}/", "/v1/jobs/{id}/poll/", "/v1/jobs/{id}/x"])
def test_hotPaths_whenTrailingSlashOrUnknownTail_then404WithoutRedirect(client: httpx.Client, path: str) -> None:
    job = create_job(client)
    response = client.get(path.replace("{id}", job["id"]), headers=ALICE)
    assert response.status_code == 404
    assert "location" not in response.headers


@pytest.mark.parametrize("suffix", ["", "/poll", "/events"])
def test_hotPaths_whenAnswered_thenRequestIdOnResponse(client: httpx.Client, suffix: str) -> None:
    job = create_job(client)
    append(client, job, [{"type": "result", "data": {}}])  # ended: its event stream ends too
    path = f"/v1/jobs/{job['id']}{suffix}"
    given = client.get(path, headers={**ALICE, "X-Request-ID": "given-1"}, params={"wait": 0} if suffix else {})
    assert given.headers["x-request-id"] == "given-1"
    refused = client.get(path)  # 401, from the same exception handlers
    assert refused.status_code == 401
    assert refused.headers["x-request-id"]
    assert (
        client.post("/v1/jobs", json={"type": "external"}, headers={**ALICE, "X-Request-ID": "c-2"}).headers[
            "x-request-id"
        ]
        == "c-2"
    )


def test_statusPath_whenStoreFailsUnexpectedly_then500ProblemWithRequestId(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = create_job(client)

    async def explode(self: JobStore, job_id: str) -> None:
        raise RuntimeError("password=hunter2")

    monkeypatch.setattr(JobStore, "get", explode)
    response = client.get(f"/v1/jobs/{job['id']}", headers={**ALICE, "X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert "hunter2" not in response.text


def test_eventsPath_whileTheResponseRuns_thenTheRequestIsNotKeptAlive(monkeypatch: pytest.MonkeyPatch) -> None:
    """An event stream's response runs for hours: the request (its parsed query, a read token
    among it) must not stay referenced meanwhile."""
    refs: list[weakref.ref[Request]] = []
    alive_during_response: list[bool] = []

    class Probe(Response):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            gc.collect()
            alive_during_response.append(refs[0]() is not None)
            await super().__call__(scope, receive, send)

    async def endpoint(request: Request) -> Response:
        assert request.query_params["token"] == "t"  # parsed, and cached on the request
        refs.append(weakref.ref(request))
        return Probe(status_code=204)

    monkeypatch.setattr(hotpath, "stream_events", endpoint)
    assert _get(JOB_EVENTS + "?token=t").status_code == 204
    assert alive_during_response == [False]
