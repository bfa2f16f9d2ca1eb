"""Leases: a job whose worker process died is back in the queue within seconds, and a job whose
worker lives is never delivered twice, however long it runs.

kombu's Redis transport keeps every delivered, unacknowledged message in the `unacked` hash and
its delivery time in the `unacked_index` sorted set, and gives a message back to the queue only
when that time is older than the visibility timeout (an hour by default: a killed worker's jobs
waited that long). Raising the visibility timeout's floor was never the fix: a short one hands a
long job to a second worker while the first still runs it.

So each worker process holds a lease on every message it holds (running, prefetched, or waiting
for a retry's countdown), renewed every `lease_s / 4` (at most 5 s) from its consumer's event
loop: the messages' index scores are moved to now (so kombu never finds a live worker's message old,
however long the job runs), and a Redis set of their delivery tags, expiring `lease_s` after the
last renewal, names them for the process's supervisor (a message joins the set the moment it is
received, so one taken just before a SIGKILL is named too). On the same tick the process reaps: a
message whose score is older than `lease_s` and that no live lease names has lost its worker;
its score is set to 0 and kombu's own restore, run at once, puts it back in the queue by kombu's
own atomic transaction. A dead process's jobs are back within `lease_s` plus one tick (10 s by
default), handed back by any live worker on any host; the local supervisor, which sees its
child die, hands them back at once (score 0, for the next sweep). The visibility timeout stays
as a last resort for when no capworks worker is alive to reap.

A process that cannot renew for `lease_s` (Redis unreachable, the event loop stalled that long) may
see a job it still runs delivered again; that copy is dropped by the job's done mark or runs
again idempotently, never lost.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

from celery import bootsteps, signals

from schema.redis_transport import FetchingSweeper, as_text, hand_back_fetching

log = logging.getLogger(__name__)
LEASE_KEY = "capworks:lease:{host}:{pid}"
LEASE_PATTERN = "capworks:lease:*"
UNACKED_INDEX = "unacked_index"  # kombu's default `unacked_index_key`


MAX_RENEW_EVERY_S = 5.0


def renew_every_s(lease_s: float) -> float:
    """How often a process renews: four times a lease, and at least every 5 s, so that a
    supervisor handing back a dead child's jobs finds them named."""
    return min(lease_s / 4, MAX_RENEW_EVERY_S)


def lease_key(host: str, pid: int) -> str:
    """The lease of one worker process, named so its supervisor can find it by pid."""
    return LEASE_KEY.format(host=host, pid=pid)


class LeaseKeeper:
    """Renews one process's lease and reaps the messages no live lease holds."""

    def __init__(self, redis: Any, key: str, lease_s: float, index_key: str = UNACKED_INDEX):
        self.redis = redis
        self.key = key
        self.lease_s = lease_s
        self.index_key = index_key

    def renew(self, tags: Iterable[str], now_s: float | None = None) -> None:
        """Lease `tags` for another `lease_s`: their index scores move to now (XX: a message
        acknowledged meanwhile is not put back), and the lease set names exactly them."""
        held = list(tags)
        now = time.time() if now_s is None else now_s
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key)
        if held:
            pipe.zadd(self.index_key, dict.fromkeys(held, now), xx=True)
            pipe.sadd(self.key, *held)
            pipe.pexpire(self.key, int(self.lease_s * 1000))
        pipe.execute()

    def hold(self, tag: str) -> None:
        """Name one message just delivered in the lease at once, not at the next renewal: a
        process killed a moment after taking a job has its supervisor hand that job back too."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(self.key, tag)
        pipe.pexpire(self.key, int(self.lease_s * 1000))
        pipe.execute()

    def reap(self, now_s: float | None = None) -> list[str]:
        """Mark for restore each message not renewed for `lease_s` that no lease names;
        returns their tags."""
        ceiling = (time.time() if now_s is None else now_s) - self.lease_s
        # Score 0: handed back by a supervisor, or reaped by a worker whose restore failed.
        candidates = {as_text(t) for t in self.redis.zrangebyscore(self.index_key, 0, ceiling)}
        if not candidates:
            return []
        held: set[str] = set()
        for key in self.redis.scan_iter(match=LEASE_PATTERN, count=1000):
            held.update(as_text(t) for t in self.redis.smembers(key))
        orphans = sorted(candidates - held)
        if orphans:
            # XX: a message acknowledged meanwhile is not put back in the index.
            self.redis.zadd(self.index_key, dict.fromkeys(orphans, 0), xx=True)
        return orphans

    def release(self) -> None:
        """Drop the lease (a clean shutdown has handed its messages back already)."""
        self.redis.delete(self.key)


def hand_back(redis: Any, host: str, pid: int, index_key: str = UNACKED_INDEX) -> int:
    """Give back every message a dead process held: those its lease names, for the next
    restore to requeue, and those it fetched but had not claimed, straight to their queues
    (the supervisor calls this when its child dies); returns how many."""
    key = lease_key(host, pid)
    tags = [as_text(t) for t in redis.smembers(key)]
    if tags:
        redis.zadd(index_key, dict.fromkeys(tags, 0), xx=True)
    redis.delete(key)
    return len(tags) + hand_back_fetching(redis, host, pid)


class LeaseStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """The consumer bootstep that renews this process's lease and reaps (`renew_every_s`)."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._tref: Any = None
        self._keeper: LeaseKeeper | None = None
        self._sweeper: FetchingSweeper | None = None

    def start(self, c: Any) -> None:
        """Start renewing once the task consumer exists."""
        from schema.queue import make_redis
        from schema.settings import get_settings

        settings = get_settings()
        channel = c.task_consumer.channel
        key = lease_key(socket.gethostname(), os.getpid())
        every_s = renew_every_s(settings.lease_s)
        client = make_redis(settings, socket_timeout_s=every_s)
        self._keeper = LeaseKeeper(client, key, settings.lease_s, channel.unacked_index_key)
        self._sweeper = FetchingSweeper(client)
        self.tick(c)
        self._tref = c.timer.call_repeatedly(every_s, self.tick, (c,))
        signals.task_received.connect(self.received, sender=c, weak=False)

    def received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """`task_received`, on the consumer's thread: lease the message now."""
        if self._keeper is None or request is None:
            return
        try:
            self._keeper.hold(str(request.message.delivery_tag))
        except Exception as exc:  # noqa: BLE001 - the next renewal names it
            log.warning("could not lease a message on receipt (%r)", exc)

    def tick(self, c: Any) -> None:
        """Renew the lease with the tags this process holds, reap, and restore what was reaped;
        then sweep fetched but unclaimed jobs back to their queues."""
        if self._keeper is None or self._sweeper is None:
            return
        try:
            channel = c.task_consumer.channel
            self._keeper.renew(_held_tags(channel.qos))
            if self._keeper.reap():
                channel.qos.restore_visible(num=None, interval=1)
            self._sweeper.sweep()
        except Exception as exc:  # noqa: BLE001 - logged; the next tick tries again
            log.warning("lease renewal failed (%r); trying again next tick", exc)

    def stop(self, c: Any) -> None:
        """Stop renewing and drop the lease."""
        signals.task_received.disconnect(self.received, sender=c)
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        if self._keeper is not None:
            try:
                self._keeper.release()
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning("could not drop the lease (%r); it expires by itself", exc)


def _held_tags(qos: Any) -> list[str]:
    """The delivery tags of every message this channel holds unacknowledged: kombu's QoS keeps
    them in `_delivered`, and those acknowledged since its last flush in `_dirty` (job threads
    acknowledge while we read, so copy and retry)."""
    for _ in range(5):
        try:
            acked = set(qos._dirty)
            return [str(tag) for tag in list(qos._delivered) if tag not in acked]
        except RuntimeError:  # changed size during iteration
            continue
    acked = set(qos._dirty)
    return [str(tag) for tag in dict(qos._delivered) if tag not in acked]
