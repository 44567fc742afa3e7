"""The README's `useChat` example in real headless Chromium: its React page bundled with the real
`ai` and `@ai-sdk/react` packages and /static/ai-sdk.js, served beside its three FastAPI routes
(both README blocks as written), against a real gateway, worker and Redis. The page reads the
gateway cross-origin, as an app on its own origin would.

Debian's ``chromium`` and the npm packages of tests/js (`make test` installs them) must be
there: without them these tests fail, they never skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from playwright.sync_api import Page, expect
from starlette.responses import Response

from jobstream.devredis import free_port
from tests.ai_sdk_page import PAGE, SECTION, AppServer, HeldAnswers, bundle_chat_page
from tests.conftest import ALICE, LiveStack
from tests.helpers import load_module, readme_block, wait_until

pytest_plugins = ["tests.browser_fixtures"]

#: The page's one reply: demo.chat answers the last user message.
ASSISTANT = "p.assistant"
#: A message whose reply takes seconds: demo.chat writes a word per 20 ms and more.
LONG_MESSAGE = " ".join(f"word{index}" for index in range(200))


@dataclass
class ChatApp:
    """The README's app (its page and routes) at ``url``, and the gateway and worker behind it."""

    url: str
    stack: LiveStack
    #: Holds the answers of POST /api/chat while cleared.
    create_answers: HeldAnswers

    def jobs(self, chat_id: str) -> list[dict[str, Any]]:
        """The chat's jobs, newest first, as the gateway lists them."""
        with self.stack.client() as http:
            answer = http.get("/v1/jobs", params={"tag": f"chat:{chat_id}"}, headers=ALICE)
        assert answer.status_code == 200, answer.text
        listed: list[dict[str, Any]] = answer.json()["jobs"]
        return listed

    def only_job(self, chat_id: str) -> dict[str, Any]:
        jobs = self.jobs(chat_id)
        assert len(jobs) == 1, jobs
        return jobs[0]

    def status(self, job_id: str) -> str:
        with self.stack.client() as http:
            answer = http.get(f"/v1/jobs/{job_id}", headers=ALICE)
        assert answer.status_code == 200, answer.text
        status: str = answer.json()["status"]
        return status


@pytest.fixture
def chat_app(
    make_stack: Callable[..., LiveStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ChatApp]:
    port = free_port()
    stack = make_stack(demo=True, cors_origins=[f"http://127.0.0.1:{port}"])
    monkeypatch.setenv("JOBSTREAM_URL", stack.base_url)
    monkeypatch.setenv("JOBSTREAM_API_KEY", "key-alice")
    routes = load_module("readme_chat_routes", readme_block(SECTION), tmp_path)
    bundle = bundle_chat_page(tmp_path, stack.base_url).read_bytes()
    app: FastAPI = routes.app

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/bundle.js")
    async def script() -> Response:
        return Response(bundle, media_type="text/javascript")

    held = HeldAnswers(app, "/api/chat")
    server = AppServer(held, port, on_exit=routes.jobs.aclose).start()
    yield ChatApp(server.base_url, stack, held)
    held.release.set()
    server.stop()


def open_chat(page: Page, app: ChatApp, chat_id: str, *, reload: bool = False) -> None:
    """Load (or reload) the chat, and wait for useChat's look for a reply to resume (`resume: true`)."""
    with page.expect_response(lambda response: response.url.endswith(f"/api/chat/{chat_id}/job")):
        if reload:
            page.reload()
        else:
            page.goto(f"{app.url}/?chat={chat_id}")


def send(page: Page, text: str) -> None:
    page.get_by_placeholder("Say something").fill(text)
    page.get_by_role("button", name="Send").click()


def wait_for_words(page: Page, count: int) -> None:
    page.wait_for_function(
        "([selector, n]) => (document.querySelector(selector)?.textContent ?? '').split(' ').length >= n",
        arg=[ASSISTANT, count],
    )


def assistant_text(page: Page) -> str:
    return page.locator(ASSISTANT).inner_text()


def test_useChat_whenSent_thenTheWholeReplyAppears(page: Page, chat_app: ChatApp, page_errors: list[str]) -> None:
    chat_id = f"c{uuid.uuid4().hex[:12]}"
    open_chat(page, chat_app, chat_id)
    send(page, "hello from the browser")
    expect(page.locator("p.user")).to_have_text("hello from the browser")
    expect(page.locator(ASSISTANT)).to_have_text("You said: hello from the browser")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert chat_app.only_job(chat_id)["status"] == "completed"


def test_useChat_whenReloadedMidReply_thenTheReplyResumesToItsEnd(
    page: Page, chat_app: ChatApp, page_errors: list[str]
) -> None:
    chat_id = f"c{uuid.uuid4().hex[:12]}"
    open_chat(page, chat_app, chat_id)
    send(page, LONG_MESSAGE)
    wait_for_words(page, 10)
    job = chat_app.only_job(chat_id)
    open_chat(page, chat_app, chat_id, reload=True)  # the reply is still being written
    assert chat_app.status(job["id"]) == "running", "the reply ended before the page came back"
    # The app keeps no messages: what comes back is the reply, read again from the job's start.
    expect(page.locator(ASSISTANT)).to_have_text(f"You said: {LONG_MESSAGE}")
    expect(page.locator(ASSISTANT)).to_have_count(1)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert chat_app.only_job(chat_id)["status"] == "completed"


def test_useChat_whenStopped_thenTheJobIsCancelledAndThePageStopsGrowing(
    page: Page, chat_app: ChatApp, page_errors: list[str]
) -> None:
    chat_id = f"c{uuid.uuid4().hex[:12]}"
    open_chat(page, chat_app, chat_id)
    send(page, LONG_MESSAGE)
    wait_for_words(page, 10)
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    shown = assistant_text(page)
    job = chat_app.only_job(chat_id)
    wait_until(lambda: chat_app.status(job["id"]) == "cancelled", message="the job was never cancelled")
    # Ended: nothing more is written, and the page shows no more than when it stopped reading.
    with chat_app.stack.client() as http:
        output = http.get(f"/v1/jobs/{job['id']}", params={"include": "output"}, headers=ALICE).json()["output"]
    assert assistant_text(page) == shown
    assert shown.startswith("You said: word0") and output["text"].startswith(shown)
    assert len(output["text"]) < len(f"You said: {LONG_MESSAGE}")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def test_useChat_whenAResumedReplyIsStopped_thenTheJobIsCancelled(
    page: Page, chat_app: ChatApp, page_errors: list[str]
) -> None:
    chat_id = f"c{uuid.uuid4().hex[:12]}"
    open_chat(page, chat_app, chat_id)
    send(page, LONG_MESSAGE)
    wait_for_words(page, 10)
    open_chat(page, chat_app, chat_id, reload=True)
    wait_for_words(page, 20)
    page.get_by_role("button", name="Stop").click()
    job = chat_app.only_job(chat_id)
    wait_until(lambda: chat_app.status(job["id"]) == "cancelled", message="the job was never cancelled")
    assert f"You said: {LONG_MESSAGE}".startswith(assistant_text(page))
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def test_useChat_whenStoppedBeforeTheAppAnswered_thenTheJobItStartedIsCancelled(
    page: Page, chat_app: ChatApp, page_errors: list[str]
) -> None:
    chat_id = f"c{uuid.uuid4().hex[:12]}"
    open_chat(page, chat_app, chat_id)
    chat_app.create_answers.release.clear()
    send(page, LONG_MESSAGE)
    job = wait_until(lambda: chat_app.jobs(chat_id), message="the app never started the reply")[0]
    page.get_by_role("button", name="Stop").click()  # the app has started the job, not yet answered
    chat_app.create_answers.release.set()
    wait_until(lambda: chat_app.status(job["id"]) == "cancelled", message="the job was never cancelled")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.locator(ASSISTANT)).to_have_count(0)


def test_readmeChatRoutes_whenNoReplyYet_thenNoJobAndCancelIsQuiet(chat_app: ChatApp) -> None:
    with httpx.Client(base_url=chat_app.url, timeout=15) as app:
        assert app.get("/api/chat/nothing-here/job").status_code == 204
        assert app.post("/api/chat/nothing-here/cancel").status_code == 204
