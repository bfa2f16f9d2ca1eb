"""`Pipeline.queue_length`, which many tests wait on to say a run is over, counts the jobs of its
own queue only: kombu's `unacked` hash and the fetching registry are shared by every queue of
a Redis database, and tests running beside each other share one."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from kombu import Connection, Consumer, Exchange, Producer, Queue
from pipeline_support import Pipeline, own_queue

from capworks.schema.redis_transport import Channel

TRANSPORT = "capworks.schema.redis_transport:Transport"
OPTIONS = {"priority_steps": [0]}


def publish(conn: Connection, queue: Queue, count: int) -> None:
    producer = Producer(conn.default_channel)
    for i in range(count):
        producer.publish(
            {"job": i}, exchange=queue.exchange, routing_key=queue.name, declare=[queue]
        )


def take(conn: Connection, queue: Queue, count: int) -> list[Any]:
    """Deliver `count` of `queue`'s jobs and hold them unacknowledged (in `unacked`)."""
    held: list[Any] = []
    consumer = Consumer(conn.channel(), queues=[queue], accept=["json"], prefetch_count=count)
    consumer.register_callback(lambda _body, message: held.append(message))
    consumer.consume()
    while len(held) < count:
        conn.drain_events(timeout=5)
    return held


def test_queue_length_counts_this_queues_jobs_only(tmp_path: Path) -> None:
    with own_queue("sqlite://", tmp_path) as p:
        other_name = f"capworks-test-other-{uuid.uuid4().hex[:8]}"
        other = Queue(other_name, Exchange(other_name, type="direct"), routing_key=other_name)
        mine = Queue(p.queue, Exchange(p.queue, type="direct"), routing_key=p.queue)
        with (
            Connection(p.broker_url, transport=TRANSPORT, transport_options=OPTIONS) as conn,
            Connection(p.broker_url, transport=TRANSPORT, transport_options=OPTIONS) as theirs,
        ):
            publish(conn, mine, 4)
            publish(theirs, other, 5)
            take(theirs, other, 3)  # another queue's jobs, delivered and unacknowledged
            take(conn, mine, 1)  # one of mine delivered...
            channel = conn.default_channel
            assert isinstance(channel, Channel)
            channel.register_fetch(p.queue, 0)  # ...and one fetched, not yet claimed
            assert p.redis().lmove(p.queue, channel.fetching_key(p.queue), "RIGHT", "LEFT")
            assert queue_length_parts(p) == (2, 4)
            assert p.queue_length() == 4
        p.redis().delete(other_name)


def queue_length_parts(p: Pipeline) -> tuple[int, int]:
    """The queue's own list, and the `unacked` hash of the whole database."""
    r = p.redis()
    return int(r.llen(p.queue)), int(r.hlen("unacked"))
