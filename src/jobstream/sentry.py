"""Sentry, on when JOBSTREAM_SENTRY_DSN is set: errors with context, traces from a create request
to the worker's run of the job, job lifecycle breadcrumbs, and nothing secret in what is sent.
Every function here is a cheap no-op while Sentry is off."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.integrations.starlette import StarletteIntegration
from sentry_sdk.tracing import TransactionSource
from starlette.requests import ClientDisconnect

from jobstream.redaction import redact
from jobstream.settings import Settings

FILTERED = "[Filtered]"
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})
#: Meta fields that carry a create request's trace to the worker that runs the job.
TRACE_FIELD = "sentry_trace"
BAGGAGE_FIELD = "sentry_baggage"


class Scrubber:
    """``before_send`` for errors and transactions: headers that carry credentials, token query
    parameters, JWTs and the configured API keys and secrets become [Filtered], wherever they are."""

    def __init__(self, secrets: list[str]) -> None:
        self._secrets = sorted((secret for secret in secrets if len(secret) >= 4), key=len, reverse=True)

    def text(self, value: str) -> str:
        value = redact(value, FILTERED)
        for secret in self._secrets:
            value = value.replace(secret, FILTERED)
        return value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {
                key: FILTERED if str(key).lower() in _SECRET_HEADERS else self.value(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(item) for item in value]
        return value

    def event(self, event: Any, hint: Any) -> Any:
        return self.value(event)

    def breadcrumb(self, crumb: Any, hint: Any) -> Any:
        return self.value(crumb)


def init(settings: Settings, component: str) -> bool:
    """Start the SDK for a gateway or worker process; False when no DSN is configured."""
    if not settings.sentry_dsn:
        return False
    from jobstream import __version__  # the package's __init__ imports this module's users

    scrubber = Scrubber([*settings.api_keys, settings.token_secret, settings.jwt_secret or ""])
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment,
        release=settings.sentry_release or f"jobstream@{__version__}",
        traces_sample_rate=settings.sentry_traces_sample_rate,
        profiles_sample_rate=settings.sentry_profiles_sample_rate,
        send_default_pii=False,
        before_send=scrubber.event,
        before_send_transaction=scrubber.event,
        before_breadcrumb=scrubber.breadcrumb,
        # A client that hangs up mid-request is not an error of the gateway's (errors.py logs it).
        ignore_errors=[ClientDisconnect],
        integrations=[
            # Transactions named by route template, not by URL (job ids would make each unique).
            StarletteIntegration(transaction_style="url"),
            # Log lines become breadcrumbs; errors are captured where they happen, not twice.
            LoggingIntegration(level=logging.INFO, event_level=None),
        ],
    )
    sentry_sdk.set_tag("component", component)
    return True


def active() -> bool:
    return sentry_sdk.get_client().is_active()


def trace_fields() -> dict[str, str]:
    """The current trace, to store with a job created now (empty while Sentry is off)."""
    if not active():
        return {}
    fields = {TRACE_FIELD: sentry_sdk.get_traceparent(), BAGGAGE_FIELD: sentry_sdk.get_baggage()}
    return {name: value for name, value in fields.items() if value}


def name_transaction(name: str) -> None:
    """For requests served before the router (the event stream), which cannot name themselves."""
    if active():
        sentry_sdk.get_current_scope().set_transaction_name(name, source=TransactionSource.ROUTE)


def end_stream_transaction() -> None:
    """End the request's transaction once its event stream is set up (headers and `retry:`
    written), instead of when the first event arrives (an idle job may send none for minutes) or
    when the stream closes, up to an hour later. Deliveries are Prometheus's to count."""
    transaction = sentry_sdk.get_current_scope().transaction
    if transaction is not None and transaction.timestamp is None:
        transaction.finish()


def job_breadcrumb(transition: str, job_id: str, **data: Any) -> None:
    """One step of a job's life (created, started, progress, completed, failed, cancelled, reclaimed)."""
    sentry_sdk.add_breadcrumb(category="job", message=transition, data={"job_id": job_id, **data})


def webhook_breadcrumb(job_id: str, event: str, **data: Any) -> None:
    """One attempt to deliver a job's webhook, and how it went."""
    sentry_sdk.add_breadcrumb(category="webhook", message=event, data={"job_id": job_id, **data})


@contextmanager
def job_run(job_id: str, job_type: str, attempt: int, fields: Mapping[str, str]) -> Iterator[None]:
    """A worker's run of a job: its own scope (tags job_id, job_type, attempt) and a transaction
    that continues the trace of the request that created the job."""
    if not active():
        yield
        return
    with sentry_sdk.isolation_scope() as scope:
        scope.set_tags({"job_id": job_id, "job_type": job_type, "attempt": attempt})
        headers = {"sentry-trace": fields.get(TRACE_FIELD, ""), "baggage": fields.get(BAGGAGE_FIELD, "")}
        transaction = sentry_sdk.continue_trace(
            headers, op="queue.process", name=f"job {job_type}", source=TransactionSource.TASK
        )
        with sentry_sdk.start_transaction(transaction):
            yield


def capture(exc: BaseException) -> None:
    sentry_sdk.capture_exception(exc)
