"""`GET /v1/jobs/{id}/events?format=ui-message-stream` (API.md "AI SDK (`useChat`) compatibility"):
a job's events as an AI SDK UI message stream, every chunk checked by the real `ai` package's own
schema and the message rebuilt by its `readUIMessageStream` (tests/js, installed by `make test`)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobstream.demo import chat_reply
from tests.conftest import ALICE, LiveStack, append, create_job
from tests.helpers import wait_until

pytestmark = pytest.mark.on_cluster

JS = Path(__file__).resolve().parent / "js"
UI = {"format": "ui-message-stream"}


def check_with_ai_package(body: str) -> dict[str, Any]:
    """The stream as the `ai` package reads it: its chunks (each valid by its schema, else this
    fails) and the UIMessage it rebuilds."""
    if not (JS / "node_modules" / "ai").is_dir():
        raise AssertionError("the npm packages of tests/js are not installed: run `make test`")
    result = subprocess.run(
        ["node", str(JS / "check-ui-stream.mjs")], input=body, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    checked: dict[str, Any] = json.loads(result.stdout)
    return checked


def read_ui(http: httpx.Client, job: dict[str, Any], **params: str) -> httpx.Response:
    response = http.get(job["links"]["events"], params={**UI, **params}, headers=ALICE)
    return response


def frames(body: str) -> list[tuple[str | None, str]]:
    """(id, data) of each SSE event of a body."""
    found = []
    for frame in body.split("\n\n"):
        lines = frame.split("\n")
        data = [line[6:] for line in lines if line.startswith("data: ")]
        ids = [line[4:] for line in lines if line.startswith("id: ")]
        if data:
            found.append((ids[0] if ids else None, "\n".join(data)))
    return found


def chunks_of(body: str) -> list[dict[str, Any]]:
    return [json.loads(data) for _, data in frames(body) if data != "[DONE]"]


@pytest.fixture
def http(gateway: httpx.Client) -> httpx.Client:
    return gateway


EVERYTHING = [
    {"type": "delta", "data": {"text": "Let me "}},
    {"type": "reasoning", "data": {"text": "The user wants a city."}},
    {"type": "tool-call", "data": {"id": "call-1", "name": "weather", "input": {"city": "Oslo"}}},
    {"type": "tool-result", "data": {"id": "call-1", "output": {"celsius": 4}}},
    {"type": "progress", "data": {"current": 1, "total": 2}},
    {"type": "chart.point", "data": {"x": 1}},
    {"type": "log", "data": {"message": "fetched"}},
    {"type": "delta", "data": {"text": "check: "}},
    {"type": "delta", "data": {"text": "4 °C."}},
    {"type": "result", "data": {"answer": 4}},
    {"type": "done", "data": {"status": "completed"}},
]


def test_everyEventKind_thenItsChunksInOrder_validAndRebuiltByTheAiPackage(http: httpx.Client) -> None:
    job = create_job(http)
    ids = append(http, job, EVERYTHING)
    response = read_ui(http, job)
    assert response.status_code == 200
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    first_text, second_text = f"text-{ids[0]}", f"text-{ids[7]}"
    assert chunks_of(body) == [
        {"type": "start", "messageId": job["id"]},
        {"type": "start-step"},
        {"type": "text-start", "id": first_text},
        {"type": "text-delta", "id": first_text, "delta": "Let me "},
        {"type": "text-end", "id": first_text},
        {"type": "reasoning-start", "id": f"reasoning-{ids[1]}"},
        {"type": "reasoning-delta", "id": f"reasoning-{ids[1]}", "delta": "The user wants a city."},
        {"type": "reasoning-end", "id": f"reasoning-{ids[1]}"},
        {"type": "tool-input-available", "toolCallId": "call-1", "toolName": "weather", "input": {"city": "Oslo"}},
        {"type": "tool-output-available", "toolCallId": "call-1", "output": {"celsius": 4}},
        {
            "type": "data-progress",
            "id": "progress",
            "data": {"current": 1, "total": 2, "message": None, "percent": 50.0},
        },
        {"type": "data-chart.point", "data": {"x": 1}},
        {"type": "data-log", "data": {"message": "fetched"}},
        # Output after tool results: a step of its own, as a model's answer after its tools is.
        {"type": "finish-step"},
        {"type": "start-step"},
        {"type": "text-start", "id": second_text},
        {"type": "text-delta", "id": second_text, "delta": "check: "},
        {"type": "text-delta", "id": second_text, "delta": "4 °C."},
        {"type": "data-result", "data": {"answer": 4}},
        {"type": "text-end", "id": second_text},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]
    # The last chunk of each event carries the event's id (`status` renders nothing); then [DONE].
    labelled = [event_id for event_id, _ in frames(body) if event_id is not None]
    assert labelled == ids
    assert frames(body)[-1] == (None, "[DONE]")

    checked = check_with_ai_package(body)
    parts = checked["message"]["parts"]
    texts = [part["text"] for part in parts if part["type"] == "text"]
    assert texts == ["Let me ", "check: 4 °C."]
    assert [part["text"] for part in parts if part["type"] == "reasoning"] == ["The user wants a city."]
    tool = next(part for part in parts if part["type"] == "tool-weather")
    assert tool["state"] == "output-available" and tool["output"] == {"celsius": 4}
    assert checked["message"]["id"] == job["id"]


def test_reconnect_afterDone_then204(http: httpx.Client) -> None:
    job = create_job(http)
    ids = append(
        http, job, [{"type": "delta", "data": {"text": "hi"}}, {"type": "done", "data": {"status": "completed"}}]
    )
    response = http.get(job["links"]["events"], params=UI, headers={**ALICE, "Last-Event-ID": ids[-1]})
    assert response.status_code == 204


def test_resume_fromAnId_thenNoStartAndTextGoesOnInAPartOfItsOwn(http: httpx.Client) -> None:
    job = create_job(http)
    ids = append(http, job, [{"type": "delta", "data": {"text": "one "}}, {"type": "delta", "data": {"text": "two"}}])
    append(http, job, [{"type": "done", "data": {"status": "completed"}}])
    body = http.get(job["links"]["events"], params=UI, headers={**ALICE, "Last-Event-ID": ids[0]}).text
    assert chunks_of(body) == [
        {"type": "start-step"},
        {"type": "text-start", "id": f"text-{ids[1]}"},
        {"type": "text-delta", "id": f"text-{ids[1]}", "delta": "two"},
        {"type": "text-end", "id": f"text-{ids[1]}"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop"},
    ]


def test_replay_fromTheStart_givesTheSameChunksEveryTime(http: httpx.Client) -> None:
    job = create_job(http)
    append(http, job, EVERYTHING)
    assert read_ui(http, job).text == read_ui(http, job).text


def test_cancelled_thenAbortThenFinish(http: httpx.Client) -> None:
    job = create_job(http)
    append(http, job, [{"type": "delta", "data": {"text": "half"}}])
    assert http.post(job["links"]["cancel"], headers=ALICE).status_code == 202
    body = read_ui(http, job).text
    assert [c["type"] for c in chunks_of(body)][-4:] == ["text-end", "finish-step", "abort", "finish"]
    parts = check_with_ai_package(body)["message"]["parts"]
    assert [p["text"] for p in parts if p["type"] == "text"] == ["half"]


def test_failed_thenErrorWithItsMessage(http: httpx.Client) -> None:
    job = create_job(http)
    append(
        http,
        job,
        [
            {"type": "delta", "data": {"text": "so far"}},
            {"type": "failure", "data": {"message": "model overloaded"}},
            {"type": "done", "data": {"status": "failed"}},
        ],
    )
    body = read_ui(http, job).text
    assert chunks_of(body)[-2:] == [
        {"type": "error", "errorText": "model overloaded"},
        {"type": "finish", "finishReason": "error"},
    ]
    assert check_with_ai_package(body)["message"]["error"] == "model overloaded"


def test_snapshot_thenOneTextDeltaWithEverythingSoFar(http: httpx.Client) -> None:
    job = create_job(http)
    ids = append(http, job, [{"type": "delta", "data": {"text": "a" * 10}}] * 3)
    with http.stream("GET", job["links"]["events"], params={**UI, "snapshot": "1"}, headers=ALICE) as stream:
        head = ""
        for text in stream.iter_text():
            head += text
            if "text-delta" in head:
                break
    chunks = chunks_of(head)
    assert chunks[:4] == [
        {"type": "start", "messageId": job["id"]},
        {"type": "start-step"},
        {"type": "text-start", "id": f"text-{ids[-1]}"},
        {"type": "text-delta", "id": f"text-{ids[-1]}", "delta": "a" * 30},
    ]


@pytest.mark.parametrize("value", ["sse", "UI-MESSAGE-STREAM", ""])
def test_unknownFormat_then400(http: httpx.Client, value: str) -> None:
    job = create_job(http)
    response = http.get(job["links"]["events"], params={"format": value}, headers=ALICE)
    assert response.status_code == 400
    assert response.json()["errors"][0]["loc"] == ["format"]


def test_plainFormat_carriesTheSameEventsUnderTheirOwnNames(http: httpx.Client) -> None:
    job = create_job(http)
    append(http, job, EVERYTHING)
    body = http.get(job["links"]["events"], headers=ALICE).text
    names = [line[7:] for line in body.splitlines() if line.startswith("event: ")]
    assert names == ["status", *(event["type"] for event in EVERYTHING)]  # the job's start, then as appended


def test_demoChat_repliesWordByWord_andTheAiPackageRebuildsTheText(make_stack: Callable[..., LiveStack]) -> None:
    messages = [
        {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "first"}]},
        {"id": "m2", "role": "assistant", "parts": [{"type": "text", "text": "You said: first"}]},
        {"id": "m3", "role": "user", "parts": [{"type": "text", "text": "what a "}, {"type": "text", "text": "day"}]},
    ]
    with make_stack(demo=True).client() as http:
        job = create_job(http, "demo.chat", input={"messages": messages, "delay_ms": 5})
        wait_until(lambda: http.get(job["links"]["self"], headers=ALICE).json()["status"] == "completed")
        body = read_ui(http, job).text
    deltas = [c["delta"] for c in chunks_of(body) if c["type"] == "text-delta"]
    assert "".join(deltas) == "You said: what a day" == chat_reply(messages)
    assert len(deltas) == 5  # word by word
    texts = [p["text"] for p in check_with_ai_package(body)["message"]["parts"] if p["type"] == "text"]
    assert texts == ["You said: what a day"]


def test_handlerReasoningAndTools_thenTheirPartsInTheMessage(stack: LiveStack) -> None:
    with stack.client() as http:
        job = create_job(http, "test.agent")
        wait_until(lambda: http.get(job["links"]["self"], headers=ALICE).json()["status"] == "completed")
        plain = poll_types(http, job)
        body = read_ui(http, job).text
    # Reasoning tokens coalesced as deltas are; the same events under jobstream's own names.
    assert plain == [
        "status",
        "reasoning",
        "tool-call",
        "tool-result",
        "tool-call",
        "tool-result",
        "delta",
        "result",
        "done",
    ]
    parts = check_with_ai_package(body)["message"]["parts"]
    # Each call after a result, and the answer after them, a step of its own (as a model's).
    assert [p["type"] for p in parts] == [
        "step-start",
        "reasoning",
        "tool-weather",
        "step-start",
        "tool-news",
        "step-start",
        "text",
        "data-result",
    ]
    assert parts[1]["text"] == "Need the weather."
    assert (parts[2]["state"], parts[2]["input"], parts[2]["output"]) == (
        "output-available",
        {"city": "Oslo"},
        {"celsius": 4},
    )
    assert (parts[4]["state"], parts[4]["errorText"]) == ("output-error", "news service down")
    assert parts[6]["text"] == "It is 4 °C."


def poll_types(http: httpx.Client, job: dict[str, Any]) -> list[str]:
    return [event["type"] for event in http.get(job["links"]["poll"], headers=ALICE).json()["events"]]


def test_toolResultOfACallNeverShown_thenADataPartNotAToolPart(http: httpx.Client) -> None:
    job = create_job(http)
    append(http, job, [{"type": "tool-result", "data": {"id": "ghost", "output": 1}}, *DONE])
    body = read_ui(http, job).text
    assert {"type": "data-tool-result", "data": {"id": "ghost", "output": 1}} in chunks_of(body)
    check_with_ai_package(body)  # the ai package reads it to its end


def test_manyProgressEvents_thenOnePartInTheMessage(http: httpx.Client) -> None:
    job = create_job(http)
    steps = [{"type": "progress", "data": {"current": n, "total": 3}} for n in (1, 2, 3)]
    append(
        http, job, [{"type": "delta", "data": {"text": "a"}}, *steps, {"type": "delta", "data": {"text": "b"}}, *DONE]
    )
    parts = check_with_ai_package(read_ui(http, job).text)["message"]["parts"]
    assert [p["type"] for p in parts] == ["step-start", "text", "data-progress"]
    assert parts[1]["text"] == "ab" and parts[2]["data"]["current"] == 3


def test_toolsThenAnswer_isNotAwaitingItsTools(http: httpx.Client) -> None:
    """The AI SDK's lastAssistantMessageIsCompleteWithToolCalls (what apps resend on) is false for
    a reply that answered after its tools: the answer is a step of its own."""
    job = create_job(http)
    append(
        http,
        job,
        [
            {"type": "tool-call", "data": {"id": "c", "name": "t", "input": {}}},
            {"type": "tool-result", "data": {"id": "c", "output": 2}},
            {"type": "delta", "data": {"text": "done"}},
            *DONE,
        ],
    )
    message = check_with_ai_package(read_ui(http, job).text)["message"]
    assert check_complete_with_tool_calls(message) is False


def check_complete_with_tool_calls(message: dict[str, Any]) -> bool:
    script = (
        "import { lastAssistantMessageIsCompleteWithToolCalls } from 'ai';"
        "const message = JSON.parse(process.argv[1]);"
        "console.log(JSON.stringify(lastAssistantMessageIsCompleteWithToolCalls({ messages: [message] })));"
    )
    result = subprocess.run(
        ["node", "--input-type=module", "-e", script, json.dumps(message)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=JS,
    )
    assert result.returncode == 0, result.stderr
    answer: bool = json.loads(result.stdout)
    return answer


DONE = [{"type": "done", "data": {"status": "completed"}}]
