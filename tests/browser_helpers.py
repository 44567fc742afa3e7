"""Helpers of the browser tests (their fixtures are in browser_fixtures)."""

from __future__ import annotations

from playwright.sync_api import Page, Request

#: How long a page may take over anything (a story, a reconnect), as Playwright's default timeout.
STORY_TIMEOUT_MS = 20_000


def requests_to(page: Page, fragment: str) -> list[str]:
    """The URLs of the page's requests from now on that contain ``fragment``, as they are made."""
    seen: list[str] = []

    def record(request: Request) -> None:
        if fragment in request.url:
            seen.append(request.url)

    page.on("request", record)
    return seen


def set_visibility(page: Page, state: str) -> None:
    page.evaluate(
        """state => {
            Object.defineProperty(document, "visibilityState", {configurable: true, get: () => state});
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        state,
    )
