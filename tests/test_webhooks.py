"""Webhooks (API.md "Webhooks") end to end: a real gateway and worker on a real Redis (and the
local cluster), deliveries to a real HTTP receiver on a loopback port that fails, times out and
recovers."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from standardwebhooks.webhooks import Webhook

from jobstream import keys, outbox, webhooks
from jobstream.outbox import Outbox
from tests.conftest import ALICE, LiveStack, SyncRedis, append, create_job
from tests.helpers import wait_until
from tests.webhook_receiver import Answer, Receiver

pytestmark = pytest.mark.on_cluster

SECRET = "whsec_" + base64.b64encode(b"a test signing key of 32 bytes!!").decode()
DONE_COMPLETED = [{"type": "result", "data": {"n": 1}}, {"type": "done", "data": {"status": "completed"}}]


@pytest.fixture
def hooked(make_stack: Callable[..., LiveStack], receiver: Receiver) -> Callable[..., httpx.Client]:
    """A gateway and worker whose webhooks may reach the receiver, signed with SECRET."""

    def make(**overrides: Any) -> httpx.Client:
        settings: dict[str, Any] = {
            "webhook_secret": SECRET,
            "webhook_allowed_hosts": [f"127.0.0.1:{receiver.port}"],
            "webhook_backoff_s": 0.2,
            **overrides,
        }
        return make_stack(**settings).client()

    return make


def hook(receiver: Receiver, path: str = "/hook", **extra: Any) -> dict[str, Any]:
    return {"url": receiver.url(path), **extra}


def test_ending_whenJobHasWebhook_thenSignedDeliveryOfItsStatusDocument(
    hooked: Callable[..., httpx.Client], receiver: Receiver
) -> None:
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver), tags=["t1"])
        append(http, job, DONE_COMPLETED)
        delivery = wait_until(lambda: receiver.at(), message="no delivery")[0]
        status = http.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()

    payload = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert payload["type"] == "job.completed"
    assert payload["data"] == status
    assert payload["data"]["result"] == {"n": 1}
    assert payload["timestamp"] == status["completed_at"]
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["webhook-id"]


def test_retries_whenReceiverFailsThenRecovers_thenSameIdUntilDelivered(
    hooked: Callable[..., httpx.Client], receiver: Receiver
) -> None:
    receiver.answer = lambda path, n: Answer(500 if n < 2 else 204)
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver))
        append(http, job, DONE_COMPLETED)
        wait_until(lambda: len(receiver.at()) >= 3, message="not retried to success")
    attempts = receiver.at()
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    # Backoff: 0.2 s, then 0.4 s (with up to 25 % more).
    assert attempts[1].at - attempts[0].at >= 0.2
    assert attempts[2].at - attempts[1].at >= 0.4


def test_startedAndEnding_whenStartedFailsFirst_thenInOrder(
    hooked: Callable[..., httpx.Client], receiver: Receiver
) -> None:
    receiver.answer = lambda path, n: Answer(503 if n < 2 else 200)
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver, events=["job.started", "job.completed"]))
        append(http, job, [{"type": "delta", "data": {"text": "hi"}}])
        append(http, job, DONE_COMPLETED)
        wait_until(lambda: receiver.events().count("job.completed") == 1, message="ending not delivered")
    assert receiver.events() == ["job.started"] * 3 + ["job.completed"]
    started = receiver.at()[0].json["data"]
    assert started["status"] == "running"


def test_create_whenWebhookTargetsPrivateAddress_then422(hooked: Callable[..., httpx.Client]) -> None:
    with hooked(webhook_allowed_hosts=[]) as http:
        for url in [
            "http://127.0.0.1:9/hook",
            "http://localhost/hook",
            "http://10.1.2.3/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/hook",
            "http://0.0.0.0/",
            "http://224.0.0.1/",
            "ftp://example.com/hook",
            "not a url",
            "http://a..b/",
            f"http://{'a' * 64}.example.com/",
            "http://[64:ff9b::7f00:1]/",
        ]:
            response = http.post("/v1/jobs", json={"type": "external", "webhook": {"url": url}}, headers=ALICE)
            assert response.status_code == 422, (url, response.text)
            assert response.headers["content-type"] == "application/problem+json"


def test_timeout_thenRetried(
    hooked: Callable[..., httpx.Client], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "ATTEMPT_TIMEOUT_S", 0.5)
    receiver.answer = lambda path, n: Answer(200, delay_s=2 if n == 0 else 0)
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver))
        timeouts = counter("jobstream_webhook_attempts_total", result="timeout")
        append(http, job, DONE_COMPLETED)
        wait_until(lambda: len(receiver.at()) >= 2, message="not retried after a timeout")
        assert counter("jobstream_webhook_attempts_total", result="timeout") == timeouts + 1
        wait_until(lambda: counter("jobstream_webhook_attempts_total", result="ok") > 0)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_hangingReceiver_withManyJobs_doesNotHoldUpOtherReceivers(
    hooked: Callable[..., httpx.Client], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More jobs to a receiver that hangs than a worker sends at once: it takes at most
    MAX_PER_RECEIVER of the slots, and another receiver's delivery goes at once."""
    monkeypatch.setattr(webhooks, "MAX_PER_RECEIVER", 2)
    hanging = Receiver().start()
    hanging.answer = lambda path, n: Answer(200, delay_s=6)
    try:
        with hooked(webhook_concurrency=3, webhook_allowed_hosts=["127.0.0.1"]) as http:
            for _ in range(5):
                append(http, create_job(http, webhook={"url": hanging.url()}), DONE_COMPLETED)
            wait_until(lambda: len(hanging.at()) == 2, message="the hanging receiver was never called")
            fast = create_job(http, webhook=hook(receiver))
            append(http, fast, DONE_COMPLETED)
            wait_until(lambda: receiver.at(), message="the other receiver's delivery never came")
            assert receiver.at()[0].at - hanging.at()[0].at < 5
            assert len(hanging.at()) == 2  # the hanging receiver's other jobs still wait their turn
    finally:
        hanging.stop()


def test_startedAndEnded_inOneAppend_thenStartedTellsTheJobAsItStarted(
    hooked: Callable[..., httpx.Client], receiver: Receiver
) -> None:
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver, events=["job.started", "job.completed"]))
        append(http, job, [{"type": "delta", "data": {"text": "hi"}}, *DONE_COMPLETED])
        wait_until(lambda: len(receiver.at()) == 2, message="not both delivered")
    started, completed = (r.json for r in receiver.at())
    assert (started["type"], completed["type"]) == ("job.started", "job.completed")
    assert started["data"]["status"] == "running"
    assert started["data"]["result"] is None and started["data"]["completed_at"] is None
    assert completed["data"]["result"] == {"n": 1}


def test_operatorUrl_whenJobHasNoWebhook_thenEndingsGoThere(
    hooked: Callable[..., httpx.Client], receiver: Receiver
) -> None:
    with hooked(webhook_url=receiver.url("/operator")) as http:
        plain = create_job(http)
        own = create_job(http, webhook=hook(receiver, "/own"))
        for job in (plain, own):
            append(http, job, DONE_COMPLETED)
        wait_until(lambda: receiver.at("/operator") and receiver.at("/own"), message="not both delivered")
        cancelled = create_job(http)
        assert http.post(f"/v1/jobs/{cancelled['id']}/cancel", headers=ALICE).status_code == 202
        wait_until(lambda: len(receiver.at("/operator")) == 2, message="the cancel not delivered")
    assert [r.json["data"]["id"] for r in receiver.at("/operator")] == [plain["id"], cancelled["id"]]
    assert receiver.events("/operator") == ["job.completed", "job.cancelled"]
    assert [r.json["data"]["id"] for r in receiver.at("/own")] == [own["id"]]


def test_cancel_whenJobPending_thenJobCancelledDelivered(
    hooked: Callable[..., httpx.Client], receiver: Receiver
) -> None:
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver, events=["job.started", "job.cancelled"]))
        assert http.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE).status_code == 202
        wait_until(lambda: receiver.at(), message="no delivery")
    assert receiver.events() == ["job.cancelled"]
    assert receiver.at()[0].json["data"]["status"] == "cancelled"


def test_workerJob_whenStartedAndFailed_thenBothDelivered(
    hooked: Callable[..., httpx.Client], receiver: Receiver
) -> None:
    with hooked() as http:
        job = create_job(
            http, "test.boom", webhook=hook(receiver, events=["job.started", "job.failed", "job.completed"])
        )
        wait_until(lambda: len(receiver.at()) == 2, message="not both delivered")
    assert receiver.events() == ["job.started", "job.failed"]
    assert receiver.at()[1].json["data"]["status"] == "failed"
    assert receiver.at()[1].json["data"]["id"] == job["id"]


def test_redirect_isNotFollowed_andCountsAsFailure(hooked: Callable[..., httpx.Client], receiver: Receiver) -> None:
    receiver.answer = lambda path, n: Answer(302, headers={"location": "/elsewhere"}) if n == 0 else Answer(200)
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver))
        append(http, job, DONE_COMPLETED)
        wait_until(lambda: len(receiver.at()) == 2, message="not retried after a redirect")
    assert receiver.at("/elsewhere") == []


def test_givenUp_afterADayOfFailures_thenNextDeliveryOfTheJobGoesOn(
    hooked: Callable[..., httpx.Client], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "GIVE_UP_AFTER_MS", 500)
    receiver.answer = lambda path, n: Answer(500)
    given_up = counter("jobstream_webhook_deliveries_total", outcome="gave_up")
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver, events=["job.started", "job.completed"]))
        append(http, job, [{"type": "delta", "data": {"text": "hi"}}])
        wait_until(lambda: receiver.at(), message="started never attempted")
        append(http, job, DONE_COMPLETED)
        wait_until(lambda: "job.completed" in receiver.events(), timeout_s=15, message="ending never attempted")
        wait_until(lambda: counter("jobstream_webhook_deliveries_total", outcome="gave_up") >= given_up + 2)
    events = receiver.events()
    assert events.index("job.completed") > max(i for i, e in enumerate(events) if e == "job.started")


def test_pendingGauge_whileFailing_thenClearedOnceDelivered(
    hooked: Callable[..., httpx.Client], receiver: Receiver, rdb: Any
) -> None:
    failing = True
    receiver.answer = lambda path, n: Answer(500 if failing else 200)
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver))
        # Opened with the job, in its slot: the ending's script writes there without declaring it.
        assert rdb.type(keys.outbox_key(job["id"])) == "stream"
        assert rdb.hget(keys.outbox_state_key(job["id"]), "consumers") == webhooks.CONSUMER
        append(http, job, DONE_COMPLETED)
        wait_until(lambda: len(receiver.at()) >= 2, message="not retried")
        text = http.get("/metrics").text
        assert "jobstream_webhook_pending_jobs 1.0" in text
        assert rdb.exists(keys.outbox_key(job["id"]), keys.outbox_state_key(job["id"])) == 2
        age = float(text.split("\njobstream_webhook_oldest_pending_age_seconds ")[1].split()[0])
        assert age > 0
        failing = False
        wait_until(lambda: "jobstream_webhook_pending_jobs 0.0" in http.get("/metrics").text)
        # Delivered and ended: the outbox and the consumer's entry are gone.
        wait_until(lambda: not rdb.exists(keys.outbox_key(job["id"]), keys.outbox_state_key(job["id"])))
        assert rdb.zscore(keys.outbox_due_key(webhooks.CONSUMER), job["id"]) is None


def test_lostNudge_thenRegisteredLookFindsTheRecord(
    hooked: Callable[..., httpx.Client], receiver: Receiver, monkeypatch: pytest.MonkeyPatch, rdb: Any
) -> None:
    """The process that wrote an ending died before telling the consumers (no nudge): the look the
    job was registered for at create, then the looks while it runs, find the record."""

    async def lost(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(Outbox, "nudge", lost)
    monkeypatch.setattr(outbox, "REGISTERED_LOOK_MS", 500)
    monkeypatch.setattr(webhooks, "IDLE_LOOK_MS", 500)
    due = keys.outbox_due_key(webhooks.CONSUMER)
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver))
        registered = rdb.zscore(due, job["id"])
        append(http, job, [{"type": "delta", "data": {"text": "hi"}}])
        # Looked at while running (nothing to send): due again later.
        wait_until(lambda: (rdb.zscore(due, job["id"]) or 0) > registered + 400, message="never looked at")
        append(http, job, DONE_COMPLETED)
        wait_until(lambda: receiver.at(), message="the record was never found")
    assert receiver.events() == ["job.completed"]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"url": "https://example.com/h", "events": []}, ["webhook", "events"]),
        ({"url": "https://example.com/h", "events": ["job.done"]}, ["webhook", "events", 0]),
        ({"url": "https://example.com/h", "secret": "x"}, ["webhook", "secret"]),
        ({"events": ["job.failed"]}, ["webhook", "url"]),
        ("https://example.com/h", ["webhook"]),
    ],
)
def test_create_whenWebhookMalformed_then422Naming(
    hooked: Callable[..., httpx.Client], body: Any, where: list[Any]
) -> None:
    with hooked() as http:
        response = http.post("/v1/jobs", json={"type": "external", "webhook": body}, headers=ALICE)
    assert response.status_code == 422, response.text
    assert any(error["loc"][: len(where)] == where for error in response.json()["errors"]), response.text


def test_delete_whenDeliveryPending_thenStillDelivered(hooked: Callable[..., httpx.Client], receiver: Receiver) -> None:
    failing = True
    receiver.answer = lambda path, n: Answer(500 if failing else 200)
    with hooked() as http:
        job = create_job(http, webhook=hook(receiver))
        append(http, job, DONE_COMPLETED)
        wait_until(lambda: receiver.at(), message="never attempted")
        assert http.delete(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 204
        failing = False
        attempts = len(receiver.at())
        wait_until(lambda: len(receiver.at()) > attempts, message="withdrawn by the delete")
    assert receiver.at()[-1].json["data"]["id"] == job["id"]


def test_webhookAndArchive_onOneJob_thenBothDone_andTheOutboxDeleted(
    hooked: Callable[..., httpx.Client], receiver: Receiver, rdb: SyncRedis, tmp_path: Path
) -> None:
    with hooked(archive_url=f"sqlite:///{tmp_path / 'archive.db'}") as http:
        job = create_job(http, webhook=hook(receiver, events=["job.started", "job.completed"]))
        append(http, job, [{"type": "delta", "data": {"text": "hi"}}])
        append(http, job, DONE_COMPLETED)
        wait_until(lambda: len(receiver.at()) == 2, message="not both deliveries")
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}", headers=ALICE).json()["archived"], timeout_s=20)
        wait_until(lambda: not rdb.exists(keys.outbox_key(job["id"]), keys.outbox_state_key(job["id"])))
    assert receiver.events() == ["job.started", "job.completed"]
    # The webhook told the job as it was when it ended: not archived yet.
    assert receiver.at()[1].json["data"]["archived"] is False
