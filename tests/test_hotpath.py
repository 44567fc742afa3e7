"""The events route served in front of the router answers exactly as the router would."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from jobstream.app import create_app
from jobstream.registry import Registry
from jobstream.routes import hotpath
from tests.conftest import make_settings

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
