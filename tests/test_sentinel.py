"""`sentinel://` broker URLs (schema/sentinel.py): the settings that name them, and every Redis
client capworks opens (make_redis, Celery's reliable-fetch transport, `capworks status`)
following a failover, against a real primary, replica and three Sentinels on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from kombu import Queue
from sentinel_servers import MASTER_NAME, SentinelGroup, sentinel_group

from capworks.schema.queue import CAPTION_TASK, make_celery, make_redis
from capworks.schema.redis_transport import REGISTRY_KEY, SentinelTransport
from capworks.schema.sentinel import BadSentinelUrl, SentinelAddress, parse_sentinel_url
from capworks.schema.settings import Settings


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    with sentinel_group(tmp_path / "redis") as g:
        yield g


def settings_of(group: SentinelGroup) -> Settings:
    return Settings(
        broker_url=group.url,
        redis_master_name=MASTER_NAME,
        redis_sentinel_password=group.env()["CAPWORKS_REDIS_SENTINEL_PASSWORD"],
        queue_name="capworks-sentinel-test",
    )


def test_a_sentinel_url_names_every_sentinel_the_database_and_the_password() -> None:
    url = "sentinel://:p%40ss@10.0.0.1:26380/3;sentinel://10.0.0.2;sentinel://10.0.0.3:1"
    assert parse_sentinel_url(url) == SentinelAddress(
        (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("10.0.0.3", 1)), 3, None, "p@ss"
    )


@pytest.mark.parametrize(
    "url",
    ["sentinel://h:1;redis://h:2", "sentinel://h:1/zero", "sentinel://h:port", "sentinel://"],
)
def test_a_sentinel_url_that_does_not_parse_is_refused(url: str) -> None:
    with pytest.raises(BadSentinelUrl):
        parse_sentinel_url(url)


def test_a_sentinel_url_without_the_primarys_name_is_one_line_and_an_exit(tmp_path: Path) -> None:
    env = {"CAPWORKS_BROKER_URL": "sentinel://:secret-pw@127.0.0.1:9;sentinel://127.0.0.1:10"}
    done = run_cli("status", "--db", f"sqlite:///{tmp_path / 'c.db'}", env=env)
    assert done.returncode != 0
    assert "CAPWORKS_REDIS_MASTER_NAME" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "secret-pw" not in done.stderr


def test_make_redis_follows_the_primary_after_a_failover(group: SentinelGroup) -> None:
    client = make_redis(settings_of(group), socket_timeout_s=2)
    client.set("before", "1")
    group.wait(lambda: group.new_primary().get("before") == b"1", 10, "the write replicated")
    group.kill_primary()
    group.wait_failover()
    # The same client: its next connection asks the Sentinels again (a first call may fail).
    group.wait(lambda: client.set("after", "2"), 30, "a write through the old client")
    assert group.new_primary().get("after") == b"2"
    assert group.new_primary().info("replication")["role"] == "master"


def publish_and_fetch(settings: Settings, body: dict[str, int]) -> list[object]:
    """Publish `body` with capworks' Celery app and take it back with its transport's fetch."""
    app = make_celery(settings)
    queue = Queue(settings.queue_name, routing_key=settings.queue_name)
    got: list[object] = []
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, SentinelTransport)
        with conn.Producer() as producer:
            producer.publish(body, routing_key=settings.queue_name, declare=[queue])
        with conn.Consumer(queue, callbacks=[lambda b, m: (got.append(b), m.ack())]):
            conn.drain_events(timeout=10)
    return got


def test_the_reliable_fetch_takes_jobs_from_the_primary_the_sentinels_name(
    group: SentinelGroup,
) -> None:
    settings = settings_of(group)
    assert publish_and_fetch(settings, {"n": 1}) == [{"n": 1}]
    group.kill_primary()
    group.wait_failover()
    assert publish_and_fetch(settings, {"n": 2}) == [{"n": 2}]
    primary = group.new_primary()
    # Taken with BLMOVE through a registered fetching list, on the promoted replica.
    assert primary.zcard(REGISTRY_KEY) >= 1
    assert primary.llen(settings.queue_name) == 0 and primary.hlen("unacked") == 0


def test_status_reads_the_farm_through_the_sentinels(group: SentinelGroup, tmp_path: Path) -> None:
    env = {**group.env(), "CAPWORKS_QUEUE_NAME": "capworks-sentinel-test"}
    db = f"sqlite:///{tmp_path / 'c.db'}"
    make_celery(settings_of(group)).send_task(CAPTION_TASK, args=[{"id": "j1", "images": []}])
    for failover in (False, True):
        if failover:  # the job replicated; then the same command finds the new primary
            group.wait(lambda: group.new_primary().llen(env["CAPWORKS_QUEUE_NAME"]), 10, "a copy")
            group.kill_primary()
            group.wait_failover()
        done = run_cli("status", "--json", "--db", db, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["queue"]["jobs_waiting"] == 1


def test_a_dead_sentinel_group_is_a_one_line_status_error(tmp_path: Path) -> None:
    env = {
        "CAPWORKS_BROKER_URL": "sentinel://127.0.0.1:9",
        "CAPWORKS_REDIS_MASTER_NAME": "nobody",
    }
    done = run_cli("status", "--db", f"sqlite:///{tmp_path / 'c.db'}", env=env)
    assert done.returncode != 0
    assert "Sentinel primary nobody" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
