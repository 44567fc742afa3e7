"""The README's code examples, run as written against a live gateway and worker: an example that
no longer works fails here, not in a user's app."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveStack
from tests.helpers import load_module, readme_block

__all__ = ["load_module", "python_block_after"]  # what other test modules import from here


def python_block_after(heading_text: str) -> str:
    """The first ```python block of README.md after the line that starts with ``heading_text``."""
    return readme_block(heading_text, "python")


def test_fastApiExample_createsAwaitsAndStreamsJobs(
    stack: LiveStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBSTREAM_URL", stack.base_url)
    monkeypatch.setenv("JOBSTREAM_API_KEY", "key-alice")
    example = load_module("readme_fastapi_example", python_block_after("An app that starts jobs"), tmp_path)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=example.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as app:
            started = (await app.post("/reports", json={"user_id": "u7"})).json()
            assert set(started) == {"id", "token"}
            text = await app.get(f"/reports/{started['id']}/text")
            assert text.status_code == 200 and text.text == "Sales rose in May. "

            now = await app.post("/reports/now", json={"user_id": "u8"})
            assert now.json() == {"status": "completed", "result": {"pages": 1, "user_id": "u8"}}
        await example.jobs.aclose()

        # The started job is the user's, tagged as the example tags it.
        listed = httpx.get(
            f"{stack.base_url}/v1/jobs", params={"tag": "user:u7"}, headers={"Authorization": "Bearer key-alice"}
        ).json()
        assert [job["id"] for job in listed["jobs"]] == [started["id"]]

    asyncio.run(scenario())
