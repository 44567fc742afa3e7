"""Issue 14: each job endpoint reads and writes Redis in one round trip where one does, with the
same answers, in the same order of checks (404 bad id, 401, 404 gone, 403, then the request's own
400/409/413/415/422), and the status document encoded once, byte for byte as before."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from jobstream import keys
from jobstream.models import TAG_PATTERN, iso, to_json
from jobstream.store import JobRecord
from tests.conftest import ALICE, BOB, LiveStack, append, create_job
from tests.helpers import assert_problem, redis_commands_of, wait_until

#: Commands that are not a request's own: connection set-up, health checks.


def _calls(rdb: redis.Redis, name: str) -> int:
    stats = rdb.info("commandstats").get(f"cmdstat_{name}")
    return int(stats["calls"]) if stats else 0


def _oldest(rdb: redis.Redis, job: dict[str, Any]) -> str:
    entries = cast(list[tuple[str, dict[str, str]]], rdb.xrange(keys.events_key(job["id"]), count=1))
    return entries[0][0]


def test_status_whenRead_thenOneCommand(gateway: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(gateway)
    assert redis_commands_of(rdb, lambda: gateway.get(f"/v1/jobs/{job['id']}", headers=ALICE)) == ["hgetall"]


def test_status_whenRead_thenTheViewOfTheRecordEncodedOnce(gateway: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(gateway, input={"big": "x" * 10_000})
    url = f"/v1/jobs/{job['id']}"
    for events in ([], {"type": "progress", "data": {"current": 1, "total": 3}}, {"type": "result", "data": {"a": 1}}):
        if events:
            append(gateway, job, events)
        whole = JobRecord(cast(dict[str, str], rdb.hgetall(keys.meta_key(job["id"]))))
        response = gateway.get(url, headers=ALICE)
        assert response.content == to_json(whole.view()).encode()
        assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("after", [None, "$", "first", "trimmed"])
def test_poll_whenShort_thenOneScript(
    make_stack: Callable[..., LiveStack], rdb: redis.Redis, after: str | None
) -> None:
    with make_stack(with_worker=False, stream_maxlen=10).client() as http:
        job = create_job(http)
        ids = append(http, job, [{"type": "delta", "data": {"text": str(i)}} for i in range(400)])
        cursor = {None: None, "$": "$", "first": ids[-5], "trimmed": ids[0]}[after]
        params = {"token": job["token"], **({"after": cursor} if cursor else {})}
        url = f"/v1/jobs/{job['id']}/poll"
        assert redis_commands_of(rdb, lambda: http.get(url, params=params)) == ["evalsha"]
        body = http.get(url, params=params).json()
        if after == "trimmed":
            oldest = _oldest(rdb, job)
            assert body["truncated"] == {"first_id": oldest} and body["events"][0]["id"] == oldest
        elif after == "$":
            assert body["events"] == [] and body["next"] == ids[-1]


def test_append_whenOneEvent_thenOneScript(gateway: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(gateway)
    url = f"/v1/jobs/{job['id']}/events"
    event = {"type": "delta", "data": {"text": "x"}}
    assert redis_commands_of(rdb, lambda: gateway.post(url, json=event, headers=ALICE)) == ["evalsha"]


def test_cancelAndDelete_whenOwner_thenOneRoundTripEach(gateway: httpx.Client, rdb: redis.Redis) -> None:
    jobs = iter([create_job(gateway, "test.echo") for _ in range(4)])
    # A cancel that ends the job here (no worker holds it) moves its status: the owner's index (in
    # the owner's slot) takes it in a second step. (One a worker carries out is one script.)
    assert redis_commands_of(rdb, lambda: gateway.post(f"/v1/jobs/{next(jobs)['id']}/cancel", headers=ALICE)) == [
        "evalsha",
        "evalsha",
    ]
    # A delete and the owner's index entry: one pipeline (MONITOR shows its two commands).
    assert redis_commands_of(rdb, lambda: gateway.delete(f"/v1/jobs/{next(jobs)['id']}", headers=ALICE)) == [
        "evalsha",
        "evalsha",
    ]


@pytest.mark.parametrize("action", ["cancel", "delete"])
def test_cancelAndDelete_whenRefused_thenSameAnswersInOrder(
    gateway: httpx.Client, rdb: redis.Redis, action: str
) -> None:
    job = create_job(gateway)
    gone = create_job(gateway)
    rdb.delete(keys.meta_key(gone["id"]))

    def act(target: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
        if action == "cancel":
            return gateway.post(f"/v1/jobs/{target['id']}/cancel", headers=headers)
        return gateway.delete(f"/v1/jobs/{target['id']}", headers=headers)

    assert_problem(act(gone, ALICE), 404)
    assert_problem(act(gone, {"Authorization": f"Bearer {gone['token']}"}), 404)
    assert_problem(act(job, {"Authorization": f"Bearer {job['token']}"}), 403)
    body = assert_problem(act(job, BOB), 403)
    assert body["detail"] == "This job belongs to another user or token."
    assert rdb.hget(keys.meta_key(job["id"]), "status") == "pending" and not rdb.hget(
        keys.meta_key(job["id"]), "cancel"
    )
    assert act(job, ALICE).status_code == (202 if action == "cancel" else 204)
    assert_problem(act(job, ALICE), 409 if action == "cancel" else 404)


@pytest.mark.parametrize("job_type", ["external", "test.echo"])
def test_create_whenStored_thenOneScriptBesidesTheRateLimit(
    gateway: httpx.Client, rdb: redis.Redis, job_type: str
) -> None:
    sent = redis_commands_of(rdb, lambda: gateway.post("/v1/jobs", json={"type": job_type}, headers=ALICE))
    # After the rate limit's script: one pipeline of the owner's index entry and the job's script
    # (its metadata, TTL and, for a worker's job, its place in the queue), sent by digest alone
    # (no SCRIPT EXISTS first, as redis-py's pipelines would).
    assert sent[-2:] == ["evalsha", "evalsha"], sent
    assert not {"multi", "hset", "expire", "xadd", "get", "exists", "script"} & set(sent), sent
    job = create_job(gateway, job_type)
    assert rdb.ttl(keys.meta_key(job["id"])) > 0
    entries = cast(list[tuple[str, dict[str, str]]], rdb.xrange(keys.queue_key))
    queued = [fields["job"] for _, fields in entries]
    assert (job["id"] in queued) is (job_type != "external")


def test_append_whenBodyInvalid_thenJobChecksAnsweredFirst(gateway: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(gateway)
    worker_job = create_job(gateway, "test.echo")
    gone = create_job(gateway)
    rdb.delete(keys.meta_key(gone["id"]))
    bad = {"type": "delta", "data": {"text": 5}}

    def post(target: dict[str, Any], headers: dict[str, str], body: Any = bad, **kwargs: Any) -> httpx.Response:
        return gateway.post(f"/v1/jobs/{target['id']}/events", json=body, headers=headers, **kwargs)

    assert_problem(post(gone, ALICE), 404)
    assert_problem(post(job, BOB), 403)
    assert_problem(post(job, {"Authorization": f"Bearer {job['token']}"}), 403)
    assert_problem(post(worker_job, ALICE), 409)
    assert_problem(post(job, ALICE), 422)
    too_large = {"type": "delta", "data": {"text": "x" * 70_000}}
    assert_problem(post(worker_job, ALICE, too_large), 409)
    assert_problem(post(job, ALICE, too_large), 413)
    # A valid body: the same answers, from the append script's own checks.
    good = {"type": "delta", "data": {"text": "x"}}
    assert_problem(post(gone, ALICE, good), 404)
    body = assert_problem(post(job, BOB, good), 403)
    assert body["detail"] == "This job belongs to another user or token."
    assert_problem(post(worker_job, ALICE, good), 409)
    append(gateway, job, {"type": "done", "data": {"status": "completed"}})
    assert_problem(post(job, ALICE, good), 409)
    assert_problem(post(job, ALICE), 422)  # ended, but the body is checked first, as before
    assert rdb.xlen(keys.events_key(worker_job["id"])) == 0


@pytest.mark.parametrize("endpoint", ["poll", "events"])
def test_read_whenCursorMalformed_thenJobChecksAnsweredFirst(
    gateway: httpx.Client, rdb: redis.Redis, endpoint: str
) -> None:
    job = create_job(gateway)
    other = create_job(gateway, headers=BOB)
    gone = create_job(gateway)
    rdb.delete(keys.meta_key(gone["id"]))
    name = "after" if endpoint == "poll" else "last_event_id"

    def get(target: dict[str, Any], token: str) -> httpx.Response:
        return gateway.get(f"/v1/jobs/{target['id']}/{endpoint}", params={"token": token, name: "nope"})

    assert_problem(get(gone, gone["token"]), 404)
    assert_problem(get(other, job["token"]), 403)
    assert_problem(get(job, job["token"]), 400)


def test_poll_whenReadTokenOfAnotherJob_thenNoEventsRead(gateway: httpx.Client, rdb: redis.Redis) -> None:
    job = create_job(gateway)
    other = create_job(gateway)
    append(gateway, other, {"type": "delta", "data": {"text": "secret"}})
    before = _calls(rdb, "xrange")  # calls made by scripts count too
    response = gateway.get(f"/v1/jobs/{other['id']}/poll", params={"token": job["token"]})
    assert_problem(response, 403)
    assert "secret" not in response.text and _calls(rdb, "xrange") == before


def test_longPoll_whenAnswered_thenStatusTheEventsLeave(gateway: httpx.Client, rdb: redis.Redis) -> None:
    """A long-poll answered by events tells the status they leave the job in, without reading the
    job again: a pending job's first append answers `running`, its ending `completed`."""
    job = create_job(gateway)
    url = f"/v1/jobs/{job['id']}/poll"

    def answered(after: str | None, events: Any) -> dict[str, Any]:
        """A long-poll that waits, and the answer the append of ``events`` gives it."""
        params = {"token": job["token"], "wait": "10", **({"after": after} if after else {})}
        answer: dict[str, Any] = {}
        with httpx.Client(base_url=gateway.base_url, timeout=15) as reader:
            thread = threading.Thread(target=lambda: answer.update(reader.get(url, params=params).json()))
            thread.start()
            channel = keys.live_channel(job["id"])
            wait_until(lambda: rdb.pubsub_numsub(channel)[0][1] > 0, message="the long-poll never waited")
            append(gateway, job, events)
            thread.join(10)
        return answer

    first = answered(None, {"type": "delta", "data": {"text": "a"}})
    assert first["status"] == "running" and first["done"] is False
    assert [e["type"] for e in first["events"]] == ["status", "delta"]
    middle: dict[str, Any] = {}
    sent = redis_commands_of(
        rdb, lambda: middle.update(answered(first["next"], {"type": "log", "data": {}})), warm_up=False
    )
    # One read script for the job, the cursor and the (no) events; then the slot, the hub's wait
    # and the append that answers it; no second read of the job.
    assert sent.count("hgetall") + sent.count("hmget") + sent.count("xrevrange") == 0, sent
    assert [e["type"] for e in middle["events"]] == ["log"] and middle["status"] == "running"
    last = answered(middle["next"], {"type": "result", "data": {"n": 1}})
    assert last["status"] == "completed" and last["done"] is True
    assert [e["type"] for e in last["events"]] == ["result", "done"]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(
    job_type=st.text(min_size=1, max_size=20),
    status=st.sampled_from(["pending", "running", "completed", "failed", "cancelled"]),
    stored=st.dictionaries(st.sampled_from(["progress", "error", "result", "metadata"]), _json_values),
    tags=st.lists(st.from_regex(TAG_PATTERN, fullmatch=True), max_size=3),
    times=st.dictionaries(st.sampled_from(["started_ms", "completed_ms"]), st.integers(0, 4_102_444_800_000).map(str)),
    last_event_id=st.none() | st.just("1732200000000-7"),
)
def test_viewJson_whenAnyRecord_thenTheBytesViewEncodedTo(
    job_type: str,
    status: str,
    stored: dict[str, Any],
    times: dict[str, str],
    last_event_id: str | None,
    tags: list[str],
) -> None:
    fields = {
        "id": "3b0c1c2e-9f5e-4d7a-8b1c-0123456789ab",
        "type": job_type,
        "owner": "alice",
        "status": status,
        "created_ms": "1732200000123",
        "updated_ms": "1732200000999",
        "expires_ms": "1732200600123",
        **{name: to_json(value) for name, value in stored.items()},
        **times,
        **({"last_event_id": last_event_id} if last_event_id else {}),
        **({"tags": to_json(tags)} if tags else {}),
    }
    record = JobRecord(fields)
    assert record.view_json() == to_json(record.view()).encode()
    assert json.loads(record.view_json()) == json.loads(to_json(record.view()))


def test_iso_whenAnyMillisecond_thenAsDatetimeWritesIt() -> None:
    rng = random.Random(14)
    for ms in [
        0,
        999,
        1000,
        1732200000123,
        4_102_444_799_999,
        *(rng.randrange(4_102_444_800_000) for _ in range(5000)),
    ]:
        expected = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert iso(ms) == expected
    assert iso(None) is None
