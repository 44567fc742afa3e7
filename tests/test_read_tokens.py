"""`POST /v1/read-tokens` (API.md 1.1): a read token for several of the caller's jobs, or for a
tag (present and future jobs), with an expiry; it reads those jobs and nothing else."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import ALICE, BOB, append, create_job
from tests.helpers import assert_problem, wait_until

pytestmark = pytest.mark.on_cluster


def _issue(http: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = http.post("/v1/read-tokens", json=body, headers=headers or ALICE)
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


def _reads(http: httpx.Client, job: dict[str, Any], token: str) -> dict[str, int]:
    """What the token gets from each of a job's read endpoints."""
    url = f"/v1/jobs/{job['id']}"
    bearer = {"Authorization": f"Bearer {token}"}
    return {
        "status": http.get(url, params={"token": token}).status_code,
        "status_header": http.get(url, headers=bearer).status_code,
        "poll": http.get(f"{url}/poll", params={"token": token}).status_code,
        "events": http.get(f"{url}/events", params={"token": token}).status_code,
    }


def _ended(http: httpx.Client, job: dict[str, Any]) -> None:
    # Ended, so that its event stream answers and closes instead of following it.
    append(http, job, {"type": "result", "data": {}})


def test_jobsToken_whenIssued_thenReadsEveryListedJobAndNothingElse(gateway: httpx.Client) -> None:
    listed = [create_job(gateway) for _ in range(3)]
    other = create_job(gateway)
    for job in [*listed, other]:
        _ended(gateway, job)
    issued = _issue(gateway, {"jobs": [job["id"] for job in listed], "ttl": 60})
    for job in listed:
        assert _reads(gateway, job, issued["token"]) == {
            "status": 200,
            "status_header": 200,
            "poll": 200,
            "events": 200,
        }
    assert set(_reads(gateway, other, issued["token"]).values()) == {403}
    expires = datetime.fromisoformat(issued["expires_at"].replace("Z", "+00:00")).timestamp()
    assert time.time() + 55 < expires <= time.time() + 61


def test_tagToken_whenJobsCarryTheTag_thenReadsThemPresentAndFuture(gateway: httpx.Client) -> None:
    before = create_job(gateway, tags=["chat:42"])
    untagged = create_job(gateway, tags=["chat:7"])
    issued = _issue(gateway, {"tag": "chat:42"})
    after = create_job(gateway, tags=["other", "chat:42"])
    for job in (before, untagged, after):
        _ended(gateway, job)
    assert set(_reads(gateway, before, issued["token"]).values()) == {200}
    assert set(_reads(gateway, after, issued["token"]).values()) == {200}
    assert set(_reads(gateway, untagged, issued["token"]).values()) == {403}
    bobs = create_job(gateway, headers=BOB, tags=["chat:42"])
    assert gateway.get(f"/v1/jobs/{bobs['id']}", params={"token": issued["token"]}).status_code == 403


def test_scopedToken_whenUsedToWrite_then403(gateway: httpx.Client) -> None:
    job = create_job(gateway, tags=["t"])
    for issued in (_issue(gateway, {"jobs": [job["id"]]}), _issue(gateway, {"tag": "t"})):
        bearer = {"Authorization": f"Bearer {issued['token']}"}
        url = f"/v1/jobs/{job['id']}"
        assert_problem(gateway.post("/v1/jobs", json={"type": "external"}, headers=bearer), 403)
        assert_problem(gateway.post(f"{url}/cancel", headers=bearer), 403)
        assert_problem(
            gateway.post(f"{url}/events", json={"type": "delta", "data": {"text": "x"}}, headers=bearer), 403
        )
        assert_problem(gateway.delete(url, headers=bearer), 403)
        assert_problem(gateway.get("/v1/jobs", headers=bearer), 403)
        assert_problem(gateway.post("/v1/read-tokens", json={"tag": "t"}, headers=bearer), 403)
    assert gateway.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["status"] == "pending"


def test_scopedToken_whenExpired_then401(gateway: httpx.Client) -> None:
    job = create_job(gateway)
    issued = _issue(gateway, {"jobs": [job["id"]], "ttl": 1})
    url = f"/v1/jobs/{job['id']}"
    assert gateway.get(url, params={"token": issued["token"]}).status_code == 200
    wait_until(lambda: gateway.get(url, params={"token": issued["token"]}).status_code == 401, timeout_s=5)


def test_jobsToken_whenHundredJobs_thenFitsAUrl(gateway: httpx.Client) -> None:
    jobs = [create_job(gateway)["id"] for _ in range(100)]
    token = _issue(gateway, {"jobs": jobs})["token"]
    assert len(token) < 4096  # with the jobs= list of 100 ids, under 8 KiB of URL
    assert gateway.get(f"/v1/jobs/{jobs[57]}", params={"token": token}).status_code == 200


def test_create_whenAJobIsUnknownOrAnotherUsers_then404Or403(gateway: httpx.Client) -> None:
    mine = create_job(gateway)
    bobs = create_job(gateway, headers=BOB)
    unknown = "00000000-0000-4000-8000-000000000000"
    assert_problem(gateway.post("/v1/read-tokens", json={"jobs": [mine["id"], unknown]}, headers=ALICE), 404)
    assert_problem(gateway.post("/v1/read-tokens", json={"jobs": [mine["id"], "not-a-job"]}, headers=ALICE), 404)
    assert_problem(gateway.post("/v1/read-tokens", json={"jobs": [mine["id"], bobs["id"]]}, headers=ALICE), 403)
    assert_problem(gateway.post("/v1/read-tokens", json={"jobs": [mine["id"]]}), 401)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"jobs": ["00000000-0000-4000-8000-000000000000"], "tag": "t"},
        {"jobs": []},
        {"jobs": [f"00000000-0000-4000-8000-{n:012d}" for n in range(101)]},
        {"jobs": "x"},
        {"tag": "bad tag"},
        {"tag": "t", "ttl": 0},
        {"tag": "t", "ttl": 3601},
        {"tag": "t", "ttl": "60"},
        {"tag": "t", "ttl": 1.5},
        {"tag": "t", "extra": 1},
    ],
)
def test_create_whenBodyInvalid_then422(gateway: httpx.Client, body: dict[str, Any]) -> None:
    assert_problem(gateway.post("/v1/read-tokens", json=body, headers=ALICE), 422)


def test_create_whenDuplicatesListed_thenOneTokenCoveringThem(gateway: httpx.Client) -> None:
    job = create_job(gateway)
    token = _issue(gateway, {"jobs": [job["id"], job["id"]]})["token"]
    assert gateway.get(f"/v1/jobs/{job['id']}", params={"token": token}).status_code == 200
