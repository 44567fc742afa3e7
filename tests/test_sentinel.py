"""Redis Sentinel: the master is killed mid-job, Sentinel promotes its replica, and the gateway,
the worker and an open reader carry on by themselves.

Replication is asynchronous: an append the old master acknowledged but had not yet sent to its
replica is lost with it. The reader then sees every event the new master has, in order and
once, and the job still ends; at most the events of the last moments before the crash are
missing (README: "Redis Sentinel").
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from httpx_sse import ServerSentEvent

from jobstream.devredis import EmbeddedRedis, free_port, redis_server_binary
from jobstream.settings import Settings
from tests.conftest import LiveStack, make_settings
from tests.helpers import wait_until
from tests.test_faults import assert_story_survived_failover, follow_with_resume, start_story, story_being_read

MASTER_NAME = "jobstream"


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis, int]]:
    master = EmbeddedRedis().start()
    replica = EmbeddedRedis(extra_args=["--replicaof", "127.0.0.1", str(master.port)]).start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
        f"sentinel failover-timeout {MASTER_NAME} 5000\n"
    )
    sentinel = subprocess.Popen(
        [str(redis_server_binary()), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(
            lambda: _replicas_known(port) >= 1, timeout_s=20, interval_s=0.1, message="sentinel never saw the replica"
        )
        yield master, replica, port
    finally:
        sentinel.terminate()
        sentinel.wait(timeout=10)
        replica.stop()
        master.stop()


def _replicas_known(port: int) -> int:
    try:
        with redis.Redis(port=port, socket_timeout=1) as sentinel:
            return len(sentinel.sentinel_slaves(MASTER_NAME))
    except redis.RedisError:
        return 0


def _master_port(port: int) -> int:
    with redis.Redis(port=port, socket_timeout=1) as sentinel:
        return int(sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)[1])


def test_sentinel_whenMasterKilledMidJob_thenReplicaPromotedAndEveryoneCarriesOn(
    sentinel_setup: tuple[EmbeddedRedis, EmbeddedRedis, int],
) -> None:
    master, replica, sentinel_port = sentinel_setup
    settings = make_settings(
        f"redis://127.0.0.1:{master.port}/0",  # used only for the rate limiter's URL scheme
        redis_sentinels=[f"127.0.0.1:{sentinel_port}"],
        redis_master_name=MASTER_NAME,
        heartbeat_s=0.5,
        retry_ms=200,
        demo=True,
    )
    stack = LiveStack(settings).start()
    try:
        with (
            stack.client() as http,
            story_being_read(http, [stack.base_url], words=80, delay_ms=60, started=10) as (job, reading),
        ):
            assert master.process is not None
            master.process.kill()  # no shutdown: whatever was not replicated is gone
            wait_until(
                lambda: _master_port(sentinel_port) == replica.port,
                timeout_s=20,
                interval_s=0.1,
                message="sentinel did not promote the replica",
            )
            events = reading.result(timeout=60)
            assert http.get("/readyz").status_code == 200
    finally:
        stack.stop()
    assert_story_survived_failover(events, job["id"], 80)


def test_settings_whenSentinelsMalformed_thenStartupRefused(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobstream.settings import SettingsError, load_settings

    monkeypatch.setenv("JOBSTREAM_REDIS_SENTINELS", "10.0.0.1:26379, 10.0.0.2")
    with pytest.raises(SettingsError, match="JOBSTREAM_REDIS_SENTINELS"):
        load_settings()
    monkeypatch.setenv("JOBSTREAM_REDIS_SENTINELS", "10.0.0.1:26379,[::1]:26380")
    assert load_settings().sentinel_addresses == [("10.0.0.1", 26379), ("[::1]", 26380)]


def _short_story(settings: Settings) -> tuple[dict[str, Any], list[ServerSentEvent]]:
    stack = LiveStack(settings.model_copy(update={"demo": True})).start()
    try:
        with stack.client() as http:
            job = start_story(http, words=3, delay_ms=0)
            return job, follow_with_resume([stack.base_url], job)
    finally:
        stack.stop()


def _wait_calls(port: int) -> int:
    with redis.Redis(port=port, decode_responses=True) as client:
        return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def test_durableEnd_whenReplicasAsked_thenEndingWaitsForThem(
    sentinel_setup: tuple[EmbeddedRedis, EmbeddedRedis, int],
) -> None:
    master, replica, sentinel_port = sentinel_setup
    settings = make_settings(master.url, redis_sentinels=[f"127.0.0.1:{sentinel_port}"], redis_master_name=MASTER_NAME)
    job, events = _short_story(settings.model_copy(update={"durable_end_replicas": 1}))
    assert events[-1].json() == {"status": "completed"}
    assert _wait_calls(master.port) >= 1  # the ending went through WAIT on the master
    with redis.Redis(port=replica.port, decode_responses=True) as on_replica:
        assert on_replica.hget(f"jobstream:{{{job['id']}}}:meta", "status") == "completed"


def test_durableEnd_whenNoReplicaAnswers_thenJobStillEndsAndItIsLogged(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(redis_url, durable_end_replicas=1, durable_end_timeout_ms=50)
    _, events = _short_story(settings)
    assert events[-1].json() == {"status": "completed"}
    assert any("of 1 replicas" in record.getMessage() for record in caplog.records)
