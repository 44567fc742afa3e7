"""Webhooks: a job's status moves POSTed to its webhook by workers, signed as Standard Webhooks
specify, at least once, in order per job, retried with backoff for at least a day.

Deliveries come from the jobs' outboxes (outbox.py): the record of a move is written in the same
step as the move, so no ending goes without its webhook, whatever dies after. A worker process
runs one ``WebhookSender``: it takes due jobs, claims each one's next record, attempts it (at most
ATTEMPT_TIMEOUT_S, never following redirects, to an address checked by webhook_targets.py), and
settles it: delivered (a 2xx) or, after a failure, retried later, until a day has passed.
At most ``JOBSTREAM_WEBHOOK_CONCURRENCY`` jobs are served at once, so one slow receiver holds up
only its own jobs' deliveries.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from redis.exceptions import RedisError
from standardwebhooks.webhooks import Webhook

from jobstream import __version__, metrics, observability, sentry
from jobstream.connection import RedisClient
from jobstream.models import WEBHOOK_EVENTS, iso, to_json
from jobstream.outbox import IDLE_LOOK_MS, KEEP, WEBHOOK_CONSUMER, Outbox, Record
from jobstream.settings import Settings
from jobstream.store import JobRecord, now_ms
from jobstream.webhook_targets import TargetRefused, check_addresses, host_of, is_allowed_host, parse, resolve

logger = logging.getLogger("jobstream.webhooks")

CONSUMER = WEBHOOK_CONSUMER
#: One attempt, name lookup to answer, is given this long.
ATTEMPT_TIMEOUT_S = 10.0
#: A claimed job is left alone by other processes this long: more than an attempt can take.
LEASE_MS = 30_000
#: How often a sender looks for due jobs when it has nothing to do.
POLL_S = 0.5
MAX_BACKOFF_S = 3600.0
#: Up to this much more than the backoff, at random, so that retries of many jobs spread out.
JITTER = 0.25
#: A delivery failing for this long (since the move it tells of) is given up after its next failure.
GIVE_UP_AFTER_MS = 24 * 3600 * 1000
#: A stopping process releases the jobs it holds within this long.
RELEASE_TIMEOUT_S = 2.0
#: Attempts one process makes at once to one receiver (host and port): a receiver that hangs
#: takes at most these slots; its other jobs wait their turn, and other receivers' go on.
MAX_PER_RECEIVER = 4
#: A job whose receiver has MAX_PER_RECEIVER attempts under way is looked at again after this.
RECEIVER_BUSY_MS = 1000

_EVENT_OF_STATUS = {status.value: name for name, status in WEBHOOK_EVENTS.items()}


@dataclass(frozen=True, slots=True)
class Delivery:
    """One record, as its webhook POST."""

    record: Record
    #: job.started, job.completed, ...
    event: str
    url: str
    #: A job's own URL (its target checked before each attempt); else the operator's.
    checked: bool
    #: webhook-id: the same on every attempt.
    message_id: str
    body: bytes

    @property
    def receiver(self) -> str:
        """host:port, as attempts at once are counted."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or parts.scheme}"

    @classmethod
    def of(cls, record: Record, operator_url: str | None) -> Delivery | None:
        """None when the job's webhook does not want this move (another consumer's record), or
        when it has no URL (the operator's was unset since)."""
        if record.status not in record.meta.get("webhook_statuses", "").split(","):
            return None
        own = record.meta.get("webhook_url")
        url = own or operator_url
        if not url:
            return None
        event = _EVENT_OF_STATUS[record.status]
        document = JobRecord(record.meta).view()
        body = to_json({"type": event, "timestamp": iso(record.at_ms), "data": document}).encode()
        return cls(record, event, url, bool(own), f"msg_{record.job_id}_{record.id}", body)


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one attempt went: ``result`` as the attempts metric counts it."""

    result: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.result == "ok"


def backoff_s(base_s: float, failed_attempts: int) -> float:
    """The wait before the next attempt, after ``failed_attempts`` failures (1 or more)."""
    wait: float = min(base_s * 2.0 ** min(failed_attempts - 1, 32), MAX_BACKOFF_S)
    return wait * (1 + JITTER * random.random())


class WebhookSender:
    """A worker process's deliveries; ``run`` until ``stopping`` is set."""

    def __init__(self, client: RedisClient, settings: Settings) -> None:
        self._outbox = Outbox(client)
        self._settings = settings
        self._signer = Webhook(settings.webhook_secret) if settings.webhook_secret else None
        #: Names this process's leases: a settle by another holder is told apart.
        self._token = uuid.uuid4().hex
        self._serving: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._warned_unsigned = False
        #: Attempts under way, by receiver (host:port).
        self._per_receiver: collections.Counter[str] = collections.Counter()

    async def run(self, stopping: asyncio.Event) -> None:
        # Not from the environment: a proxy would connect to names, not to the checked addresses.
        # No kept-alive connections: one opened to a checked address for one host must not serve
        # another host of the same address (its certificate was checked for the first).
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            timeout=ATTEMPT_TIMEOUT_S, follow_redirects=False, trust_env=False, limits=limits
        ) as http:
            self._http = http
            try:
                await self._take_loop(stopping)
            finally:
                await self._stop()

    async def _take_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            free = self._settings.webhook_concurrency - len(self._serving)
            taken: list[str] = []
            self._slot_free.clear()
            if free > 0:
                now = now_ms()
                try:
                    taken = await self._outbox.take(CONSUMER, free, now, now + LEASE_MS)
                except RedisError as exc:
                    metrics.redis_errors.labels("webhooks").inc()
                    logger.warning("webhooks: cannot read the due deliveries: %s", exc)
                except Exception:  # never let the sender die quietly: log, and look again
                    logger.exception("webhooks: cannot read the due deliveries")
                for job_id in taken:
                    self._serve_soon(job_id, now + LEASE_MS, stopping)
            if free > 0 and len(taken) == free:
                continue  # more may be due
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await _first(stopping, self._slot_free)

    def _serve_soon(self, job_id: str, taken_ms: int, stopping: asyncio.Event) -> None:
        task = asyncio.create_task(self._serve(job_id, taken_ms, stopping), name=f"webhook-{job_id}")
        self._serving.add(task)
        task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        self._slot_free.set()

    async def _stop(self) -> None:
        """Let attempts under way end (each is bounded), then stop."""
        if self._serving:
            await asyncio.wait(self._serving, timeout=ATTEMPT_TIMEOUT_S + RELEASE_TIMEOUT_S)
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)

    async def _serve(self, job_id: str, taken_ms: int, stopping: asyncio.Event) -> None:
        """Deliver the job's records in order, while they succeed; then say when to look again."""
        observability.job_id.set(job_id)
        try:
            await self._serve_records(job_id, taken_ms, stopping)
        except RedisError as exc:
            # The lease lapses, and the job is taken again: nothing is lost.
            metrics.redis_errors.labels("webhooks").inc()
            logger.warning("webhooks of job %s wait: Redis failed (%s)", job_id, exc)
        except Exception:
            logger.exception("webhooks of job %s wait: unexpected error", job_id)

    async def _serve_records(self, job_id: str, taken_ms: int, stopping: asyncio.Event) -> None:
        outbox = self._outbox
        while True:
            now = now_ms()
            claim = await outbox.claim(CONSUMER, job_id, self._token, LEASE_MS)
            if claim.kind == "wait":
                await outbox.reschedule(CONSUMER, job_id, taken_ms, claim.until_ms, KEEP)
                return
            if claim.kind == "idle":
                await outbox.reschedule(CONSUMER, job_id, taken_ms, now + IDLE_LOOK_MS, None)
                return
            if claim.kind == "finished" or claim.record is None:
                await outbox.reschedule(CONSUMER, job_id, taken_ms, None, None)
                return
            record = claim.record
            if stopping.is_set():
                await outbox.settle(CONSUMER, record, self._token, "release")
                await outbox.reschedule(CONSUMER, job_id, taken_ms, now, KEEP)
                return
            try:
                delivery = Delivery.of(record, self._settings.webhook_url)
            except Exception:  # a record no attempt could send: never block the job's next ones
                logger.exception("webhook of job %s given up: its record %s is unreadable", job_id, record.id)
                metrics.webhook_deliveries.labels("gave_up").inc()
                delivery = None
            if delivery is None:
                await outbox.settle(CONSUMER, record, self._token, "done")
                continue
            receiver = delivery.receiver
            if self._per_receiver[receiver] >= MAX_PER_RECEIVER:
                await outbox.settle(CONSUMER, record, self._token, "release")
                await outbox.reschedule(CONSUMER, job_id, taken_ms, now + RECEIVER_BUSY_MS, KEEP)
                return
            self._per_receiver[receiver] += 1
            try:
                attempt = await self._attempt(delivery)
            finally:
                self._per_receiver[receiver] -= 1
            if attempt.ok:
                await outbox.settle(CONSUMER, record, self._token, "done")
                metrics.webhook_deliveries.labels("delivered").inc()
                continue
            now = now_ms()
            if now - record.at_ms >= GIVE_UP_AFTER_MS:
                await outbox.settle(CONSUMER, record, self._token, "done")
                metrics.webhook_deliveries.labels("gave_up").inc()
                logger.error(
                    "webhook %s of job %s given up after %d attempts over a day",
                    delivery.event,
                    job_id,
                    record.failed_attempts + 1,
                    extra={"event": "webhook.gave_up", "job_id": job_id},
                )
                continue
            retry_ms = now + round(backoff_s(self._settings.webhook_backoff_s, record.failed_attempts + 1) * 1000)
            await outbox.settle(CONSUMER, record, self._token, "retry", retry_ms)
            await outbox.reschedule(CONSUMER, job_id, taken_ms, retry_ms, record.at_ms)
            return

    async def _attempt(self, delivery: Delivery) -> Attempt:
        """POST the delivery once; log it, count it, leave a breadcrumb."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                status = await self._post(delivery)
            attempt = Attempt("ok", str(status)) if 200 <= status < 300 else Attempt("http_error", f"answered {status}")
        except (TimeoutError, httpx.TimeoutException):
            attempt = Attempt("timeout", f"no answer within {ATTEMPT_TIMEOUT_S:.0f} s")
        except TargetRefused as exc:
            attempt = Attempt("refused", f"the URL {exc}")
        except httpx.HTTPError as exc:
            attempt = Attempt("connection_error", type(exc).__name__)
        except OSError as exc:  # the name did not resolve
            attempt = Attempt("dns_error", str(exc) or type(exc).__name__)
        except Exception as exc:  # retried and given up as any failure, never stuck on its lease
            logger.exception("webhook %s of job %s: unexpected error", delivery.event, delivery.record.job_id)
            attempt = Attempt("error", type(exc).__name__)
        self._account(delivery, attempt, time.monotonic() - started)
        return attempt

    async def _post(self, delivery: Delivery) -> int:
        assert self._http is not None
        url = parse(delivery.url)
        host = host_of(url)
        headers = {
            "content-type": "application/json",
            "user-agent": f"jobstream/{__version__}",
            "webhook-id": delivery.message_id,
        }
        target, extensions = url, {}
        if delivery.checked and not is_allowed_host(url, self._settings.webhook_allowed_hosts):
            addresses = await resolve(url)
            check_addresses(url, addresses)
            # Connect to the address just checked, naming the host as the URL does.
            target = url.copy_with(host=addresses[0])
            headers["host"] = url.netloc.decode("ascii")
            if url.scheme == "https":
                extensions["sni_hostname"] = host
        timestamp = int(time.time())
        headers["webhook-timestamp"] = str(timestamp)
        if self._signer is not None:
            when = datetime.fromtimestamp(timestamp, UTC)
            headers["webhook-signature"] = self._signer.sign(delivery.message_id, when, delivery.body.decode())
        elif not self._warned_unsigned:
            self._warned_unsigned = True
            logger.warning("JOBSTREAM_WEBHOOK_SECRET is not set: webhook deliveries go unsigned")
        request = self._http.build_request(
            "POST", target, headers=headers, content=delivery.body, extensions=extensions
        )
        response = await self._http.send(request, stream=True)
        await response.aclose()  # the answer's body is not read: only its status counts
        return response.status_code

    def _account(self, delivery: Delivery, attempt: Attempt, elapsed_s: float) -> None:
        record = delivery.record
        number = record.failed_attempts + 1
        metrics.webhook_attempts.labels(attempt.result).inc()
        host = urlsplit(delivery.url).hostname or "?"
        fields = {"webhook_event": delivery.event, "attempt": number, "result": attempt.result, "host": host}
        sentry.webhook_breadcrumb(record.job_id, delivery.event, **fields, detail=attempt.detail)
        log = logger.info if attempt.ok else logger.warning
        log(
            "webhook %s of job %s to %s: %s (attempt %d, %.0f ms)",
            delivery.event,
            record.job_id,
            host,
            "delivered" if attempt.ok else attempt.detail,
            number,
            elapsed_s * 1000,
            extra={"event": "webhook.attempt", "job_id": record.job_id, **fields},
        )


async def _first(*events: asyncio.Event) -> None:
    """Until any of the events is set."""
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
