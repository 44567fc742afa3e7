"""Real headless Chromium for the browser tests (test_browser*.py), against live gateways.

A test module loads them with ``pytest_plugins = ["tests.browser_fixtures"]`` (and does not
import this module, which pytest then could not rewrite); its helpers are in browser_helpers.
Debian's ``chromium`` must be installed (``.ci/run`` installs it): without
it the browser tests fail, they never skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, sync_playwright

from tests.browser_helpers import STORY_TIMEOUT_MS
from tests.conftest import LiveStack

CHROMIUM_FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # The machine has no network beyond loopback: keep Chromium from reaching out.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    for candidate in (os.environ.get("JOBSTREAM_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    raise RuntimeError("Chromium is missing: apt-get install chromium (the browser tests need it)")


# Module scope, not session: while Playwright's sync API is started, the main thread counts as
# running an event loop, and later modules' asyncio.run() would refuse to start.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone-sized screen
    context.set_default_timeout(STORY_TIMEOUT_MS)
    yield context
    context.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture
def page_errors(page: Page) -> Iterator[list[str]]:
    """What ``page`` throws or logs as an error (but a missing favicon); a test ends with none."""
    seen: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
            seen.append(f"{message.text} ({message.location.get('url')})")

    page.on("pageerror", lambda error: seen.append(f"uncaught: {error}"))
    page.on("console", console)
    yield seen
    assert seen == []


@pytest.fixture
def dev_stack(make_stack: Callable[..., LiveStack]) -> LiveStack:
    """As `jobstream dev`: the demo job types on, the page gets its key from /dev.json; readers
    retry after 300 ms."""
    return make_stack(dev_key="key-alice", retry_ms=300, demo=True)


@pytest.fixture
def client_for() -> Iterator[Callable[[LiveStack], httpx.Client]]:
    clients: list[httpx.Client] = []

    def make(stack: LiveStack) -> httpx.Client:
        clients.append(stack.client())
        return clients[-1]

    yield make
    for http in clients:
        http.close()
