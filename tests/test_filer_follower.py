"""The SeaweedFS filer follower survives what its child's output and the child itself can do: a
multi-byte key split between two reads, a change longer than any real one, a change that is not
JSON or not the shape it knows, and a child that will not exit when told.

The follower runs `weed filer.meta.tail`; a real `weed` cannot be made to print a broken change
or to ignore SIGTERM, so those tests run a `FakeWeed` shell script in its place, which prints
given bytes and then waits, as the real one does. The queue, Redis and PostgreSQL are real.
"""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pipeline_support import REDIS_URL, Pipeline, own_queue, query, queued_images, wait_until
from sqlalchemy import select

from capworks.producer.events.bulk import BulkSender
from capworks.producer.events.filer import FilerFollower, FilerPosition, iter_json_objects
from capworks.producer.events.records import BadRecord
from capworks.producer.events.sink import EventSink
from capworks.schema.db import connect
from capworks.schema.queue import make_celery
from capworks.schema.settings import Settings
from capworks.schema.tables import BadMessage

IDENTITY = ("shapes-test", "", "settings-hash")
FILER = "127.0.0.1:9"  # never dialled: the fake prints what it is given


def change(name: str, ts_ns: int, etag: str = "e") -> dict[str, Any]:
    """One change as `weed filer.meta.tail` prints it: an upload to bucket `photos`."""
    entry = {
        "name": name,
        "attributes": {"fileSize": "5"},
        "extended": {"Seaweed-X-Amz-ETag": base64.b64encode(etag.encode()).decode()},
    }
    return {
        "directory": "/buckets/photos",
        "eventNotification": {"newEntry": entry, "newParentPath": "/buckets/photos"},
        "tsNs": str(ts_ns),
    }


def printed(*docs: dict[str, Any]) -> bytes:
    return "".join(json.dumps(d, indent=2, ensure_ascii=False) + "\n" for d in docs).encode()


class Trickle(io.BytesIO):
    """A pipe that hands over `step` bytes a read."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__(data)
        self.step = step

    def read1(self, size: int = -1) -> bytes:
        return super().read1(self.step)


# --- reading the stream --------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_chunks_split_inside_a_multibyte_character_keep_the_key(step: int) -> None:
    docs = [change("café.jpg", 1), change("猫/ünï.png", 2), change("😀.png", 3)]
    assert list(iter_json_objects(Trickle(printed(*docs), step))) == docs


def test_a_change_longer_than_the_bound_is_dropped_and_recorded_and_the_next_is_read() -> None:
    huge = change("huge.png", 1)
    huge["eventNotification"]["newEntry"]["chunks"] = [{"fileId": "3,01637037d6"}] * 500
    docs = [change("before.png", 0), huge, change("after.png", 2)]
    got = list(iter_json_objects(Trickle(printed(*docs), 4096), max_change_chars=2000))
    assert got[0] == docs[0] and got[2] == docs[2]
    assert isinstance(got[1], BadRecord) and "longer than 2000" in got[1].reason
    assert len(got) == 3


def test_a_change_that_is_not_json_is_recorded_and_the_next_is_read() -> None:
    text = printed(change("a.png", 1)) + b'{\n  "tsNs": oops\n}\n' + printed(change("b.png", 2))
    got = list(iter_json_objects(Trickle(text, 7)))
    assert [type(g) for g in got] == [dict, BadRecord, dict]
    assert isinstance(got[1], BadRecord) and "oops" in got[1].body


# --- the follower with a FakeWeed child ----------------------------------------------------------


@pytest.fixture()
def queue_only(pg_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    connect(pg_url).dispose()
    with own_queue(pg_url, tmp_path) as p:
        yield p


def make_sink(p: Pipeline) -> EventSink:
    settings = Settings(broker_url=REDIS_URL, queue_name=p.queue)
    broker = redis.Redis.from_url(REDIS_URL)
    return EventSink(
        BulkSender(make_celery(settings), broker, p.queue).send,
        broker,
        IDENTITY,
        connect(p.db_url),
    )


def fake_weed(tmp: Path, output: bytes, ignore_sigterm: bool) -> Path:
    """FakeWeed: prints `output` as `weed filer.meta.tail` would, writes its PID, then waits."""
    (tmp / "changes.out").write_bytes(output)
    script = tmp / "weed"
    script.write_text(
        "#!/bin/sh\n"
        + ("trap '' TERM\n" if ignore_sigterm else "")
        + f"echo $$ >> '{tmp}/pids'\n"
        + f"cat '{tmp}/changes.out'\n"
        + "exec sleep 300\n"  # keeps the pipe open, and SIGTERM ignored across exec
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def follow(
    follower: FilerFollower,
) -> tuple[threading.Event, threading.Thread, list[BaseException]]:
    stop, ready, raised = threading.Event(), threading.Event(), []

    def run() -> None:
        try:
            follower.run(stop, ready)
        except BaseException as exc:  # noqa: BLE001 - the test reports what escaped
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert ready.wait(30)
    return stop, thread, raised


def bad_reasons(db_url: str) -> list[str]:
    stmt = select(BadMessage.reason).order_by(BadMessage.id)
    return query(db_url, lambda conn: list(conn.scalars(stmt)))  # type: ignore[no-any-return]


def test_a_follower_fed_broken_changes_records_them_and_goes_on(
    queue_only: Pipeline, tmp_path: Path
) -> None:
    p = queue_only
    sink = make_sink(p)
    position = FilerPosition(sink.db, FILER, "/buckets/")
    position.save(1, 0)
    not_a_number = change("n.png", 3)
    not_a_number["tsNs"] = "three"
    odd_shape = {"tsNs": "4", "eventNotification": ["not", "an", "object"]}
    output = (
        printed(change("first.png", 2))
        + b'{\n  "tsNs": oops\n}\n'
        + printed(not_a_number, odd_shape, change("after.png", 5))
    )
    weed = fake_weed(tmp_path, output, ignore_sigterm=False)
    stop, thread, raised = follow(FilerFollower(str(weed), FILER, sink, position))
    try:
        wait_until(lambda: len(queued_images(p)) >= 2, 30, "both good changes published")
        wait_until(lambda: len(bad_reasons(p.db_url)) >= 3, 30, "the broken changes recorded")
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive() and raised == []
    assert sorted(queued_images(p)) == ["s3://photos/after.png", "s3://photos/first.png"]
    reasons = bad_reasons(p.db_url)
    assert len(reasons) == 3 and "not JSON" in reasons[0], reasons
    assert position.load() == 5


def test_a_child_that_ignores_sigterm_is_killed_and_the_follower_returns(
    queue_only: Pipeline, tmp_path: Path
) -> None:
    p = queue_only
    sink = make_sink(p)
    position = FilerPosition(sink.db, FILER, "/buckets/")
    position.save(1, 0)
    weed = fake_weed(tmp_path, printed(change("one.png", 2)), ignore_sigterm=True)
    follower = FilerFollower(str(weed), FILER, sink, position, stop_grace_s=1.0)
    stop, thread, raised = follow(follower)
    wait_until(lambda: queued_images(p) == ["s3://photos/one.png"], 30, "the change published")
    stop.set()
    thread.join(30)
    assert not thread.is_alive() and raised == []
    [pid] = (tmp_path / "pids").read_text().split()
    assert not os.path.exists(f"/proc/{pid}")  # killed, and reaped
