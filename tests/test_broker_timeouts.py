"""A consumer whose broker connections stop answering without closing (a partition, on loopback
through `StallingProxy`) gives them up and consumes again soon after the heal, with the
connection options `make_celery` gives kombu; without a socket timeout a synchronous command
on a dead connection (the fetch's registration) waited for TCP to give up."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Queue
from pipeline_support import REDIS_URL, live_redis
from stalling_proxy import StallingProxy, stalling_proxy

from capworks.schema.queue import (
    BROKER_HEALTH_CHECK_S,
    BROKER_SOCKET_TIMEOUT_S,
    FETCH_WAIT_S,
    make_celery,
)
from capworks.schema.settings import Settings

CUT_S = 2 * BROKER_HEALTH_CHECK_S + FETCH_WAIT_S + 2  # past kombu's stale-fetch check
# After the heal: the one synchronous command left on a dead connection times out, then a new
# connection; a margin for a shared CI machine.
BACK_WITHIN_S = BROKER_SOCKET_TIMEOUT_S + 2 * BROKER_HEALTH_CHECK_S + 10


@pytest.fixture()
def proxy() -> Iterator[StallingProxy]:
    live_redis()
    with stalling_proxy(6379) as p:
        yield p


class Consuming:
    """A kombu consumer of `queue` through `url` with make_celery's connection, reconnecting on
    connection errors as Celery's consumer does, in a thread of its own."""

    def __init__(self, url: str, queue: Queue) -> None:
        self.app = make_celery(Settings(broker_url=url))
        self.queue = queue
        self.bodies: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _receive(self, body: Any, message: Any) -> None:
        self.bodies.append(str(body))
        message.ack()

    def _run(self) -> None:
        while not self._stop.is_set():
            conn: Connection = self.app.connection_for_read()
            try:
                with Consumer(conn.channel(), [self.queue], callbacks=[self._receive]):
                    while not self._stop.is_set():
                        try:
                            conn.drain_events(timeout=1)
                        except TimeoutError:
                            pass
            except conn.connection_errors as exc:
                self.errors.append(type(exc).__name__)
            finally:
                conn.release()

    def stop(self) -> None:
        self._stop.set()


def wait_for_body(consumer: Consuming, body: str, timeout_s: float) -> float:
    """Seconds until `consumer` got `body`; fails after `timeout_s`."""
    start = time.monotonic()
    while body not in consumer.bodies:
        waited = time.monotonic() - start
        assert waited < timeout_s, (
            f"no {body!r} within {timeout_s:.0f} s (errors so far: {consumer.errors})"
        )
        time.sleep(0.2)
    return time.monotonic() - start


def test_a_consumer_cut_off_from_redis_consumes_again_soon_after_the_heal(
    proxy: StallingProxy,
) -> None:
    name = f"test-timeouts-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    db = REDIS_URL.rsplit("/", 1)[1]
    consumer = Consuming(f"redis://127.0.0.1:{proxy.port}/{db}", queue)
    # Published straight to Redis, not through the proxy.
    sender = make_celery(Settings(broker_url=REDIS_URL))
    try:
        with sender.producer_or_acquire() as producer:
            producer.publish("before", exchange=queue.exchange, routing_key=name, declare=[queue])
        wait_for_body(consumer, "before", 30)
        proxy.cut()
        time.sleep(CUT_S)  # the fault itself: a partition this long
        proxy.heal()
        with sender.producer_or_acquire() as producer:
            producer.publish("after", exchange=queue.exchange, routing_key=name)
        back_s = wait_for_body(consumer, "after", BACK_WITHIN_S)
        print(f"cut {CUT_S:.0f} s: consumed again {back_s:.1f} s after the heal")
    finally:
        consumer.stop()
        live_redis().delete(name)
