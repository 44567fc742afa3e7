"""The demo page's chat routes (/dev/chat, routes/devchat.py) over HTTP: served only by a gateway
with `jobstream dev`'s key, for the caller's own jobs, every bad request a problem, never a 500."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ALICE, BOB, LiveStack
from tests.helpers import assert_problem, wait_until

CHAT = "/dev/chat"


def user_message(text: str) -> dict[str, Any]:
    return {"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}


def chat_body(chat_id: str, text: str, **extra: Any) -> dict[str, Any]:
    """What JobstreamChatTransport POSTs."""
    return {"id": chat_id, "messages": [user_message(text)], "trigger": "submit-message", "messageId": None, **extra}


@pytest.fixture
def dev(make_stack: Callable[..., LiveStack]) -> Iterator[httpx.Client]:
    """A client of a gateway and worker run as `jobstream dev` runs them (alice's key is the dev key)."""
    with make_stack(dev_key="key-alice", demo=True).client() as http:
        yield http


def status(http: httpx.Client, job_id: str) -> str:
    found: str = http.get(f"/v1/jobs/{job_id}", headers=ALICE).json()["status"]
    return found


def test_devChat_whenNotDev_then404LikeAnUnknownPath(demo_client: httpx.Client) -> None:
    assert_problem(demo_client.post(CHAT, json=chat_body("c1", "hi"), headers=ALICE), 404)
    assert_problem(demo_client.get(f"{CHAT}/c1/job", headers=ALICE), 404)
    assert_problem(demo_client.post(f"{CHAT}/c1/cancel", headers=ALICE), 404)
    assert demo_client.get("/v1/jobs", headers=ALICE).json()["jobs"] == []


def test_devChat_whenSent_thenADemoChatJobOfTheCallersTaggedWithTheChat(dev: httpx.Client) -> None:
    created = dev.post(CHAT, json=chat_body("chat-1", "hello there", extra="ignored"), headers=ALICE)
    assert created.status_code == 201, created.text
    job = created.json()
    assert {"id", "token", "links", "status"} <= job.keys()
    assert created.headers["location"] == f"/v1/jobs/{job['id']}"
    wait_until(lambda: status(dev, job["id"]) == "completed", message="the reply never completed")
    read = dev.get(
        f"/v1/jobs/{job['id']}", params={"include": "output"}, headers={"Authorization": f"Bearer {job['token']}"}
    )
    assert read.json()["output"]["text"] == "You said: hello there"
    assert read.json()["type"] == "demo.chat" and read.json()["tags"] == ["chat:chat-1"]
    # The caller's job, not another user's.
    assert [
        listed["id"] for listed in dev.get("/v1/jobs", params={"tag": "chat:chat-1"}, headers=ALICE).json()["jobs"]
    ] == [job["id"]]
    assert dev.get("/v1/jobs", headers=BOB).json()["jobs"] == []


def test_devChat_whenAskedForTheLatestJob_thenItWithAReadTokenElse204(dev: httpx.Client) -> None:
    assert dev.get(f"{CHAT}/chat-2/job", headers=ALICE).status_code == 204
    first = dev.post(CHAT, json=chat_body("chat-2", "one"), headers=ALICE).json()
    latest = dev.post(CHAT, json=chat_body("chat-2", "two"), headers=ALICE).json()
    answer = dev.get(f"{CHAT}/chat-2/job", headers=ALICE)
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["id"] == latest["id"] != first["id"]
    assert body["links"]["events"] == f"/v1/jobs/{latest['id']}/events"
    as_reader = dev.get(f"/v1/jobs/{latest['id']}", headers={"Authorization": f"Bearer {body['token']}"})
    assert as_reader.status_code == 200
    # Another user's chat of the same id is not theirs.
    assert dev.get(f"{CHAT}/chat-2/job", headers=BOB).status_code == 204


def test_devChat_whenCancelled_thenTheRunningReplyEndsCancelled(dev: httpx.Client) -> None:
    long = " ".join(["word"] * 500)
    job = dev.post(CHAT, json=chat_body("chat-3", long), headers=ALICE).json()
    wait_until(lambda: status(dev, job["id"]) == "running", message="the reply never started")
    assert dev.post(f"{CHAT}/chat-3/cancel", headers=BOB).status_code == 204  # bob's chat-3 has none
    assert status(dev, job["id"]) == "running"
    assert dev.post(f"{CHAT}/chat-3/cancel", headers=ALICE).status_code == 204
    wait_until(lambda: status(dev, job["id"]) == "cancelled", message="the reply was never cancelled")
    # Nothing left to cancel, and an ended reply stays as it ended.
    assert dev.post(f"{CHAT}/chat-3/cancel", headers=ALICE).status_code == 204
    assert dev.post(f"{CHAT}/nothing-yet/cancel", headers=ALICE).status_code == 204
    assert status(dev, job["id"]) == "cancelled"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"id": "c1"},
        {"messages": []},
        {"id": "", "messages": []},
        {"id": "-starts-with-a-dash", "messages": []},
        {"id": "has space", "messages": []},
        {"id": "x" * 124, "messages": []},
        {"id": 7, "messages": []},
        {"id": "c1", "messages": "hello"},
        {"id": "c1", "messages": ["hello"]},
        {"id": "c1", "messages": [{}] * 1001},
        [],
        "text",
        None,
    ],
)
def test_devChat_whenBodyInvalid_then422(dev: httpx.Client, body: Any) -> None:
    problem = assert_problem(dev.post(CHAT, json=body, headers=ALICE), 422)
    assert problem["errors"]
    assert dev.get("/v1/jobs", headers=ALICE).json()["jobs"] == []


def test_devChat_whenNotJsonOrNoCredential_thenProblems(dev: httpx.Client) -> None:
    assert_problem(dev.post(CHAT, content=b"{not json", headers={**ALICE, "Content-Type": "application/json"}), 422)
    assert_problem(dev.post(CHAT, content=b"id=c1", headers={**ALICE, "Content-Type": "text/plain"}), 415)
    assert_problem(dev.post(CHAT, json=chat_body("c1", "x" * 70_000), headers=ALICE), 413)
    for method, path in (("POST", CHAT), ("GET", f"{CHAT}/c1/job"), ("POST", f"{CHAT}/c1/cancel")):
        for headers in ({}, {"Authorization": "Bearer nope"}):
            assert_problem(dev.request(method, path, json=chat_body("c1", "hi"), headers=headers), 401)


def test_devChat_whenReadToken_then403(dev: httpx.Client) -> None:
    job = dev.post(CHAT, json=chat_body("c4", "hi"), headers=ALICE).json()
    reader = {"Authorization": f"Bearer {job['token']}"}
    assert_problem(dev.post(CHAT, json=chat_body("c4", "again"), headers=reader), 403)
    assert_problem(dev.get(f"{CHAT}/c4/job", headers=reader), 403)
    assert_problem(dev.post(f"{CHAT}/c4/cancel", headers=reader), 403)


@pytest.mark.parametrize("chat_id", ["-x", "a b", "x" * 124, "%00", "é"])
def test_devChat_whenPathChatIdCannotBeOne_then404(dev: httpx.Client, chat_id: str) -> None:
    assert_problem(dev.get(f"{CHAT}/{chat_id}/job", headers=ALICE), 404)
    assert_problem(dev.post(f"{CHAT}/{chat_id}/cancel", headers=ALICE), 404)


def test_devChat_whenDemoTypesOff_then422NotA500(make_stack: Callable[..., LiveStack]) -> None:
    with make_stack(dev_key="key-alice", demo=False, with_worker=False).client() as http:
        problem = assert_problem(http.post(CHAT, json=chat_body("c5", "hi"), headers=ALICE), 422)
        errors = problem["errors"]
        assert isinstance(errors, list) and [error["loc"] for error in errors] == [["type"]]
