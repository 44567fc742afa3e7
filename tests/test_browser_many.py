"""Many jobs on one connection in real headless Chromium: jobstream.js's followJobs and the demo
page's recent jobs and "all my running jobs" view, against a real gateway, worker and Redis.

Debian's ``chromium`` must be installed: without it these tests fail, they never skip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import Page, expect

from jobstream.demo import story_text
from tests.browser_helpers import STORY_TIMEOUT_MS, requests_to
from tests.conftest import ALICE, BOB, LiveStack, append, create_job

pytest_plugins = ["tests.browser_fixtures"]

MANY_EVENTS = "/v1/events?"
MANY_POLL = "/v1/poll?"
#: A document of the gateway's origin that runs nothing itself, for driving jobstream.js alone.
ORIGIN_PAGE = "/healthz"


def start_stories(http: httpx.Client, count: int, *, words: int, delay_ms: int, tag: str = "demo") -> list[str]:
    """``count`` demo.story jobs of alice's, with ``tag``; their ids."""
    story = {"input": {"words": words, "delay_ms": delay_ms}, "tags": [tag], "metadata": {"words": words}}
    return [create_job(http, "demo.story", **story)["id"] for _ in range(count)]


def read_token(http: httpx.Client, **covered: Any) -> str:
    response = http.post("/v1/read-tokens", json=covered, headers=ALICE)
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


# ---- followJobs driven from the page. What it saw is kept in sessionStorage, as a page keeping
# its own state would, so that a reload continues it.

START_FOLLOW_JOBS = """([selection, options]) => import("/static/jobstream.js").then(({ followJobs }) => {
    const seen = JSON.parse(sessionStorage.getItem("seen") || "null")
        || { events: [], jobsDone: {}, transports: [], done: 0, error: null };
    const save = () => sessionStorage.setItem("seen", JSON.stringify(seen));
    window.seen = seen;
    window.follow = followJobs(selection, { ...options,
        onEvent: (jobId, e) => {
            seen.events.push({ jobId, id: e.id, type: e.type, data: e.data });
            save();
            if (seen.events.length === options.closeAfter) window.follow.close();
        },
        onJobDone: (jobId, status) => { seen.jobsDone[jobId] = status; save(); },
        onTransport: (name, why) => { seen.transports.push(why ? `${name} (${why})` : name); save(); },
        onDone: () => { seen.done += 1; save(); },
        onError: (e) => { seen.error = { kind: e.kind, status: e.status }; save(); },
    });
})"""


def follow_jobs(page: Page, selection: dict[str, Any], **options: Any) -> None:
    page.evaluate(START_FOLLOW_JOBS, [selection, options])


def seen(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate("() => window.seen")
    return result


def wait_done(page: Page, times: int = 1) -> dict[str, Any]:
    page.wait_for_function("n => window.seen && (window.seen.done >= n || window.seen.error)", arg=times)
    result = seen(page)
    assert result["error"] is None
    return result


def wait_for_deltas(page: Page, count: int) -> None:
    page.wait_for_function("n => window.seen.events.filter((e) => e.type === 'delta').length >= n", arg=count)


def expect_every_story(result: dict[str, Any], job_ids: list[str], words: int) -> None:
    expect_every_text(result, {job_id: story_text(job_id, words) for job_id in job_ids})


def expect_every_text(result: dict[str, Any], texts: dict[str, str]) -> None:
    """Each job's whole text, each of its events once and in order, and its end."""
    for job_id, whole in texts.items():
        events = [event for event in result["events"] if event["jobId"] == job_id]
        ids = [event["id"] for event in events]
        in_order = sorted(set(ids), key=lambda i: tuple(map(int, i.split("-"))))
        assert ids == in_order, f"{job_id}: an event repeated or out of order"
        assert "".join(event["data"]["text"] for event in events if event["type"] == "delta") == whole
        assert [event["type"] for event in events][-1] == "done"
    assert result["jobsDone"] == dict.fromkeys(texts, "completed")
    assert {event["jobId"] for event in result["events"]} == set(texts)


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_followJobs_whenListed_thenEveryJobsWholeTextOnOneConnection(
    page: Page, dev_stack: LiveStack, transport: str
) -> None:
    streams, polls = requests_to(page, MANY_EVENTS), requests_to(page, MANY_POLL)
    single = requests_to(page, "/v1/jobs/")
    with dev_stack.client() as http:
        job_ids = start_stories(http, 3, words=30, delay_ms=30)
        token = read_token(http, jobs=job_ids)
    page.goto(dev_stack.base_url + ORIGIN_PAGE)
    follow_jobs(page, {"jobs": job_ids, "token": token}, transport=transport)
    result = wait_done(page)
    expect_every_story(result, job_ids, 30)
    assert result["transports"] == [{"sse": "sse", "poll": "poll (asked for)"}[transport]]
    assert result["done"] == 1
    assert single == []
    if transport == "sse":
        assert len(streams) == 1 and polls == []
    else:
        assert streams == [] and polls and all("wait=25" in url for url in polls)


def test_followJobs_whenEventSourceMissing_thenPollsFromTheStart(page: Page, dev_stack: LiveStack) -> None:
    page.add_init_script("delete window.EventSource;")
    streams = requests_to(page, MANY_EVENTS)
    with dev_stack.client() as http:
        job_ids = start_stories(http, 2, words=20, delay_ms=20)
        token = read_token(http, jobs=job_ids)
    page.goto(dev_stack.base_url + ORIGIN_PAGE)
    follow_jobs(page, {"jobs": job_ids, "token": token}, transport="auto")
    result = wait_done(page)
    expect_every_story(result, job_ids, 20)
    assert result["transports"] == ["poll (EventSource is not available)"]
    assert streams == []


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_followJobs_whenReloadedMidStream_thenNothingLostOrRepeated(
    page: Page, dev_stack: LiveStack, transport: str
) -> None:
    with dev_stack.client() as http:
        job_ids = start_stories(http, 3, words=60, delay_ms=40)
        token = read_token(http, jobs=job_ids)
    selection = {"jobs": job_ids, "token": token}
    page.goto(dev_stack.base_url + ORIGIN_PAGE)
    follow_jobs(page, selection, transport=transport)
    wait_for_deltas(page, 20)
    page.reload()
    resumed = requests_to(page, MANY_EVENTS if transport == "sse" else MANY_POLL)
    follow_jobs(page, selection, transport=transport)
    result = wait_done(page)
    expect_every_story(result, job_ids, 60)
    first_after_reload = parse_qs(urlsplit(resumed[0]).query)
    assert first_after_reload["last_event_id" if transport == "sse" else "cursor"]  # from the stored cursor
    page.reload()  # after the end: it ends again at once, and nothing is delivered twice
    follow_jobs(page, selection, transport=transport)
    assert wait_done(page, times=2)["events"] == result["events"]


def test_followJobs_whenClosedMidAnswer_thenFollowingAgainRepeatsNothing(page: Page, dev_stack: LiveStack) -> None:
    # Ended jobs: one poll answers every event; the page closes the follow in the middle of it.
    texts = {}
    with dev_stack.client() as http:
        for name in ("a", "b"):
            job = create_job(http)
            append(http, job, [{"type": "delta", "data": {"text": f"{name}{i} "}} for i in range(10)])
            append(http, job, {"type": "done", "data": {"status": "completed"}})
            texts[job["id"]] = "".join(f"{name}{i} " for i in range(10))
        token = read_token(http, jobs=list(texts))
    selection = {"jobs": list(texts), "token": token}
    page.goto(dev_stack.base_url + ORIGIN_PAGE)
    follow_jobs(page, selection, transport="poll", closeAfter=7)
    page.wait_for_function("() => window.seen.events.length === 7")
    follow_jobs(page, selection, transport="poll")
    expect_every_text(wait_done(page), texts)


def test_followJobs_whenAListedJobIsDeleted_thenItDropsOutAndTheFollowStillEnds(
    page: Page, dev_stack: LiveStack
) -> None:
    streams = requests_to(page, MANY_EVENTS)
    with dev_stack.client() as http:
        kept, deleted = create_job(http), create_job(http)
        for job in (kept, deleted):
            append(http, job, {"type": "delta", "data": {"text": "hi"}})
        token = read_token(http, jobs=[kept["id"], deleted["id"]])
        page.goto(dev_stack.base_url + ORIGIN_PAGE)
        follow_jobs(page, {"jobs": [kept["id"], deleted["id"]], "token": token}, transport="sse")
        wait_for_deltas(page, 2)
        append(http, kept, {"type": "done", "data": {"status": "completed"}})
        assert http.delete(f"/v1/jobs/{deleted['id']}", headers=ALICE).status_code == 204
    result = wait_done(page)
    assert result["jobsDone"] == {kept["id"]: "completed"}
    # The gateway ends the stream; EventSource's reconnect is answered 204, and one poll says done.
    assert len(streams) == 2 and result["transports"] == ["sse"]


def test_followJobs_whenByTag_thenJobsCreatedLaterJoinTheSameStream(page: Page, dev_stack: LiveStack) -> None:
    streams = requests_to(page, MANY_EVENTS)
    with dev_stack.client() as http:
        first = start_stories(http, 1, words=10, delay_ms=20, tag="batch")
        token = read_token(http, tag="batch")
        page.goto(dev_stack.base_url + ORIGIN_PAGE)
        follow_jobs(page, {"tag": "batch", "token": token}, transport="sse")
        page.wait_for_function("id => window.seen.jobsDone[id]", arg=first[0])
        later = start_stories(http, 2, words=10, delay_ms=20, tag="batch")
        start_stories(http, 1, words=10, delay_ms=20, tag="other")  # not followed
    page.wait_for_function("ids => ids.every((id) => window.seen.jobsDone[id])", arg=later)
    result = seen(page)
    expect_every_story(result, first + later, 10)
    assert result["done"] == 0 and result["error"] is None  # a tag's follow never ends by itself
    assert len(streams) == 1


def test_followJobs_whenNoTokenButHeaders_thenPollsWithThem(page: Page, dev_stack: LiveStack) -> None:
    with dev_stack.client() as http:
        job_ids = start_stories(http, 2, words=10, delay_ms=10)
    page.goto(dev_stack.base_url + ORIGIN_PAGE)
    refused: Any = page.evaluate(
        """ids => import("/static/jobstream.js").then(({ followJobs }) => {
            try { followJobs({ jobs: ids, headers: {} }, { transport: "sse" }); } catch (e) { return e.name; }
        })""",
        job_ids,
    )
    assert refused == "TypeError"
    follow_jobs(page, {"jobs": job_ids, "headers": ALICE}, transport="auto")
    result = wait_done(page)
    expect_every_story(result, job_ids, 10)
    assert result["transports"] == ["poll (no token: EventSource cannot send an Authorization header)"]


def test_followJobs_whenTokenCoversOtherJobs_thenOneForbiddenErrorNoRetry(page: Page, dev_stack: LiveStack) -> None:
    with dev_stack.client() as http:
        mine = create_job(http)
        other = create_job(http)
        token = read_token(http, jobs=[mine["id"]])
    reads = requests_to(page, "/v1/")
    page.goto(dev_stack.base_url + ORIGIN_PAGE)
    follow_jobs(page, {"jobs": [mine["id"], other["id"]], "token": token})
    page.wait_for_function("() => window.seen.error")
    assert seen(page)["error"] == {"kind": "forbidden", "status": 403}
    assert len(reads) == 2  # the event stream, then one poll that says why, and no reconnect


def test_followJobs_whenAProxyRefusesTheLongUrl_thenOneErrorNoRetry(page: Page, dev_stack: LiveStack) -> None:
    # nginx's default buffers refuse a request line over 8 KiB: a hundred ids, their token and cursor.
    for path in ("**/v1/events?*", "**/v1/poll?*"):
        page.route(path, lambda route: route.fulfill(status=414, body="Request-URI Too Large"))
    with dev_stack.client() as http:
        job = create_job(http)
        token = read_token(http, jobs=[job["id"]])
    reads = requests_to(page, "/v1/")
    page.goto(dev_stack.base_url + ORIGIN_PAGE)
    follow_jobs(page, {"jobs": [job["id"]], "token": token})
    page.wait_for_function("() => window.seen.error")
    assert seen(page)["error"] == {"kind": "bad_request", "status": 414}
    assert len(reads) == 2  # the event stream, then one poll that says why, and no retry


# ---- the demo page


def test_demo_whenOpened_thenRecentJobsComeFromTheGateway(
    page: Page, dev_stack: LiveStack, client_for: Callable[[LiveStack], httpx.Client]
) -> None:
    http = client_for(dev_stack)
    job_ids = start_stories(http, 2, words=5, delay_ms=0)
    create_job(http, headers=BOB)  # another user's: never listed
    page.goto(dev_stack.base_url + "/")
    rows = page.locator("#recent li")
    expect(rows).to_have_count(2)
    assert [rows.nth(i).get_attribute("data-job") for i in range(2)] == job_ids[::-1]  # newest first
    expect(rows.first).to_contain_text("5 words")
    rows.last.get_by_role("button", name="Reopen").click()  # a read token is asked for it
    expect(page.locator("#status")).to_have_text("completed")
    assert page.locator("#text").inner_text() == story_text(job_ids[0], 5)
    expect(rows.last.locator(".badge")).to_have_text("completed")


def test_demo_whenFollowingAllRunningJobs_thenEachTextOnOneConnection(page: Page, dev_stack: LiveStack) -> None:
    page.goto(dev_stack.base_url + "/")
    page.get_by_label("Words").fill("60")
    page.get_by_label("Delay per word (ms)").fill("100")  # long enough to be running when listed
    for _ in range(3):
        page.get_by_role("button", name="Start a story").click()
        expect(page.locator("#job-id")).not_to_have_text("–")
        page.wait_for_function("() => !document.getElementById('start-button').disabled")
    expect(page.locator("#recent li")).to_have_count(3)
    job_ids = [page.locator("#recent li").nth(i).get_attribute("data-job") or "" for i in range(3)]
    streams = requests_to(page, MANY_EVENTS)
    page.get_by_role("button", name="Follow running jobs").click()
    ended = "3 running jobs: all 3 jobs ended"
    expect(page.locator("#all-state")).to_have_text(ended, timeout=STORY_TIMEOUT_MS)  # stories of 6 s
    for job_id in job_ids:
        row = page.locator(f'#all-jobs li[data-job="{job_id}"]')
        expect(row.locator(".badge")).to_have_text("completed")
        assert row.locator(".text").inner_text() == story_text(job_id, 60)
    assert len(streams) == 1
    expect(page.locator("#all-transport")).to_have_text("sse")


def test_demo_whenFollowingTheTagAndReloaded_thenLaterStoriesJoinAndTextsStayWhole(
    page: Page, dev_stack: LiveStack
) -> None:
    page.goto(dev_stack.base_url + "/")
    page.get_by_role("button", name="Follow tag demo").click()
    expect(page.locator("#all-state")).to_have_text("tag demo (new jobs join), on one connection")
    page.get_by_label("Words").fill("60")
    page.get_by_label("Delay per word (ms)").fill("40")
    page.get_by_role("button", name="Start a story").click()
    rows = page.locator("#all-jobs li")
    expect(rows).to_have_count(1)
    job_id = rows.first.get_attribute("data-job") or ""
    page.wait_for_function("() => document.querySelector('#all-jobs .text').textContent.split(' ').length >= 10")
    page.reload()
    expect(rows.first.locator(".badge")).to_have_text("completed")
    assert rows.first.locator(".text").inner_text() == story_text(job_id, 60)
    expect(page.locator("#all-state")).to_have_text("tag demo (new jobs join), on one connection")
