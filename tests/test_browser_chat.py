"""The demo page's chat in real headless Chromium: /static/ai-sdk.js's JobstreamChatTransport
driven without a framework (static/demo-chat.js), against `jobstream dev`'s /dev/chat routes, a
real gateway, worker and Redis.

Debian's ``chromium`` must be installed: without it these tests fail, they never skip.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
from playwright.sync_api import Locator, Page, expect

from tests.conftest import ALICE, LiveStack
from tests.helpers import wait_until

pytest_plugins = ["tests.browser_fixtures"]

#: A message whose reply takes seconds: demo.chat writes a word per 20 ms and more.
LONG_MESSAGE = " ".join(f"word{index}" for index in range(200))
REPLY = "#chat-log li[data-role=assistant]"


def open_demo(page: Page, stack: LiveStack) -> str:
    """The demo page, ready to chat; the id of its chat."""
    page.goto(stack.base_url + "/")
    expect(page.locator("#chat-id")).not_to_have_text("–")
    return page.locator("#chat-id").inner_text()


def send(page: Page, text: str) -> None:
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_role("button", name="Send", exact=True).click()


def reply_text(page: Page) -> Locator:
    return page.locator(f"{REPLY} .chat-text")


def wait_for_words(page: Page, count: int) -> None:
    page.wait_for_function(
        "([selector, n]) => (document.querySelector(selector)?.textContent ?? '').split(' ').length >= n",
        arg=[f"{REPLY} .chat-text", count],
    )


def chat_jobs(stack: LiveStack, chat_id: str) -> list[dict[str, Any]]:
    with stack.client() as http:
        answer = http.get("/v1/jobs", params={"tag": f"chat:{chat_id}"}, headers=ALICE)
    assert answer.status_code == 200, answer.text
    jobs: list[dict[str, Any]] = answer.json()["jobs"]
    return jobs


def status(stack: LiveStack, job_id: str) -> str:
    with stack.client() as http:
        found: str = http.get(f"/v1/jobs/{job_id}", headers=ALICE).json()["status"]
    return found


def test_chat_whenSent_thenTheWholeReplyAppears(page: Page, dev_stack: LiveStack, page_errors: list[str]) -> None:
    chat_id = open_demo(page, dev_stack)
    send(page, "hello from the demo page")
    expect(page.locator("#chat-log li[data-role=user] .chat-text")).to_have_text("hello from the demo page")
    expect(reply_text(page)).to_have_text("You said: hello from the demo page")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    expect(page.locator("#chat-stop")).to_be_disabled()
    [job] = chat_jobs(dev_stack, chat_id)
    assert job["type"] == "demo.chat" and job["status"] == "completed"

    # A second message: the whole conversation goes with it, and the reply answers the last one.
    send(page, "and again")
    expect(reply_text(page)).to_have_text(["You said: hello from the demo page", "You said: and again"])
    assert len(chat_jobs(dev_stack, chat_id)) == 2


def test_chat_whenStopped_thenTheJobIsCancelledAndTheReplyStops(
    page: Page, dev_stack: LiveStack, page_errors: list[str]
) -> None:
    chat_id = open_demo(page, dev_stack)
    send(page, LONG_MESSAGE)
    wait_for_words(page, 10)
    page.locator("#chat-stop").click()
    expect(page.locator(f"{REPLY} .chat-end")).to_have_text("stopped")
    shown = reply_text(page).inner_text()
    [job] = chat_jobs(dev_stack, chat_id)
    wait_until(lambda: status(dev_stack, job["id"]) == "cancelled", message="the job was never cancelled")
    with dev_stack.client() as http:
        written = http.get(f"/v1/jobs/{job['id']}", params={"include": "output"}, headers=ALICE).json()["output"]
    # Ended: nothing more is written, and the page shows no more than when it stopped reading.
    assert reply_text(page).inner_text() == shown
    assert shown.startswith("You said: word0") and written["text"].startswith(shown)
    assert len(written["text"]) < len(f"You said: {LONG_MESSAGE}")
    expect(page.locator(f"{REPLY} .chat-text")).not_to_have_class("chat-text streaming")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()


def test_chat_whenReloadedMidReply_thenTheReplyResumesToItsEnd(
    page: Page, dev_stack: LiveStack, page_errors: list[str]
) -> None:
    chat_id = open_demo(page, dev_stack)
    send(page, LONG_MESSAGE)
    wait_for_words(page, 10)
    [job] = chat_jobs(dev_stack, chat_id)
    with page.expect_response(lambda response: response.url.endswith(f"/dev/chat/{chat_id}/job")):
        page.reload()
    assert status(dev_stack, job["id"]) == "running", "the reply ended before the page came back"
    assert page.locator("#chat-id").inner_text() == chat_id
    expect(page.locator("#chat-log li[data-role=user] .chat-text")).to_have_text(LONG_MESSAGE)
    expect(reply_text(page)).to_have_text(f"You said: {LONG_MESSAGE}")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    assert [found["id"] for found in chat_jobs(dev_stack, chat_id)] == [job["id"]]


def test_chat_whenNewChat_thenAnotherChatId(page: Page, dev_stack: LiveStack, page_errors: list[str]) -> None:
    first = open_demo(page, dev_stack)
    send(page, "one")
    expect(reply_text(page)).to_have_text("You said: one")
    page.get_by_role("button", name="New chat").click()
    expect(page.locator("#chat-log li")).to_have_count(0)
    expect(page.locator("#chat-id")).not_to_have_text(first)


def test_chat_whenNotDevMode_thenDisabledWithANote(page: Page, make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(demo=True)
    page.goto(stack.base_url + "/")
    expect(page.locator("#chat-note")).to_contain_text("jobstream dev")
    expect(page.get_by_label("Message", exact=True)).to_be_disabled()
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_disabled()
    with httpx.Client(base_url=stack.base_url) as http:
        assert http.post("/dev/chat", json={"id": "c", "messages": []}, headers=ALICE).status_code == 404


def test_chat_whenTheReplyFails_thenItsErrorTextIsShown(
    page: Page, dev_stack: LiveStack, page_errors: list[str]
) -> None:
    # The gateway's rendering of a job that failed after some text (uimessage.py), as the page reads it.
    frames = [
        {"type": "start", "messageId": "j1"},
        {"type": "text-start", "id": "text-1"},
        {"type": "text-delta", "id": "text-1", "delta": "You said"},
        {"type": "text-end", "id": "text-1"},
        {"type": "error", "errorText": "The model went away."},
        {"type": "finish", "finishReason": "error"},
    ]
    body = "".join(f"data: {json.dumps(frame)}\n\n" for frame in frames) + "data: [DONE]\n\n"
    page.route(
        "**/events?format=ui-message-stream",
        lambda route: route.fulfill(status=200, body=body, headers={"Content-Type": "text/event-stream"}),
    )
    open_demo(page, dev_stack)
    send(page, "hello")
    expect(page.locator(f"{REPLY} .chat-end.failure")).to_have_text("The model went away.")
    expect(reply_text(page)).to_have_text("You said")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
