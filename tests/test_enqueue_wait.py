"""With `enqueue_wait_replicas`, a producer moves its position on only once Redis replicas hold
the jobs it published (Redis WAIT): a redis-server of the test's own with a real replica
(`--replicaof`), a crawl of a local folder, and the replica stopped."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from pipeline_support import free_port
from redis_server import RedisServer, own_redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from capworks.producer.crawl import run_crawl
from capworks.producer.enqueue import make_publisher
from capworks.producer.events.bulk import BulkSender
from capworks.producer.events.records import ObjectCreated
from capworks.producer.events.sink import EventSink, Outcome
from capworks.producer.replicas import ReplicasBehind, wait_for_replicas
from capworks.schema.db import connect
from capworks.schema.queue import make_celery
from capworks.schema.settings import Settings
from capworks.schema.tables import Crawl

IDENTITY = ("m", "r", "h")


@dataclass
class Replicated:
    primary: RedisServer
    replica: RedisServer

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.primary.url)

    def replica_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.replica.url)

    def start_replica(self) -> None:
        self.replica.start()
        deadline = time.monotonic() + 20
        while self.replica_client().info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, self.replica_client().info("replication")
            time.sleep(0.1)


@pytest.fixture()
def replicated(tmp_path: Path) -> Iterator[Replicated]:
    with own_redis(tmp_path / "primary") as primary:
        args = ["--replicaof", "127.0.0.1", str(primary.port)]
        pair = Replicated(primary, RedisServer(free_port(), tmp_path / "replica", args))
        pair.start_replica()
        try:
            yield pair
        finally:
            pair.replica.stop()


def write_files(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not read by the crawl")


def crawl(pair: Replicated, folder: Path, db: Engine, queue: str) -> None:
    settings = Settings(
        broker_url=pair.primary.url,
        queue_name=queue,
        enqueue_wait_replicas=1,
        enqueue_wait_timeout_ms=300,
    )
    run_crawl(
        str(folder),
        crawl_id="c1",
        db=db,
        publisher=make_publisher(settings),
        s3_client=None,
        identity=IDENTITY,
        job_images=2,
    )


def position(db: Engine) -> tuple[str | None, str, bool]:
    """The crawl's committed position, its state, and whether a page is pending."""
    with Session(db) as session:
        row = session.get(Crawl, "c1")
        assert row is not None
        return row.last_key, row.state, row.pending_job is not None


def test_wait_counts_the_replica_that_holds_a_write_made_on_another_connection(
    replicated: Replicated,
) -> None:
    publisher_side, waiter = replicated.client(), replicated.client()
    publisher_side.lpush("jobs", b"job")  # another connection: WAIT alone would not count it
    wait_for_replicas(waiter, 1, 1000)
    assert replicated.replica_client().lrange("jobs", 0, -1) == [b"job"]
    assert waiter.wait(1, 1000) == 1


def test_the_crawl_position_moves_on_only_once_a_replica_holds_the_jobs(
    replicated: Replicated, tmp_path: Path
) -> None:
    db = connect(f"sqlite:///{tmp_path / 'capworks.db'}")
    queue = f"test-wait-{uuid.uuid4().hex[:8]}"
    photos = tmp_path / "photos"
    write_files(photos, ["a.png", "b.png", "c.png"])
    crawl(replicated, photos, db, queue)
    assert position(db) == (str(photos / "c.png"), "done", False)
    assert replicated.replica_client().llen(queue) == 2  # 3 images, 2 per job

    replicated.replica.stop()
    write_files(photos, ["d.png", "e.png"])
    with pytest.raises(ReplicasBehind, match="0 of 1 Redis replicas"):
        crawl(replicated, photos, db, queue)
    # Published to the primary, but the page stays pending and the position where it was.
    assert replicated.client().llen(queue) == 5
    last_key, state, pending = position(db)
    assert (state, pending) == ("running", True)
    assert last_key is None  # the re-run started from the top; no page of it was committed

    replicated.start_replica()
    crawl(replicated, photos, db, queue)  # the pending page is confirmed, not sent again
    assert position(db) == (str(photos / "e.png"), "done", False)
    assert replicated.client().llen(queue) == 5
    assert replicated.replica_client().llen(queue) == 5
    db.dispose()


def test_an_event_batch_no_replica_holds_is_not_acknowledged_and_its_retry_publishes(
    replicated: Replicated, tmp_path: Path
) -> None:
    queue = f"test-wait-{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=replicated.primary.url, queue_name=queue)
    primary = replicated.client()
    sender = BulkSender(make_celery(settings), primary, queue)
    db = connect(f"sqlite:///{tmp_path / 'capworks.db'}")
    sink = EventSink(sender.send, primary, IDENTITY, db, wait_replicas=1, wait_timeout_ms=300)
    try:
        assert sink.publish([ObjectCreated("b", "one.png", etag="e1")]) == [Outcome.PUBLISHED]
        replicated.replica.stop()
        late = ObjectCreated("b", "two.png", etag="e2")
        # What the webhook answers 503 to, SQS leaves undeleted, the filer does not commit.
        with pytest.raises(ReplicasBehind):
            sink.publish([late])
        replicated.start_replica()
        assert sink.publish([late]) == [Outcome.PUBLISHED]  # no claim was left behind
        assert replicated.replica_client().llen(queue) == 3  # the first try's copy, and the retry
    finally:
        sender.close()
        db.dispose()


def test_without_the_setting_the_position_moves_on_with_no_replica(tmp_path: Path) -> None:
    # What RELIABILITY.md warns of: nothing waits for a copy of the publish.
    with own_redis(tmp_path / "alone") as server:
        db = connect(f"sqlite:///{tmp_path / 'capworks.db'}")
        photos = tmp_path / "photos"
        write_files(photos, ["a.png"])
        settings = Settings(broker_url=server.url, queue_name="q")
        run_crawl(
            str(photos),
            crawl_id="c1",
            db=db,
            publisher=make_publisher(settings),
            s3_client=None,
            identity=IDENTITY,
        )
        assert position(db) == (str(photos / "a.png"), "done", False)
        db.dispose()
