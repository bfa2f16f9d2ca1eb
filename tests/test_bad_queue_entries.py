"""Entries in the queue that are not Celery messages (someone's LPUSH, a foreign producer, a
hand-edited message) are moved to the queue's quarantine list and kept in `bad_messages`; the
worker that met them lives on and captions the good jobs behind them. Real Redis, PostgreSQL
and a Celery worker process (the small random checkpoint)."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pipeline_support
import pytest
from conftest import png_bytes
from kombu import Connection, Consumer, Exchange, Producer, Queue
from pipeline_support import captions, live_redis, own_queue, query, wait_until
from sqlalchemy import select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.db import connect
from capworks.schema.redis_transport import (
    BadEntry,
    envelope_of,
    quarantine_entry,
    quarantine_key,
    record_quarantined_with,
)
from capworks.schema.tables import BadMessage

GARBAGE = b"not a kombu message \xff\xfe"
NOT_AN_ENVELOPE = b'{"job": "an object, but no kombu properties"}'
NO_DELIVERY_TAG = json.dumps(
    {
        "body": base64.b64encode(b"[[], {}, {}]").decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {},
        "properties": {
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": "q"},
            "delivery_mode": 2,
            "priority": 0,
        },
    }
).encode()
BAD_ENTRIES = [GARBAGE, NOT_AN_ENVELOPE, NO_DELIVERY_TAG]
TRANSPORT = "capworks.schema.redis_transport:Transport"


def write_images(folder: Path, count: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, _) in enumerate(sample_scenes(count, seed)):
        path = folder / f"good {i:02d}.png"
        path.write_bytes(png_bytes(img))
        paths.append(str(path))
    return paths


def bad_message_rows(db_url: str) -> list[tuple[str, str, str]]:
    stmt = select(BadMessage.job_key, BadMessage.reason, BadMessage.body).order_by(BadMessage.id)
    return query(db_url, lambda conn: [tuple(r) for r in conn.execute(stmt).all()])  # type: ignore[no-any-return]


@pytest.mark.parametrize("entry", BAD_ENTRIES, ids=["garbage", "not-an-envelope", "no-tag"])
def test_an_entry_that_is_not_a_kombu_message_is_named_bad(entry: bytes) -> None:
    with pytest.raises(BadEntry):
        envelope_of(entry)


@pytest.mark.slow
def test_bad_queue_entries_are_quarantined_and_the_good_jobs_behind_them_captioned(
    pg_url: str, tiny_dir: Path, tmp_path: Path
) -> None:
    connect(pg_url).dispose()  # migrated before the worker starts
    with own_queue(pg_url, tmp_path) as p:
        # Any caption will do here: the small random checkpoint.
        p.extra_env.update(CAPWORKS_JOB_IMAGES="1", CAPWORKS_MODEL="tiny-random")
        r = live_redis()
        # The consumer takes from the right: what is pushed first is taken first.
        r.lpush(p.queue, *BAD_ENTRIES)
        good = write_images(tmp_path / "photos", 4, seed=81)
        enqueued = p.cli("enqueue", str(tmp_path / "photos"), "--no-progress")
        assert enqueued.returncode == 0, enqueued.stderr
        worker = p.start_worker(concurrency=2)

        def done() -> bool:
            assert worker.poll() is None, f"the worker died:\n{p.log_text()[-4000:]}"
            return set(captions(p.db_url)) == set(good) and p.queue_length() == 0

        wait_until(done, 240, "the 4 good jobs' captions", lambda: p.log_text()[-4000:])
        assert worker.poll() is None
        assert "Unrecoverable error" not in p.log_text()
        assert r.lrange(quarantine_key(p.queue), 0, -1) == BAD_ENTRIES
        rows = bad_message_rows(p.db_url)
        assert [key for key, _, _ in rows] == [quarantine_key(p.queue)] * 3
        assert "not JSON" in rows[0][1]
        assert "no kombu properties" in rows[1][1]
        assert "delivery tag" in rows[2][1]
        assert "an object, but no kombu properties" in rows[1][2]
        # Nothing was left behind in a fetching list for the sweep to put back.
        assert not [k for k in r.scan_iter(f"capworks:fetching:*:{p.queue}")]


def test_the_quarantine_keeps_the_newest_entries_up_to_its_bound() -> None:
    r = live_redis()
    queue = f"test-quarantine-{uuid.uuid4().hex[:8]}"
    fetching = f"capworks:fetching:test-{queue}"
    try:
        r.lpush(fetching, *[f"entry {i}" for i in range(5)])
        for i in range(5):
            assert quarantine_entry(r, fetching, queue, f"entry {i}".encode(), "bad", 3)
        assert r.lrange(quarantine_key(queue), 0, -1) == [b"entry 2", b"entry 3", b"entry 4"]
        assert r.llen(fetching) == 0
        # Swept back to the queue before it was quarantined: left to the next fetch.
        assert not quarantine_entry(r, fetching, queue, b"entry 0", "bad", 3)
    finally:
        r.delete(fetching, quarantine_key(queue))


def test_a_recorder_that_fails_leaves_the_entry_quarantined_and_raises_nothing() -> None:
    r = live_redis()
    queue = f"test-quarantine-{uuid.uuid4().hex[:8]}"
    fetching = f"capworks:fetching:test-{queue}"

    def database_down(queue: str, item: bytes, reason: str) -> None:
        raise OSError("the database is down")

    record_quarantined_with(database_down)
    try:
        r.lpush(fetching, GARBAGE)
        assert quarantine_entry(r, fetching, queue, GARBAGE, "not JSON")
        assert r.lrange(quarantine_key(queue), 0, -1) == [GARBAGE]
    finally:
        record_quarantined_with(None)
        r.delete(fetching, quarantine_key(queue))


def test_a_kombu_consumer_skips_bad_entries_and_receives_the_good_message() -> None:
    # Without the quarantine, the first bad entry raised out of drain_events.
    r = live_redis()
    name = f"test-quarantine-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    url = pipeline_support.REDIS_URL
    options = {"priority_steps": [0]}
    got: list[object] = []
    try:
        with Connection(url, transport=TRANSPORT, transport_options=options) as conn:
            Producer(conn.default_channel).publish(
                {"job": "good"}, exchange=queue.exchange, routing_key=name, declare=[queue]
            )
            r.rpush(name, *BAD_ENTRIES)  # taken before the good message
            receive = [lambda body, message: (got.append(body), message.ack())]
            with Consumer(conn.default_channel, queues=[queue], callbacks=receive):
                for _ in range(10):
                    if got:
                        break
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        continue
        assert got == [{"job": "good"}]
        assert r.lrange(quarantine_key(name), 0, -1) == BAD_ENTRIES[::-1]
        assert r.llen(name) == 0
    finally:
        r.delete(name, quarantine_key(name))
