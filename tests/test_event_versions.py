"""Upload events keep the latest version of each object: a re-upload of earlier content, an
overwrite with no ETag and an announcement that arrives late are judged by the order S3 (its
`sequencer`), the event time or the filer gives them, against the real Redis and queue."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from event_samples import eventbridge, records, s3_record
from pipeline_support import REDIS_URL, Pipeline, own_queue

from capworks.producer.events.bulk import BulkSender
from capworks.producer.events.filer import change_from_json
from capworks.producer.events.records import ObjectCreated, parse_body
from capworks.producer.events.sink import EventSink, Outcome
from capworks.producer.events.versions import Order, Version, compare_versions
from capworks.schema.db import connect
from capworks.schema.queue import make_celery
from capworks.schema.settings import Settings

IDENTITY = ("shapes-test", "", "settings-hash")
ETAG_A = "a" * 32
ETAG_B = "b" * 32


@pytest.fixture()
def queue_only(pg_url: str, tmp_path: Path) -> Iterator[Pipeline]:
    """A queue and a migrated database of this test's own, no worker."""
    connect(pg_url).dispose()
    with own_queue(pg_url, tmp_path) as p:
        yield p


def make_sink(p: Pipeline) -> EventSink:
    """The sink `capworks events` builds, on the test's own queue and database."""
    settings = Settings(broker_url=REDIS_URL, queue_name=p.queue)
    broker = redis.Redis.from_url(REDIS_URL)
    sender = BulkSender(make_celery(settings), broker, p.queue)
    return EventSink(sender.send, broker, IDENTITY, connect(p.db_url))


def put(key: str, etag: str | None, sequencer: str | None, time: str | None = None) -> bytes:
    """A `Records[]` body announcing one upload, with this ETag, sequencer and event time."""
    record = s3_record("photos", key)
    obj: dict[str, Any] = record["s3"]["object"]
    for field, value in (("eTag", etag), ("sequencer", sequencer)):
        if value is None:
            del obj[field]
        else:
            obj[field] = value
    if time is None:
        del record["eventTime"]
    else:
        record["eventTime"] = time
    return records(record)


def announce(sink: EventSink, body: bytes) -> list[Outcome]:
    return sink.publish(parse_body(body).created)


def queued_etags(p: Pipeline) -> list[str | None]:
    """The ETag each queued job names, oldest job first (the queue is pushed on the left)."""
    etags = []
    for raw in reversed(p.redis().lrange(p.queue, 0, -1)):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        etags.extend(image[1] for image in body["images"])
    return etags


# --- against the real Redis and queue ------------------------------------------------------------


def test_a_reupload_of_earlier_content_is_captioned_again(queue_only: Pipeline) -> None:
    sink = make_sink(queue_only)
    for etag, sequencer in ((ETAG_A, "01"), (ETAG_B, "02"), (ETAG_A, "03")):
        assert announce(sink, put("a.png", etag, sequencer)) == [Outcome.PUBLISHED]
    assert queued_etags(queue_only) == [ETAG_A, ETAG_B, ETAG_A]  # the object holds A again


def test_a_repeat_of_the_latest_announcement_is_dropped(queue_only: Pipeline) -> None:
    sink = make_sink(queue_only)
    body = put("a.png", ETAG_A, "0055AED6DCD90281E5", "2026-12-02T06:00:00.000Z")
    assert announce(sink, body) == [Outcome.PUBLISHED]
    assert announce(sink, body) == [Outcome.DUPLICATE]  # the sender delivered it twice
    no_etag = put("b.png", None, "0055AED6DCD90281E6")
    assert announce(sink, no_etag) == [Outcome.PUBLISHED]
    assert announce(sink, no_etag) == [Outcome.DUPLICATE]  # one sequencer is one upload
    assert queued_etags(queue_only) == [ETAG_A, None]


def test_overwrites_without_an_etag_are_each_published(queue_only: Pipeline) -> None:
    sink = make_sink(queue_only)
    assert announce(sink, put("a.png", None, "0055AED6DCD90281E5")) == [Outcome.PUBLISHED]
    assert announce(sink, put("a.png", None, "0055AED6DCD90281F0")) == [Outcome.PUBLISHED]
    # No sequencer either: the event time orders them.
    assert announce(sink, put("b.png", None, None, "2026-12-02T06:00:00Z")) == [Outcome.PUBLISHED]
    assert announce(sink, put("b.png", None, None, "2026-12-02T06:00:01Z")) == [Outcome.PUBLISHED]
    # Nothing to tell two uploads apart: each is published, never dropped on the key alone.
    assert announce(sink, put("c.png", None, None)) == [Outcome.PUBLISHED]
    assert announce(sink, put("c.png", None, None)) == [Outcome.PUBLISHED]
    assert len(queued_etags(queue_only)) == 6


def test_an_older_announcement_arriving_late_is_dropped(queue_only: Pipeline) -> None:
    sink = make_sink(queue_only)
    assert announce(sink, put("a.png", ETAG_B, "0055AED6DCD90281F0")) == [Outcome.PUBLISHED]
    assert announce(sink, put("a.png", ETAG_A, "0055AED6DCD90281E5")) == [Outcome.DUPLICATE]
    # A shorter sequencer is padded, not compared as it is: "FF" < "0100".
    assert announce(sink, put("b.png", ETAG_A, "0100")) == [Outcome.PUBLISHED]
    assert announce(sink, put("b.png", ETAG_B, "FF")) == [Outcome.DUPLICATE]
    # Without a sequencer the event time says which is older.
    late = put("c.png", ETAG_A, None, "2026-12-02T05:59:59Z")
    assert announce(sink, put("c.png", ETAG_B, None, "2026-12-02T06:00:00Z")) == [Outcome.PUBLISHED]
    assert announce(sink, late) == [Outcome.DUPLICATE]
    assert queued_etags(queue_only) == [ETAG_B, ETAG_A, ETAG_B]


def test_one_body_announcing_several_versions_publishes_the_newest_only(
    queue_only: Pipeline,
) -> None:
    sink = make_sink(queue_only)
    recs = [
        json.loads(put("a.png", e, s))["Records"][0] for e, s in ((ETAG_B, "02"), (ETAG_A, "01"))
    ]
    outcomes = announce(sink, records(*recs))
    assert outcomes == [Outcome.PUBLISHED, Outcome.DUPLICATE]
    assert queued_etags(queue_only) == [ETAG_B]


def test_an_object_another_consumer_is_publishing_is_in_flight_then_judged(
    queue_only: Pipeline,
) -> None:
    first, second = make_sink(queue_only), make_sink(queue_only)
    newer = put("a.png", ETAG_B, "02")
    held: list[list[Outcome]] = []
    real_send = first._send

    def send_while_another_delivers(jobs: Any) -> None:
        held.append(announce(second, newer))  # the first consumer holds the object's claim
        real_send(jobs)

    first._send = send_while_another_delivers
    assert announce(first, put("a.png", ETAG_A, "01")) == [Outcome.PUBLISHED]
    assert held == [[Outcome.IN_FLIGHT]]
    assert announce(second, newer) == [Outcome.PUBLISHED]  # its retry, after the first is sent
    assert announce(second, put("a.png", ETAG_A, "01")) == [Outcome.DUPLICATE]
    assert queued_etags(queue_only) == [ETAG_A, ETAG_B]


def test_a_failed_send_leaves_no_claim_and_no_latest_version(queue_only: Pipeline) -> None:
    sink = make_sink(queue_only)
    real_send = sink._send

    def broker_down(jobs: Any) -> None:
        raise redis.ConnectionError("broker down")

    sink._send = broker_down
    with pytest.raises(redis.ConnectionError):
        announce(sink, put("a.png", ETAG_A, "01"))
    sink._send = real_send
    assert announce(sink, put("a.png", ETAG_A, "01")) == [Outcome.PUBLISHED]
    assert queued_etags(queue_only) == [ETAG_A]


# --- the decision, one branch each ---------------------------------------------------------------


def version(
    etag: str | None = None, sequencer: str | None = None, event_ns: int | None = None
) -> Version:
    return Version.of(ObjectCreated("p", "k.png", etag, sequencer=sequencer, event_ns=event_ns))


def test_sequencers_are_padded_to_one_length_and_compared_as_text() -> None:
    assert compare_versions(version(sequencer="0100"), version(sequencer="FF")) is Order.NEWER
    assert compare_versions(version(sequencer="ff"), version(sequencer="0100")) is Order.OLDER
    assert compare_versions(version(sequencer="00FF"), version(sequencer="FF")) is Order.SAME


def test_a_sequencer_outranks_the_event_time() -> None:
    newer_but_earlier = version(sequencer="02", event_ns=1)
    assert compare_versions(newer_but_earlier, version(sequencer="01", event_ns=2)) is Order.NEWER


def test_the_event_time_orders_versions_without_sequencers() -> None:
    assert compare_versions(version(event_ns=2), version(event_ns=1)) is Order.NEWER
    assert compare_versions(version(event_ns=1), version(event_ns=2)) is Order.OLDER
    assert compare_versions(version("e", event_ns=1), version("e", event_ns=1)) is Order.SAME


def test_two_contents_at_one_instant_are_both_kept() -> None:
    assert compare_versions(version("a", event_ns=1), version("b", event_ns=1)) is Order.NEWER


def test_without_an_order_only_the_same_etag_is_the_same_version() -> None:
    assert compare_versions(version("a"), version("a")) is Order.SAME
    assert compare_versions(version("a"), version("b")) is Order.NEWER
    assert compare_versions(version(), version()) is Order.NEWER  # never the key alone


def test_a_version_survives_its_stored_form_and_garbage_reads_as_none() -> None:
    v = version("e", "0055AED6DCD90281E5", 1_796_191_200_250_000_000)
    assert Version.from_json(v.to_json().encode()) == v
    assert Version.from_json(b"sent") is None
    assert Version.from_json(b'{"etag": 5}') is None


def test_records_and_filer_changes_carry_what_orders_them() -> None:
    [record] = parse_body(
        put("a.png", ETAG_A, "0055aed6dcd90281e5", "2026-12-02T06:00:00.25Z")
    ).created
    assert (record.sequencer, record.event_ns) == ("0055AED6DCD90281E5", 1_796_191_200_250_000_000)
    [bridge] = parse_body(eventbridge("photos", "b.png")).created
    assert bridge.sequencer == "00617F08299329D189" and bridge.event_ns is not None
    [odd] = parse_body(put("c.png", ETAG_A, "not hex!", None)).created
    assert (odd.sequencer, odd.event_ns) == (None, None)  # optional: still captioned
    change = change_from_json(
        {
            "eventNotification": {"newEntry": {"name": "d.png"}, "newParentPath": "/buckets/p"},
            "tsNs": "1796191200250000001",
        }
    ).created
    assert change is not None and change.event_ns == 1_796_191_200_250_000_001
