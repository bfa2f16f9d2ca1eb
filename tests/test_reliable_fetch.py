"""The reliable fetch on the real Redis, through kombu itself: a message taken as Redis fails is
in a fetching list, not lost (stock kombu loses it), the sweep puts it back once, and a reply
read after its entry was swept back is dropped rather than delivered twice."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fetch_storm import RELIABLE, restart_storm
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis
from pipeline_support import REDIS_URL, live_redis
from redis_server import RedisServer, own_redis

from capworks.schema.redis_transport import (
    _REGISTER,
    REGISTRY_KEY,
    Channel,
    FetchingSweeper,
    fetching_key,
    hand_back_fetching,
    queue_of,
)

OPTIONS = {"priority_steps": [0]}


@pytest.fixture()
def client() -> Iterator[redis.Redis]:
    r = live_redis()
    yield r
    for key in r.scan_iter("capworks:fetching:*test-*"):
        r.delete(key)
        r.zrem(REGISTRY_KEY, key)


@pytest.fixture()
def queue(client: redis.Redis) -> Iterator[Queue]:
    name = f"test-fetch-{uuid.uuid4().hex[:8]}"
    yield Queue(name, Exchange(name, type="direct"), routing_key=name)
    client.delete(name)


def connect(stock: bool = False, url: str = REDIS_URL) -> Connection:
    transport = "redis" if stock else "capworks.schema.redis_transport:Transport"
    return Connection(url, transport=transport, transport_options=OPTIONS)


def publish(queue: Queue, *bodies: str, url: str = REDIS_URL) -> None:
    with connect(url=url) as conn:
        producer = Producer(conn.default_channel)
        for body in bodies:
            producer.publish(
                {"job": body}, exchange=queue.exchange, routing_key=queue.name, declare=[queue]
            )


def consume(queue: Queue, count: int, on_message: Any = None, url: str = REDIS_URL) -> list[str]:
    """Take and acknowledge up to `count` messages; their bodies."""
    got: list[str] = []

    def receive(body: dict[str, str], message: Any) -> None:
        if on_message is not None:
            on_message(message)
        got.append(body["job"])
        message.ack()

    with connect(url=url) as conn:
        with Consumer(conn.default_channel, queues=[queue], callbacks=[receive], accept=["json"]):
            for _ in range(count * 3):
                if len(got) == count:
                    break
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    continue
    return got


def job_of(raw: bytes) -> str:
    """The job named in a raw kombu message (its body is base64 JSON)."""
    body = json.loads(raw)["body"]
    return str(json.loads(base64.b64decode(body))["job"])


def unacked_jobs(client: redis.Redis, queue: Queue) -> list[str]:
    """The jobs of `queue` recorded as delivered and unacknowledged."""
    records = [json.loads(v) for v in client.hvals("unacked")]
    return [job_of(json.dumps(m).encode()) for m, _, key in records if key == queue.name]


def fetching_lists(client: redis.Redis, queue: Queue) -> dict[str, list[bytes]]:
    keys = [k.decode() for k in client.scan_iter(match="capworks:fetching:*:*", count=1000)]
    return {k: client.lrange(k, 0, -1) for k in keys if queue_of(k) == queue.name}


def test_a_delivered_message_is_in_unacked_and_in_no_fetching_list(
    client: redis.Redis, queue: Queue
) -> None:
    publish(queue, "a", "b", "c")
    seen: list[tuple[bool, dict[str, list[bytes]]]] = []

    def check(message: Any) -> None:
        recorded = client.hexists("unacked", message.delivery_tag)
        seen.append((recorded, fetching_lists(client, queue)))

    assert sorted(consume(queue, 3, check)) == ["a", "b", "c"]
    assert seen == [(True, {})] * 3
    assert client.llen(queue.name) == 0
    assert fetching_lists(client, queue) == {}


def test_stock_kombu_loses_a_message_taken_as_redis_fails(
    client: redis.Redis, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Why this module exists: BRPOP, then the unacked record fails (Redis gone) - the message
    # is in neither the queue nor `unacked`.
    publish(queue, "lost")

    def redis_gone(self: Any, message: Any, delivery_tag: str) -> None:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(kombu_redis.QoS, "append", redis_gone)
    with connect(stock=True) as conn:
        with Consumer(conn.default_channel, queues=[queue], callbacks=[], accept=["json"]):
            with pytest.raises(redis.ConnectionError):
                conn.drain_events(timeout=2)
    assert client.llen(queue.name) == 0
    assert "lost" not in unacked_jobs(client, queue)
    assert fetching_lists(client, queue) == {}


def take_as_redis_stops(server: RedisServer, queue: Queue, job: str, stock: bool) -> redis.Redis:
    """Publish `job` to `queue` and fetch it from `server`, stopping Redis (SIGTERM, its
    append-only file flushed) at the one instant between taking the job and recording its
    delivery; start Redis again and return a client of it. Stock kombu records the delivery in
    `QoS.append`, after BRPOP; capworks' fetch claims it after BLMOVE (`Channel.after_move`)."""
    publish(queue, job, url=server.url)
    stopped: list[str] = []

    def stop_redis(*_: Any) -> None:
        server.stop()
        stopped.append("stopped")

    with connect(stock, server.url) as conn:
        channel = conn.default_channel
        if stock:
            record = channel.qos.append

            def stop_then_record(message: Any, delivery_tag: str) -> None:
                stop_redis()
                record(message, delivery_tag)

            channel.qos.append = stop_then_record
        else:
            assert isinstance(channel, Channel)
            channel.after_move = stop_redis
        with Consumer(channel, queues=[queue], callbacks=[], accept=["json"]):
            with pytest.raises(redis.ConnectionError):
                conn.drain_events(timeout=5)
            assert stopped == ["stopped"]  # the fault came exactly there, once
            server.start()
    return redis.Redis.from_url(server.url)


def jobs_anywhere(client: redis.Redis, queue: Queue) -> dict[str, list[str]]:
    """Where `queue`'s jobs are: queued, fetched but unclaimed, or delivered and unacked."""
    fetched = [job_of(e) for entries in fetching_lists(client, queue).values() for e in entries]
    return {
        "queued": [job_of(e) for e in client.lrange(queue.name, 0, -1)],
        "fetching": fetched,
        "unacked": unacked_jobs(client, queue),
    }


def sweep_once_stale(sweeper: FetchingSweeper, timeout_s: float = 30) -> int:
    """Sweep until a fetching list's deadline is `STALE_AFTER_S` past and the sweep moves
    something; how many it moved (0 after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not (swept := sweeper.sweep()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return swept


@pytest.fixture()
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own that writes every command to disk before answering."""
    with own_redis(tmp_path / "redis", ["--appendonly", "yes", "--appendfsync", "always"]) as s:
        yield s


@pytest.mark.slow
def test_a_job_taken_as_redis_stops_is_kept_and_delivered_once_after_the_restart(
    queue: Queue, durable_redis: RedisServer
) -> None:
    client = take_as_redis_stops(durable_redis, queue, "kept", stock=False)
    assert jobs_anywhere(client, queue) == {"queued": [], "fetching": ["kept"], "unacked": []}
    assert sweep_once_stale(FetchingSweeper(client)) == 1
    assert consume(queue, 2, url=durable_redis.url) == ["kept"]
    assert jobs_anywhere(client, queue) == {"queued": [], "fetching": [], "unacked": []}


@pytest.mark.slow
def test_stock_kombu_loses_a_job_taken_as_redis_stops_every_time(
    queue: Queue, durable_redis: RedisServer
) -> None:
    # The same fault as above with kombu's own fetch: the job is nowhere in Redis.
    client = take_as_redis_stops(durable_redis, queue, "lost", stock=True)
    assert jobs_anywhere(client, queue) == {"queued": [], "fetching": [], "unacked": []}


def test_a_message_taken_as_redis_fails_is_swept_back_and_delivered_once(
    client: redis.Redis, queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(queue, "kept")
    real_claim = Channel._claimed_payload

    def redis_gone(self: Any, queue_name: str, item: bytes) -> Any:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(Channel, "_claimed_payload", redis_gone)
    with connect() as conn:
        with Consumer(conn.default_channel, queues=[queue], callbacks=[], accept=["json"]):
            with pytest.raises(redis.ConnectionError):
                conn.drain_events(timeout=2)
    monkeypatch.setattr(Channel, "_claimed_payload", real_claim)
    # Moved, not lost: in the dead channel's fetching list, neither queued nor unacked.
    (entries,) = fetching_lists(client, queue).values()
    assert [job_of(e) for e in entries] == ["kept"]
    assert client.llen(queue.name) == 0
    assert "kept" not in unacked_jobs(client, queue)
    sweeper = FetchingSweeper(client)
    # Its fetch's deadline has not passed by STALE_AFTER_S yet: it may be a moment from its claim.
    assert sweeper.sweep() == 0
    assert sweep_once_stale(sweeper) == 1  # back to the queue's head
    assert fetching_lists(client, queue) == {}
    assert consume(queue, 2) == ["kept"]
    assert client.llen(queue.name) == 0


def test_a_reply_read_after_its_entry_was_swept_back_is_dropped(
    client: redis.Redis, queue: Queue
) -> None:
    publish(queue, "late")
    with connect() as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        channel.basic_consume(queue.name, False, lambda m: None, "late-consumer")
        # A fetch whose reply waits unread (the worker stalled) while its deadline passes.
        channel.register_fetch(queue.name, 0)
        item = client.lmove(queue.name, channel.fetching_key(queue.name), "RIGHT", "LEFT")
        assert item is not None
        assert FetchingSweeper(client).sweep(stale_after_s=-1) == 1
        assert channel._claimed_payload(queue.name, item) is None
    assert consume(queue, 2) == ["late"]


def test_the_sweep_leaves_a_fetch_alone_until_its_deadline_is_well_past(
    client: redis.Redis, queue: Queue
) -> None:
    key = fetching_key("test-inst-1", "token", queue.name)
    register = client.register_script(_REGISTER)
    register(keys=[REGISTRY_KEY, key], args=[60])  # a fetch that may wait a minute
    client.lpush(key, b'{"job": "in flight"}')
    sweeper = FetchingSweeper(client)
    assert sweeper.sweep() == 0
    assert client.llen(key) == 1
    assert sweeper.sweep(stale_after_s=-61) == 1  # as if the minute and the grace were over
    assert client.lrange(queue.name, 0, -1) == [b'{"job": "in flight"}']
    assert client.zscore(REGISTRY_KEY, key) is None  # drained lists are forgotten


def test_a_dead_processes_fetched_jobs_are_handed_back_at_once(
    client: redis.Redis, queue: Queue
) -> None:
    register = client.register_script(_REGISTER)
    twins = (("test-inst-7", "t1", [b"one", b"two"]), ("test-inst-8", "t2", [b"other process"]))
    for instance, token, items in twins:
        key = fetching_key(instance, token, queue.name)
        register(keys=[REGISTRY_KEY, key], args=[60])
        client.lpush(key, *items)
    assert hand_back_fetching(client, "test-inst-7") == 2
    assert sorted(client.lrange(queue.name, 0, -1)) == [b"one", b"two"]
    assert client.llen(fetching_key("test-inst-8", "t2", queue.name)) == 1


def test_a_fetching_key_names_its_queue_even_with_colons() -> None:
    key = fetching_key("0123456789abcdef", "abc", "jobs:high")
    assert queue_of(key) == "jobs:high"


@pytest.mark.slow
def test_no_message_is_lost_while_redis_restarts_under_a_consumer(tmp_path: Path) -> None:
    # Stock kombu lost 1-2 messages of 40,000 over 20 restarts here (bench/fetch_restarts.py).
    result = restart_storm(RELIABLE, tmp_path / "redis", messages=6_000, restarts=10)
    assert result.reconnects >= 1  # the restarts reached the consumer
    assert result.lost == 0, result


@pytest.mark.parametrize("stock", [True, False])
def test_a_channel_closed_after_its_connection_leaves_its_jobs_to_the_leases(
    client: redis.Redis, queue: Queue, stock: bool
) -> None:
    # What killed a worker in the Redis restart test: Celery closes the consumer's channel
    # after the connection was detached from its transport; kombu's hand-back of the channel's
    # held messages then needs the connection's address and raises AttributeError, which
    # Celery treats as unrecoverable.
    publish(queue, "held")
    conn = connect(stock)
    held: list[Any] = []
    channel = conn.default_channel
    with Consumer(channel, queues=[queue], callbacks=[lambda _b, m: held.append(m)]):
        conn.drain_events(timeout=5)
    assert len(held) == 1 and client.hexists("unacked", held[0].delivery_tag)
    conn.transport.client = None
    try:
        if stock:
            with pytest.raises(AttributeError, match="hostname"):
                channel.close()
        else:
            channel.close()
            # Left where the leases find it: recorded as held, not back in the queue yet.
            assert unacked_jobs(client, queue) == ["held"]
            assert client.llen(queue.name) == 0
    finally:
        client.hdel("unacked", held[0].delivery_tag)
        client.zrem("unacked_index", held[0].delivery_tag)
