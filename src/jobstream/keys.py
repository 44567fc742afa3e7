"""The Redis key schema: the only place key names are spelled. No I/O here.

Every key of one job carries the job id as a hash tag (``{<id>}``) so that, on a Redis
Cluster, a job's metadata and stream share one slot and a Lua script may touch both.
"""

from __future__ import annotations

import hashlib

prefix = "jobstream"
#: Work queue: a stream read by a consumer group.
queue_key = f"{prefix}:queue"
queue_group = "workers"
#: Users with jobs waiting for a running slot (fairness.py): a sorted set, user -> when to look next.
parked_key = f"{prefix}:parked"
#: Prefix handed to the `limits` library for create rate limiting.
rate_limit_prefix = f"{prefix}:rate"


def meta_key(job_id: str) -> str:
    return f"{prefix}:{{{job_id}}}:meta"


def events_key(job_id: str) -> str:
    return f"{prefix}:{{{job_id}}}:events"


def output_key(job_id: str) -> str:
    """The job's snapshot text: every delta's text so far, appended by the script that appends them."""
    return f"{prefix}:{{{job_id}}}:output"


def outbox_key(job_id: str) -> str:
    """The job's outbox (outbox.py): a stream of what its status moves must be followed by (a
    webhook delivery), written by the script that moves it (which names it from ``meta_key``'s
    name: keep both ending as they do). Outlives the job's own keys."""
    return f"{prefix}:{{{job_id}}}:outbox"


def outbox_state_key(job_id: str) -> str:
    """How far each consumer of the job's outbox has got, its retries and its lease: a hash."""
    return f"{prefix}:{{{job_id}}}:outbox:state"


def outbox_due_key(consumer: str) -> str:
    """Jobs a consumer of outboxes must look at, scored by when (epoch ms). Its own slot, shared
    with ``outbox_backlog_key`` of the same consumer."""
    return f"{prefix}:{{outbox:{consumer}}}:due"


def outbox_backlog_key(consumer: str) -> str:
    """Jobs with records a consumer has not settled, scored by the oldest one's time (epoch ms)."""
    return f"{prefix}:{{outbox:{consumer}}}:backlog"


def live_channel(job_id: str) -> str:
    """Pub/sub channel on which appends publish their events, for the gateways' hubs."""
    return f"{prefix}:{{{job_id}}}:live"


def user_feed(user: str, tag: str) -> str:
    """The hub's name for a user's tag feed (as a job id names a job's): its live channel carries
    the id of each new job of ``user`` with ``tag``, for readers that follow the tag."""
    return f"u:{_user_digest(user)}:tag:{tag}"


def is_user_feed(name: str) -> bool:
    """Whether a hub channel's name is a user feed's rather than a job's id (a uuid)."""
    return name.startswith("u:")


def idempotency_key(user: str, key: str) -> str:
    # Hashing keeps arbitrary client text out of key names.
    digest = hashlib.sha256(f"{user}\0{key}".encode()).hexdigest()
    return f"{prefix}:idem:{digest}"


def sse_leases_key(user: str) -> str:
    return f"{prefix}:sse:{_user_digest(user)}"


def token_sse_leases_key(job_id: str) -> str:
    """The event streams of one job's read-token readers, counted per job (not against its owner)."""
    return f"{prefix}:{{{job_id}}}:sse"


def long_poll_leases_key(user: str) -> str:
    return f"{prefix}:longpoll:{_user_digest(user)}"


def user_key(user: str, name: str) -> str:
    """A key of one user's own data (job index, tag indexes, running jobs): every one carries the
    user's digest as a hash tag, so that on a Redis Cluster they share one slot and a Lua script
    may touch them together (never a job's keys, which live in the job's slot)."""
    return f"{user_key_prefix(user)}{name}"


def user_key_prefix(user: str) -> str:
    """What every key of ``user`` starts with (for scripts that name a user's tag keys)."""
    return f"{prefix}:{{u:{_user_digest(user)}}}:"


def _user_digest(user: str) -> str:
    """User ids come from operators' keys and JWTs: hashed, they never shape a key."""
    return hashlib.sha256(user.encode()).hexdigest()[:32]
