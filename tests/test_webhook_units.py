"""Webhooks' pure logic: target checks (SSRF), backoff, what a delivery carries, and one attempt
against a real loopback receiver (refused before any connection, logged, left as a breadcrumb)."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook

from jobstream import sentry, webhooks
from jobstream.outbox import Record
from jobstream.settings import load_settings
from jobstream.store import JobRecord
from jobstream.webhook_targets import TargetRefused, check_at_create, is_allowed_host, is_public, parse
from jobstream.webhooks import Delivery, WebhookSender, backoff_s
from tests.webhook_receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"unit test key").decode()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::7f00:1",  # IPv4-compatible
        "::ffff:0:7f00:1",  # IPv4-translated
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::a00:1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "fec0::1",  # site-local
    ],
)
def test_isPublic_whenLoopbackPrivateLinkLocalOrMulticast_thenFalse(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_isPublic_whenGlobal_thenTrue(address: str) -> None:
    assert is_public(address)


def test_allowedHosts_matchHostOrHostAndPort() -> None:
    assert is_allowed_host(parse("http://127.0.0.1:8080/x"), ["127.0.0.1"])
    assert is_allowed_host(parse("http://127.0.0.1:8080/x"), ["127.0.0.1:8080"])
    assert not is_allowed_host(parse("http://127.0.0.1:8081/x"), ["127.0.0.1:8080"])
    assert is_allowed_host(parse("https://Hooks.Internal/x"), ["hooks.internal:443"])
    assert not is_allowed_host(parse("http://hooks.internal/x"), ["hooks.internal:443"])
    assert is_allowed_host(parse("http://[::1]:9000/x"), ["[::1]:9000"])
    assert is_allowed_host(parse("http://[::1]:9000/x"), ["[::1]"])
    assert is_allowed_host(parse("http://bücher.example/x"), ["xn--bcher-kva.example"])


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http://", "/relative", "javascript:alert(1)", "x" * 3000])
def test_parse_whenNotAnHttpUrlWithHost_thenRefused(url: str) -> None:
    with pytest.raises(TargetRefused):
        parse(url)


@pytest.mark.parametrize("url", [f"http://{'a' * 64}.example.com/", "http://a..b/"])
def test_checkAtCreate_whenHostCannotBeADnsName_thenRefused(url: str) -> None:
    with pytest.raises(TargetRefused):
        asyncio.run(check_at_create(url, []))


def test_checkAtCreate_whenNameDoesNotResolve_thenAccepted() -> None:
    url = "https://hooks.example.invalid/jobs"
    assert asyncio.run(check_at_create(url, [])) == url


def test_checkAtCreate_whenNameResolvesToLoopback_thenRefusedUnlessAllowed() -> None:
    with pytest.raises(TargetRefused, match="non-public"):
        asyncio.run(check_at_create("http://localhost:8080/hook", []))
    assert asyncio.run(check_at_create("http://localhost:8080/hook", ["localhost"]))


def test_backoff_doublesFromBaseWithUpToAQuarterMore_cappedAtAnHour() -> None:
    for attempt, base in [(1, 5.0), (2, 10.0), (3, 20.0), (12, 3600.0), (40, 3600.0)]:
        waits = [backoff_s(5, attempt) for _ in range(200)]
        assert base <= min(waits) and max(waits) <= base * 1.25
        assert max(waits) > min(waits)  # jittered


def _record(status: str = "completed", **meta: str) -> Record:
    job = JobRecord.new(job_id="7d9f0a52-1111-4222-8333-944455556666", owner="alice", job_type="t", input={}, ttl_s=60)
    fields = {**job.fields, "status": status, "webhook_statuses": "completed,failed", **meta}
    fields.pop("input")
    return Record(job.id, "1700000000000-0", status, 1700000000123, fields, 0)


def test_delivery_whenStatusWanted_thenBodyIsTypeTimestampAndStatusDocument() -> None:
    record = _record(webhook_url="https://hooks.example.com/x")
    delivery = Delivery.of(record, None)
    assert delivery is not None and delivery.checked and delivery.url == "https://hooks.example.com/x"
    body = httpx.Response(200, content=delivery.body).json()
    assert body == {
        "type": "job.completed",
        "timestamp": "2023-11-14T22:13:20.123Z",
        "data": JobRecord(record.meta).view(),
    }
    assert delivery.message_id == f"msg_{record.job_id}_{record.id}"
    assert Delivery.of(record, None) == delivery  # the same body and id on every attempt


def test_delivery_whenStatusNotWantedOrNoUrl_thenNone() -> None:
    assert Delivery.of(_record("running", webhook_url="https://h.example.com"), None) is None
    assert Delivery.of(_record(), None) is None
    operator = Delivery.of(_record(), "http://10.0.0.5/hooks")
    assert operator is not None and not operator.checked  # the operator's own URL


def _attempt(delivery: Delivery, **settings: Any) -> webhooks.Attempt:
    async def attempt() -> webhooks.Attempt:
        sender = WebhookSender(Redis(), load_settings(webhook_secret=SECRET, **settings))
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as http:
            sender._http = http
            return await sender._attempt(delivery)

    return asyncio.run(attempt())


def test_attempt_whenJobUrlIsLoopback_thenRefusedWithoutConnecting(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A job's URL allowed when it was created (another gateway's list, or DNS that answered
    otherwise then) is checked again before each attempt."""
    crumbs: list[tuple[str, str, dict[str, Any]]] = []
    monkeypatch.setattr(sentry, "webhook_breadcrumb", lambda job, event, **data: crumbs.append((job, event, data)))
    delivery = Delivery.of(_record(webhook_url=receiver.url()), None)
    assert delivery is not None
    with caplog.at_level(logging.INFO, "jobstream.webhooks"):
        attempt = _attempt(delivery)
    assert attempt.result == "refused"
    assert receiver.received == []
    assert crumbs == [(delivery.record.job_id, "job.completed", crumbs[0][2])]
    assert crumbs[0][2]["result"] == "refused"
    assert [r.job_id for r in caplog.records] == [delivery.record.job_id]  # type: ignore[attr-defined]


def test_attempt_whenAllowed_thenSignedPostToTheReceiver(receiver: Receiver) -> None:
    delivery = Delivery.of(_record(webhook_url=receiver.url()), None)
    assert delivery is not None
    attempt = _attempt(delivery, webhook_allowed_hosts=f"127.0.0.1:{receiver.port}")
    assert attempt.ok
    (received,) = receiver.received
    assert Webhook(SECRET).verify(received.body, received.headers) == received.json
    assert received.headers["webhook-id"] == delivery.message_id
    assert received.headers["user-agent"].startswith("jobstream/")
