"""The demo page and jobstream.js in real headless Chromium, against a real gateway, worker and Redis.

Debian's ``chromium`` must be installed (``.ci/run`` installs it): without it these tests fail,
they never skip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from jobstream.demo import story_text
from tests.browser_helpers import requests_to, set_visibility
from tests.conftest import ALICE, LiveStack, append, create_job

pytest_plugins = ["tests.browser_fixtures"]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def start_story(page: Page, stack: LiveStack, *, words: int, delay_ms: int, transport: str = "auto") -> str:
    page.goto(stack.base_url + "/")
    page.get_by_label("Words").fill(str(words))
    page.get_by_label("Delay per word (ms)").fill(str(delay_ms))
    page.get_by_label("Transport").select_option(transport)
    page.get_by_role("button", name="Start a story").click()
    expect(page.locator("#job-id")).not_to_have_text("–")
    return page.locator("#job-id").inner_text()


def wait_for_words(page: Page, count: int) -> None:
    page.wait_for_function("n => document.getElementById('text').textContent.split(' ').length >= n", arg=count)


def expect_finished(page: Page, job_id: str, words: int, status: str = "completed") -> None:
    expect(page.locator("#status")).to_have_text(status)
    assert page.locator("#text").inner_text() == story_text(job_id, words)


def test_story_whenFollowedOverSse_thenWholeTextStatusAndProgress(page: Page, dev_stack: LiveStack) -> None:
    everything = requests_to(page, "")
    job_id = start_story(page, dev_stack, words=30, delay_ms=20, transport="sse")
    expect_finished(page, job_id, 30)
    assert all(url.startswith(dev_stack.base_url + "/") for url in everything)  # no CDN: works offline
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # fits a phone
    expect(page.locator("#transport-used")).to_have_text("sse")
    assert page.locator("#progress").get_attribute("value") == "100"
    assert page.locator("#key-field").is_hidden()  # the dev key came from /dev.json
    expect(page.get_by_role("button", name="Cancel job")).to_be_disabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-finished.png"), full_page=True)


def test_story_whenFollowedByPolling_thenWholeText(page: Page, dev_stack: LiveStack) -> None:
    polls = requests_to(page, "/poll")
    job_id = start_story(page, dev_stack, words=25, delay_ms=20, transport="poll")
    expect_finished(page, job_id, 25)
    expect(page.locator("#transport-used")).to_have_text("poll")
    assert polls and all("wait=25" in url for url in polls)


def test_auto_whenEventSourceMissing_thenFallsBackToPolling(page: Page, dev_stack: LiveStack) -> None:
    page.add_init_script("delete window.EventSource;")
    events = requests_to(page, "/events")
    job_id = start_story(page, dev_stack, words=20, delay_ms=20, transport="auto")
    expect_finished(page, job_id, 20)
    expect(page.locator("#transport-used")).to_have_text("poll (EventSource is not available)")
    assert events == []


def test_auto_whenSseBlockedBeforeAnyEvent_thenFallsBackToPolling(page: Page, dev_stack: LiveStack) -> None:
    # A proxy that refuses event streams: every /events request fails at the network level.
    page.route("**/events?*", lambda route: route.abort())
    job_id = start_story(page, dev_stack, words=20, delay_ms=20, transport="auto")
    expect_finished(page, job_id, 20)
    expect(page.locator("#transport-used")).to_contain_text("poll (server-sent events failed")


def test_reload_whenMidStream_thenContinuesWithTextIntact(page: Page, dev_stack: LiveStack) -> None:
    job_id = start_story(page, dev_stack, words=80, delay_ms=40, transport="sse")
    wait_for_words(page, 15)
    page.reload()
    wait_for_words(page, 15)  # restored at once from the tab's session
    expect_finished(page, job_id, 80)
    page.reload()  # after the end: the finished text, and no request replays it
    expect_finished(page, job_id, 80)


def test_reload_whenPolling_thenContinuesWithTextIntact(page: Page, dev_stack: LiveStack) -> None:
    job_id = start_story(page, dev_stack, words=60, delay_ms=40, transport="poll")
    wait_for_words(page, 10)
    page.reload()
    expect_finished(page, job_id, 60)


def test_offline_whenNetworkDropsMidStream_thenResumesWithNothingLost(
    context: BrowserContext, page: Page, dev_stack: LiveStack
) -> None:
    streams = requests_to(page, "/events")
    job_id = start_story(page, dev_stack, words=80, delay_ms=40, transport="sse")
    wait_for_words(page, 10)
    context.set_offline(True)
    time.sleep(1.5)
    context.set_offline(False)
    expect_finished(page, job_id, 80)
    assert len(streams) >= 2  # it did reconnect


def test_cutConnection_whenClicked_thenResumesAfterTwoSeconds(page: Page, dev_stack: LiveStack) -> None:
    job_id = start_story(page, dev_stack, words=80, delay_ms=30, transport="sse")
    wait_for_words(page, 10)
    page.get_by_role("button", name="Cut connection").click()
    expect(page.locator("#status")).to_have_text("offline")
    expect_finished(page, job_id, 80)


def test_switchTransport_whenMidStream_thenNoWordLostOrRepeated(page: Page, dev_stack: LiveStack) -> None:
    job_id = start_story(page, dev_stack, words=80, delay_ms=30, transport="sse")
    wait_for_words(page, 10)
    page.get_by_label("Transport").select_option("poll")
    expect(page.locator("#transport-used")).to_have_text("poll")
    wait_for_words(page, 40)
    page.get_by_label("Transport").select_option("sse")
    expect_finished(page, job_id, 80)


def test_cancel_whenClicked_thenJobEndsCancelled(page: Page, dev_stack: LiveStack) -> None:
    start_story(page, dev_stack, words=500, delay_ms=30, transport="sse")
    wait_for_words(page, 5)
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#status")).to_have_text("cancelled")
    assert page.locator("#text").inner_text().count(" ") < 499


def test_hiddenTab_whenPolling_thenPollsPauseUntilVisible(page: Page, dev_stack: LiveStack) -> None:
    job_id = start_story(page, dev_stack, words=80, delay_ms=40, transport="poll")
    wait_for_words(page, 5)
    set_visibility(page, "hidden")
    polls = requests_to(page, "/poll")
    text_when_hidden = page.locator("#text").inner_text()
    time.sleep(1.5)
    assert polls == []
    assert page.locator("#text").inner_text() == text_when_hidden
    set_visibility(page, "visible")
    expect_finished(page, job_id, 80)
    assert polls


@pytest.mark.parametrize("tab_had_token", [True, False])
def test_expiredJob_whenOpenedByLink_thenClearErrorAndNoRetryLoop(
    page: Page, dev_stack: LiveStack, client_for: Callable[[LiveStack], httpx.Client], tab_had_token: bool
) -> None:
    http = client_for(dev_stack)
    job = http.post("/v1/jobs", json={"type": "external"}, headers=ALICE).json()
    assert http.delete(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 204
    page.goto(dev_stack.base_url + "/")
    if tab_had_token:  # the tab had been following it: its token is still in the tab's session
        page.evaluate("job => sessionStorage.setItem(`jobstream-demo:job:${job.id}`, JSON.stringify(job))", job)
    tokens = requests_to(page, "/v1/read-tokens")
    reads = requests_to(page, f"/v1/jobs/{job['id']}/")
    page.goto(f"{dev_stack.base_url}/?reopen#job={job['id']}")  # a new document, not a hash change
    expect(page.locator("#status")).to_have_text("expired")
    expect(page.get_by_role("alert")).to_have_text("This job does not exist or has expired.")
    expect(page.get_by_role("button", name="Cancel job")).to_be_disabled()
    time.sleep(2)
    if tab_had_token:
        assert tokens == [] and len(reads) <= 2  # one event stream attempt and one poll that says 404
    else:
        assert len(tokens) == 1 and reads == []  # a token asked for (404), and no reading begun


def test_client_whenCredentialRefused_thenOneErrorNoHammering(page: Page, dev_stack: LiveStack) -> None:
    page.goto(dev_stack.base_url + "/")
    reads = requests_to(page, "/v1/jobs/")
    outcome: Any = page.evaluate(
        """async () => {
            const { followJob } = await import("/static/jobstream.js");
            const id = "6f1c1f4e-4b8f-4c39-9a2e-1c2d3e4f5a6b";
            return await new Promise((resolve) => {
                const onError = (e) => resolve({ kind: e.kind, status: e.status });
                followJob({ id, token: "not-a-token" }, { onError });
            });
        }"""
    )
    assert outcome == {"kind": "unauthorized", "status": 401}
    time.sleep(1)
    assert len(reads) <= 2


def test_keyField_whenNotDevMode_thenAskedForAndUsed(page: Page, make_stack: Callable[..., LiveStack]) -> None:
    stack = make_stack(demo=True)  # not `jobstream dev`, but the demo job types on (JOBSTREAM_DEMO=1)
    page.goto(stack.base_url + "/")
    key = page.get_by_label("API key")
    expect(key).to_be_visible()
    page.get_by_label("Words").fill("5")
    page.get_by_label("Delay per word (ms)").fill("0")
    page.get_by_role("button", name="Start a story").click()
    expect(page.get_by_role("alert")).to_have_text("Enter an API key first.")
    key.fill("key-alice")
    page.get_by_role("button", name="Start a story").click()
    expect(page.locator("#status")).to_have_text("completed")
    job_id = page.locator("#job-id").inner_text()
    reopen = page.get_by_role("button", name="Reopen")
    expect(reopen).to_have_count(1)
    page.evaluate("document.getElementById('text').textContent = ''")
    reopen.click()  # replays the finished job from its first event
    expect_finished(page, job_id, 5)


# ---- jobstream.js on its own, driven from the page

START_FOLLOW = """([job, options]) => import("/static/jobstream.js").then(({ followJob }) => {
    const seen = { events: [], truncated: [], transports: [], done: null, error: null };
    const end = () => { window.followResult = seen; };
    followJob(job, { ...options,
        onEvent: (e) => seen.events.push(e),
        onTruncated: (firstId) => seen.truncated.push(firstId),
        onTransport: (name) => seen.transports.push(name),
        onDone: (status) => { seen.done = status; end(); },
        onError: (e) => { seen.error = { kind: e.kind, status: e.status }; end(); },
    });
})"""


def follow_in_page(page: Page, job: dict[str, Any], **options: Any) -> None:
    page.evaluate(START_FOLLOW, [job, {"resume": False, **options}])


def follow_result(page: Page) -> dict[str, Any]:
    page.wait_for_function("() => window.followResult !== undefined")
    result: dict[str, Any] = page.evaluate("() => window.followResult")
    return result


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_client_whenResumeIdWasTrimmed_thenTruncatedThenTheRest(
    page: Page, make_stack: Callable[..., LiveStack], transport: str
) -> None:
    stack = make_stack(with_worker=False, stream_maxlen=10)
    with stack.client() as http:
        job = create_job(http)
        ids = append(http, job, [{"type": "delta", "data": {"text": str(i)}} for i in range(400)])
        append(http, job, {"type": "done", "data": {"status": "completed"}})
    page.goto(stack.base_url + "/")
    follow_in_page(page, job, transport=transport, after=ids[0])
    result = follow_result(page)
    assert result["done"] == "completed" and result["error"] is None
    first_kept = result["truncated"][0]
    assert result["truncated"] == [first_kept] and first_kept != ids[1]
    kept = ids.index(first_kept)
    deltas = [e["data"]["text"] for e in result["events"] if e["type"] == "delta"]
    assert deltas == [str(i) for i in range(kept, 400)]
    assert [e["type"] for e in result["events"]][0] == "truncated" and result["events"][-1]["type"] == "done"


def test_client_whenPollsKeepFailing_thenBacksOffAndStopsAfterFive(page: Page, dev_stack: LiveStack) -> None:
    problem = '{"type":"x","title":"Service Unavailable","status":503,"detail":"down"}'
    page.route("**/poll?*", lambda route: route.fulfill(status=503, body=problem, content_type="application/json"))
    polls = requests_to(page, "/poll")
    with dev_stack.client() as http:
        job = create_job(http)
    page.goto(dev_stack.base_url + "/")
    follow_in_page(page, job, transport="poll", backoffS=[0.05, 0.1, 0.2, 0.4])
    assert follow_result(page)["error"] == {"kind": "unavailable", "status": 503}
    time.sleep(0.5)
    assert len(polls) == 5


def test_client_whenSseRefusedWith429_thenPollsInsteadOfReconnecting(
    page: Page, make_stack: Callable[..., LiveStack]
) -> None:
    stack = make_stack(with_worker=False, max_sse_per_token_job=1)
    streams = requests_to(page, "/events")
    with stack.client() as http:
        job = create_job(http)
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", params={"token": job["token"]}) as held:
            assert held.status_code == 200  # alice's one stream slot is taken
            page.goto(stack.base_url + "/")
            follow_in_page(page, job, transport="auto")
            page.wait_for_function("() => document.readyState === 'complete'")
            time.sleep(1)
            append(
                http,
                job,
                [{"type": "delta", "data": {"text": "hi"}}, {"type": "done", "data": {"status": "completed"}}],
            )
            result = follow_result(page)
    assert result["transports"] == ["sse", "poll"]
    assert [e["type"] for e in result["events"]] == ["status", "delta", "done"]
    assert len(streams) == 1
