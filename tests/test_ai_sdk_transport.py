"""`JobstreamChatTransport` (/static/ai-sdk.js) driven by the real AI SDK `Chat` (@ai-sdk/react,
in Node) against the README's FastAPI chat routes, a gateway and a worker: send, stop (the job is
cancelled), resume a reply in progress, a dropped connection (no chunk lost or repeated)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn

from jobstream.devredis import free_port
from tests.conftest import ALICE, LiveStack
from tests.helpers import wait_until
from tests.test_readme_examples import load_module, python_block_after

JS = Path(__file__).resolve().parent / "js"


class ServedApp:
    """An ASGI app on a loopback port, in a thread of its own."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServedApp:
        self._thread.start()
        wait_until(lambda: self._server.started, message="the app did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)


Backend = tuple[str, LiveStack]


@pytest.fixture
def chat_backend(
    make_stack: Callable[..., LiveStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    """The README's chat routes (as written) on their own port, in front of a gateway and worker
    with demo.chat; yields the routes' base URL (`api` is it + /api/chat) and the stack."""
    yield from serve_backend(make_stack(demo=True), tmp_path, monkeypatch)


@pytest.fixture
def trimming_backend(
    make_stack: Callable[..., LiveStack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    """``chat_backend`` with jobs' streams capped short: a long reply's oldest events are trimmed."""
    yield from serve_backend(make_stack(demo=True, stream_maxlen=10), tmp_path, monkeypatch)


def serve_backend(stack: LiveStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    monkeypatch.setenv("JOBSTREAM_URL", stack.base_url)
    monkeypatch.setenv("JOBSTREAM_API_KEY", "key-alice")
    backend: ModuleType = load_module(
        "readme_chat_backend", python_block_after("The three routes the transport calls"), tmp_path
    )
    with ServedApp(backend.app) as served:
        yield served.url, stack


def session(scenario: str, backend: tuple[str, LiveStack], chat_id: str, text: str = "") -> dict[str, Any]:
    if not (JS / "node_modules" / "@ai-sdk" / "react").is_dir():
        raise AssertionError("the npm packages of tests/js are not installed: run `make test`")
    url, stack = backend
    result = subprocess.run(
        ["node", str(JS / "chat-session.mjs"), scenario, f"{url}/api/chat", stack.base_url, chat_id, text],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )
    assert result.returncode == 0, result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


def chat_jobs(stack: LiveStack, chat_id: str) -> list[dict[str, Any]]:
    with stack.client() as http:
        jobs: list[dict[str, Any]] = http.get("/v1/jobs", params={"tag": f"chat:{chat_id}"}, headers=ALICE).json()[
            "jobs"
        ]
    return jobs


def long_text(words: int) -> str:
    return " ".join(f"word{index}" for index in range(words))


def test_send_thenTheWholeReplyAsOneAssistantMessage(chat_backend: tuple[str, LiveStack]) -> None:
    chat_id = str(uuid.uuid4())
    outcome = session("send", chat_backend, chat_id, "hello there")
    assert outcome["error"] is None and outcome["status"] == "ready"
    assert outcome["reply"] == "You said: hello there"
    assert outcome["finished"]["finishReason"] == "stop" and not outcome["finished"]["isAbort"]
    (job,) = chat_jobs(chat_backend[1], chat_id)
    assert job["status"] == "completed"
    assistant = [m for m in outcome["messages"] if m["role"] == "assistant"]
    assert [m["id"] for m in assistant] == [job["id"]]  # the `start` chunk's messageId


def test_stop_thenTheJobIsCancelledNotJustLeft(chat_backend: tuple[str, LiveStack]) -> None:
    chat_id = str(uuid.uuid4())
    text = long_text(200)  # ~4 s of reply at 20 ms a word
    outcome = session("stop", chat_backend, chat_id, text)
    assert outcome["finished"]["isAbort"] is True
    assert outcome["reply"] and len(outcome["reply"]) < len(f"You said: {text}")
    wait_until(lambda: chat_jobs(chat_backend[1], chat_id)[0]["status"] == "cancelled", message="not cancelled")


def test_resume_whileTheReplyRuns_thenTheWholeReplyFromItsStart(chat_backend: tuple[str, LiveStack]) -> None:
    url, stack = chat_backend
    chat_id = str(uuid.uuid4())
    text = long_text(60)
    messages = [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}]
    # A page sent the message, then went away mid-reply.
    created = httpx.post(f"{url}/api/chat", json={"id": chat_id, "messages": messages, "trigger": "submit-message"})
    assert created.status_code == 200, created.text
    outcome = session("resume", chat_backend, chat_id)
    assert outcome["error"] is None
    assert outcome["reply"] == f"You said: {text}"
    assert outcome["messages"][-1]["id"] == created.json()["id"]


def test_resume_whenTheReplyHasEndedOrThereIsNone_thenNothing(chat_backend: tuple[str, LiveStack]) -> None:
    chat_id = str(uuid.uuid4())
    assert session("resume", chat_backend, chat_id)["messages"] == []  # 204 from the app
    session("send", chat_backend, chat_id, "hi")
    outcome = session("resume", chat_backend, chat_id)
    assert outcome["messages"] == [] and outcome["status"] == "ready"


def test_droppedConnection_thenReadAgainWithNothingLostOrRepeated(chat_backend: tuple[str, LiveStack]) -> None:
    chat_id = str(uuid.uuid4())
    text = long_text(30)
    outcome = session("drop", chat_backend, chat_id, text)
    assert outcome["error"] is None
    assert outcome["reply"] == f"You said: {text}"
    assert len([m for m in outcome["messages"] if m["role"] == "assistant"]) == 1


def test_readmeRoutes_answerAsTheTransportExpects(chat_backend: tuple[str, LiveStack]) -> None:
    url, _ = chat_backend
    chat_id = str(uuid.uuid4())
    assert httpx.get(f"{url}/api/chat/{chat_id}/job").status_code == 204
    assert httpx.post(f"{url}/api/chat/{chat_id}/cancel").status_code == 204  # nothing to stop
    body = {"id": chat_id, "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "x"}]}]}
    created = httpx.post(f"{url}/api/chat", json=body).json()
    latest = httpx.get(f"{url}/api/chat/{chat_id}/job").json()
    assert latest["id"] == created["id"] and latest["token"]


def test_droppedConnection_whenItsPlaceWasTrimmedMeanwhile_thenReadsOnAfterIt(trimming_backend: Backend) -> None:
    chat_id = str(uuid.uuid4())
    text = long_text(300)  # ~6 s of reply: its first hundred events are trimmed while the reader is away
    outcome = session("drop-late", trimming_backend, chat_id, text)
    assert outcome["error"] is None and outcome["status"] == "ready"
    assert outcome["reply"].endswith("word298 word299")
    assert len(outcome["reply"]) < len(f"You said: {text}")  # what was trimmed is gone, not repeated
    assert outcome["reply"].count("word299") == 1
