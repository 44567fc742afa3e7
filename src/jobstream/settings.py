"""Every operator setting, read once from ``JOBSTREAM_*`` environment variables and passed down."""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from typing import Annotated, Literal

from limits import parse
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: scheme://host[:port], nothing after: what a browser sends as Origin.
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOBSTREAM_", extra="ignore", frozen=True)

    #: None means "not configured": `serve` and `worker` fall back to DEFAULT_REDIS_URL,
    #: `dev` starts an embedded Redis instead.
    redis_url: str | None = None
    #: Redis Sentinel: "host:port,host:port" of the sentinels; they name the master to use.
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_master_name: str = "jobstream"
    #: Redis Cluster: JOBSTREAM_REDIS_URL names any one node; the client finds the others.
    redis_cluster: bool = False
    #: A pooled Redis connection idle this long is PINGed before its next command (0: never).
    redis_health_check_s: float = Field(30, ge=0)
    #: Sentry: on when a DSN is set.
    sentry_dsn: str | None = None
    sentry_environment: str = "production"
    #: Default: jobstream@<version>.
    sentry_release: str | None = None
    sentry_traces_sample_rate: float = Field(0.0, ge=0, le=1)
    sentry_profiles_sample_rate: float = Field(0.0, ge=0, le=1)
    #: "key1=alice,key2=bob": API key -> user id.
    api_keys: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    jwt_secret: str | None = None
    #: Signs read tokens; every gateway of a deployment must share it.
    token_secret: str = Field(default_factory=lambda: secrets.token_urlsafe(32))
    job_ttl_s: int = Field(600, ge=1)
    max_ttl_s: int = Field(86400, ge=1)
    retention_s: int = Field(600, ge=1)
    failed_retention_s: int = Field(3600, ge=1)
    stream_maxlen: int = Field(10000, ge=10)
    #: Jobs created from now on keep their deltas' text for snapshots (late joiners), up to this
    #: many bytes; past it the snapshot stops growing and the rest is replayed. 0: none kept.
    snapshot_max_bytes: int = Field(1_048_576, ge=0)
    heartbeat_s: float = Field(15, gt=0)
    max_sse_per_user: int = Field(5, ge=1)
    #: Open event streams of one job read with its read token: they count here, per job, and not
    #: against the owner's max_sse_per_user, so a shared token cannot lock its owner out.
    max_sse_per_token_job: int = Field(20, ge=1)
    sse_lease_s: int = Field(60, ge=5)
    create_rate: str = "10/minute"
    max_body_bytes: int = Field(65536, ge=256)
    sse_max_lifetime_s: float = Field(3600, gt=0)
    retry_ms: int = Field(3000, ge=0)
    #: A reader whose client takes no write for this long is dropped; it resumes from its last id.
    send_timeout_s: float = Field(30, gt=0)
    poll_max_wait_s: float = Field(30, ge=0)
    #: A request (line, headers, body) must arrive whole within this long of its first byte (of the
    #: connection's opening, for its first request); else 408 and the connection is closed.
    request_timeout_s: float = Field(15, gt=0)
    #: An idle keep-alive connection is closed after this long: above a fronting proxy's own idle
    #: timeout for its connections to gateways (nginx, AWS ALB: 60 s), so that the proxy closes first.
    keep_alive_s: int = Field(75, ge=1)
    max_long_polls_per_user: int = Field(10, ge=1)
    #: Origins allowed to call the API from a browser ("https://app.example.com,..."); none by default.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Modules imported at start-up so their @handler functions register.
    app: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: The built-in demo.* job types (at most 5 minutes a run); `jobstream dev` turns them on.
    demo: bool = False
    worker_concurrency: int = Field(10, ge=1)
    worker_lease_s: int = Field(30, ge=2)
    max_attempts: int = Field(3, ge=1)
    #: A worker starts no job whose owner has this many running already (0: no limit); the others
    #: wait, off the queue, and start oldest first as the owner's jobs end (fairness.py).
    max_running_per_user: int = Field(0, ge=0)
    delta_flush_ms: int = Field(100, ge=0)
    delta_flush_bytes: int = Field(4096, ge=1)
    shutdown_grace_s: float = Field(10, ge=0)
    #: "host:port" where `jobstream worker` serves its Prometheus metrics; off when unset.
    worker_metrics_listen: str | None = None
    #: Workers wait (Redis WAIT) until this many replicas have a job's final events before they
    #: take the job off the queue: a failover right after cannot lose how the job ended.
    durable_end_replicas: int = Field(0, ge=0)
    durable_end_timeout_ms: int = Field(1000, ge=1)
    #: Webhooks: every job's endings go here, unless its create names a webhook of its own.
    #: The operator's own URL: not checked against private addresses.
    webhook_url: str | None = None
    #: Signs deliveries (Standard Webhooks): "whsec_" and the base64 of the key. Unset: unsigned.
    webhook_secret: str | None = None
    #: The first retry of a failed delivery waits this long, each next one twice as long (to 1 h).
    webhook_backoff_s: float = Field(5, gt=0)
    #: Hosts ("host" or "host:port") a job's webhook may name although they resolve to loopback,
    #: private, link-local or multicast addresses.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Deliveries one worker process makes at once.
    webhook_concurrency: int = Field(16, ge=1)
    #: Where ended jobs are kept after Redis forgets them: sqlite:///<relative path>,
    #: sqlite:////<absolute path> or postgresql://... (archive/); None: no archive.
    archive_url: str | None = None
    #: How long the archive keeps a job after it ended.
    archive_retention_days: float = Field(30, gt=0)
    #: Where `jobstream dev` keeps its files (its archive.db); None: $XDG_DATA_HOME/jobstream, or
    #: ~/.local/share/jobstream.
    data_dir: str | None = None
    log_level: str = "INFO"
    #: "plain" lines, or "json": one object per line, for log pipelines.
    log_format: Literal["plain", "json"] = "plain"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            key, sep, user = item.partition("=")
            if not sep or not key.strip() or not user.strip():
                raise ValueError(f"expected 'key=user' pairs separated by commas, got {item!r}")
            pairs[key.strip()] = user.strip()
        return pairs

    @field_validator("app", "redis_sentinels", "cors_origins", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, items: list[str]) -> list[str]:
        for item in items:
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected sentinels as 'host:port,host:port', got {item!r}")
        return items

    @model_validator(mode="after")
    def _check_topology(self) -> Settings:
        if self.redis_cluster and self.redis_sentinels:
            raise ValueError("JOBSTREAM_REDIS_CLUSTER and JOBSTREAM_REDIS_SENTINELS exclude each other")
        if (
            self.redis_cluster
            and self.redis_url is not None
            and not self.redis_url.startswith(("redis://", "rediss://"))
        ):
            raise ValueError("a Redis Cluster is reached over TCP: JOBSTREAM_REDIS_URL must be redis:// or rediss://")
        return self

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(item.rpartition(":")[0], int(item.rpartition(":")[2])) for item in self.redis_sentinels]

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"expected origins such as 'https://app.example.com' or '*', got {origin!r}")
        return origins

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _lower_hosts(cls, hosts: list[str]) -> list[str]:
        return [host.lower() for host in hosts]

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/?#\s]+", value):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: str | None) -> str | None:
        if value is None:
            return value
        body = value.removeprefix("whsec_")
        try:
            key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except binascii.Error:
            key = b""
        if not value.startswith("whsec_") or not key:
            raise ValueError("expected 'whsec_' followed by the base64 of the signing key")
        return value

    @field_validator("create_rate")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"expected a rate such as '10/minute', got {value!r}") from exc
        return value

    @field_validator("worker_metrics_listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            _, _, port = value.rpartition(":")
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected 'host:port' (or ':port'), got {value!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {value!r}")
        return value

    @field_validator("archive_url")
    @classmethod
    def _check_archive_url(cls, value: str | None) -> str | None:
        if value is not None:
            # Imported here: the archive package imports the store, which imports this module.
            from jobstream.archive import parse_url

            parse_url(value)
        return value

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL


class SettingsError(Exception):
    """Invalid configuration, with a one-line message naming each bad variable."""


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"JOBSTREAM_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None


def default_data_dir() -> str:
    """$XDG_DATA_HOME/jobstream (~/.local/share/jobstream when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "jobstream")
