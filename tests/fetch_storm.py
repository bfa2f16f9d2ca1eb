"""A kombu consumer taking messages from a Redis that is stopped and started under it: how many
messages a fetch loses across restarts (the test of `schema/redis_transport.py`, and
bench/fetch_restarts.py, which compares it with stock kombu)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from pipeline_support import free_port
from redis_server import RedisServer

from capworks.schema.redis_transport import FetchingSweeper

RELIABLE = "capworks.schema.redis_transport:Transport"
STOCK = "redis"


@dataclass
class StormResult:
    """What one run of `restart_storm` saw."""

    published: int
    restarts: int
    delivered: set[str] = field(default_factory=set)
    deliveries: int = 0
    reconnects: int = 0

    @property
    def lost(self) -> int:
        return self.published - len(self.delivered)


def restart_storm(
    transport: str, data: Path, messages: int = 20_000, restarts: int = 10, seed: int = 0
) -> StormResult:
    """Publish `messages`, consume them (acknowledging each) while the server is stopped
    and started `restarts` times, wait until nothing more arrives; what was delivered."""
    server = RedisServer(free_port(), data, ["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    name = f"storm-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    # A short visibility timeout: what a dropped connection leaves unacknowledged comes back
    # quickly (a capworks worker's lease does this job); a duplicate is fine, a loss is not.
    options = {"priority_steps": [0], "visibility_timeout": 2, "unacked_restore_throttle": 1}
    result = StormResult(published=messages, restarts=restarts)
    try:
        with Connection(server.url, transport=transport, transport_options=options) as conn:
            producer = Producer(conn.default_channel)
            for i in range(messages):
                producer.publish(
                    {"n": str(i)}, exchange=queue.exchange, routing_key=name, declare=[queue]
                )
        stop = threading.Event()
        consumer = threading.Thread(
            target=_consume, args=(server.url, transport, options, queue, stop, result), daemon=True
        )
        consumer.start()
        rng = random.Random(seed)
        for _ in range(restarts):
            time.sleep(rng.uniform(0.3, 1.2))
            server.stop()
            time.sleep(rng.uniform(0.2, 0.8))
            server.start()
        # Until every message is in or nothing new arrives for 10 s (past the visibility
        # timeout and a few sweeps).
        last, quiet_since = -1, time.monotonic()
        while len(result.delivered) < messages and time.monotonic() - quiet_since < 10:
            if result.deliveries != last:
                last, quiet_since = result.deliveries, time.monotonic()
            time.sleep(0.2)
        stop.set()
        consumer.join(timeout=10)
    finally:
        server.stop()
    return result


def _consume(
    url: str,
    transport: str,
    options: dict[str, Any],
    queue: Queue,
    stop: threading.Event,
    result: StormResult,
) -> None:
    def receive(body: dict[str, str], message: Any) -> None:
        result.delivered.add(body["n"])
        result.deliveries += 1
        message.ack()

    while not stop.is_set():
        try:
            with Connection(url, transport=transport, transport_options=options) as conn:
                channel = conn.default_channel
                sweeper = FetchingSweeper(redis.Redis.from_url(url, socket_timeout=2))
                swept_at = 0.0
                with Consumer(
                    channel, queues=[queue], callbacks=[receive], accept=["json"], prefetch_count=10
                ):
                    while not stop.is_set():
                        try:
                            conn.drain_events(timeout=0.5)
                        except TimeoutError:
                            pass
                        if transport == RELIABLE and time.monotonic() - swept_at > 0.5:
                            # What each capworks worker does on its lease tick.
                            sweeper.sweep()
                            swept_at = time.monotonic()
        except Exception:  # noqa: BLE001 - any connection failure (kombu wraps them): reconnect
            result.reconnects += 1
            time.sleep(0.2)
