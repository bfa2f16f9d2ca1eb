"""Leases: a job whose worker process died, hung or lost its connection is back in the queue
within seconds, and a job whose worker lives and makes progress is never delivered twice,
however long it runs.

kombu's Redis transport keeps every delivered, unacknowledged message in the `unacked` hash and
its delivery time in the `unacked_index` sorted set, and gives a message back to the queue only
when that time is older than the visibility timeout (an hour by default). A short visibility
timeout was never the fix: it hands a long job to a second worker while the first still runs it.

So each worker process (named by its instance id, `schema/instance.py`: hostnames and PIDs
repeat across containers) leases every message it holds (running, prefetched, or waiting for a
retry's countdown) in three structures, each read in O(jobs involved), never by scanning keys:
- `capworks:leases`, a sorted set: delivery tag -> lease deadline;
- `capworks:lease-owner`, a hash: delivery tag -> instance id;
- `capworks:lease:<instance>`, a set of the process's tags, for its supervisor's hand-back.
A renewal moves the messages' `unacked_index` scores and their deadlines forward; a reap takes
the messages whose index score is older than `lease_s` and whose lease has expired, sets their
score to 0, and kombu's own restore puts them back by kombu's own atomic transaction. Every
time in these scripts is Redis's `TIME`: hosts whose clocks disagree still agree on a lease.

The renewal runs on a thread of its own, every `renew_every_s`, from the first consumer start
to the end of the warm shutdown (Celery sends `worker_shutdown` once its pool has drained), so
neither a reconnect, a slow reap nor a deploy's drain lets a running job's lease lapse. The held
messages are those received and not yet acknowledged, on whatever channel delivered them (a
reconnect replaces the channel; the jobs it delivered still run). The lease follows progress:
when the model thread has had work and made no progress for `heartbeat_stale_s`, the process
stops renewing and exits (`EXIT_STALLED`), so its supervisor hands its jobs back and starts a
fresh process, and without a supervisor they are reaped within `lease_s`.

A process that cannot renew for `lease_s` (Redis unreachable that long) may see a job it still
runs delivered again; that copy is dropped by the job's done mark or runs again idempotently,
never lost.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from celery import bootsteps, signals

from capworks.schema.instance import instance_id
from capworks.schema.redis_transport import FetchingSweeper, as_text, hand_back_fetching

log = logging.getLogger(__name__)
LEASES_KEY = "capworks:leases"  # sorted set: delivery tag -> lease deadline (Redis time)
OWNERS_KEY = "capworks:lease-owner"  # hash: delivery tag -> instance id
LEASE_KEY = "capworks:lease:{instance}"  # set: one process's delivery tags
UNACKED_INDEX = "unacked_index"  # kombu's default `unacked_index_key`
MAX_RENEW_EVERY_S = 5.0
REAP_LIMIT = 1000  # messages examined per reap: a backlog is worked through over a few ticks
EXIT_STALLED = 75  # the exit status of a process whose model thread stopped making progress

# KEYS: leases, owners, instance set, unacked_index. ARGV: lease_s, instance, "1" when the tags
# are all the process holds (others it named are released), then the tags. A tag is leased only
# while kombu still has it unacknowledged (an acknowledged message is not put back).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local deadline = now + tonumber(ARGV[1])
if ARGV[3] == '1' then
  local held = {}
  for i = 4, #ARGV do held[ARGV[i]] = true end
  for _, tag in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    if not held[tag] and redis.call('HGET', KEYS[2], tag) == ARGV[2] then
      redis.call('ZREM', KEYS[1], tag)
      redis.call('HDEL', KEYS[2], tag)
    end
  end
  redis.call('DEL', KEYS[3])
end
local leased = 0
for i = 4, #ARGV do
  local tag = ARGV[i]
  if redis.call('ZSCORE', KEYS[4], tag) then
    redis.call('ZADD', KEYS[4], now, tag)
    redis.call('ZADD', KEYS[1], deadline, tag)
    redis.call('HSET', KEYS[2], tag, ARGV[2])
    redis.call('SADD', KEYS[3], tag)
    leased = leased + 1
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('PEXPIRE', KEYS[3], math.floor(tonumber(ARGV[1]) * 1000))
end
return leased
"""

# KEYS: leases, owners, unacked_index. ARGV: lease_s, limit. Forgets expired leases, marks for
# restore (score 0) each message not renewed for lease_s that no live lease holds; returns
# {the marked tags, how many messages now wait for a restore}.
_REAP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local limit = tonumber(ARGV[2])
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', KEYS[1], tag)
  redis.call('HDEL', KEYS[2], tag)
end
local ceiling = now - tonumber(ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '(0', ceiling, 'LIMIT', 0, limit)
local orphans = {}
for _, tag in ipairs(old) do
  if not redis.call('ZSCORE', KEYS[1], tag) then
    redis.call('ZADD', KEYS[3], 'XX', 0, tag)
    orphans[#orphans + 1] = tag
  end
end
return {orphans, redis.call('ZCOUNT', KEYS[3], 0, 0)}
"""

# KEYS: leases, owners, instance set, unacked_index. ARGV: instance. Marks every message the
# instance leased for restore now (its process died) and forgets its leases.
_HAND_BACK = """
local tags = redis.call('SMEMBERS', KEYS[3])
local handed = 0
for _, tag in ipairs(tags) do
  if redis.call('HGET', KEYS[2], tag) == ARGV[1] then
    redis.call('ZREM', KEYS[1], tag)
    redis.call('HDEL', KEYS[2], tag)
    if redis.call('ZSCORE', KEYS[4], tag) then
      redis.call('ZADD', KEYS[4], 0, tag)
      handed = handed + 1
    end
  end
end
redis.call('DEL', KEYS[3])
return handed
"""


def renew_every_s(lease_s: float) -> float:
    """How often a process renews: four times a lease, and at least every 5 s, so that a
    supervisor handing back a dead child's jobs finds them named."""
    return min(lease_s / 4, MAX_RENEW_EVERY_S)


def lease_key(instance: str) -> str:
    """The set naming one worker process's leased messages, for its supervisor."""
    return LEASE_KEY.format(instance=instance)


class LeaseKeeper:
    """Renews one process's leases and reaps the messages no live lease holds."""

    def __init__(
        self, redis: Any, instance: str, lease_s: float, index_key: str = UNACKED_INDEX
    ) -> None:
        self.redis = redis
        self.instance = instance
        self.lease_s = lease_s
        self.index_key = index_key
        self._renew = redis.register_script(_RENEW)
        self._reap = redis.register_script(_REAP)

    def _keys(self) -> list[str]:
        return [LEASES_KEY, OWNERS_KEY, lease_key(self.instance), self.index_key]

    def renew(self, tags: Iterable[str]) -> int:
        """Lease exactly `tags` for another `lease_s` (a tag this process no longer holds is
        released); returns how many are leased."""
        args = [self.lease_s, self.instance, "1", *tags]
        return int(self._renew(keys=self._keys(), args=args))

    def hold(self, tag: str) -> None:
        """Lease one message just delivered at once, not at the next renewal: a process killed
        a moment after taking a job has its supervisor hand that job back too."""
        self._renew(keys=self._keys(), args=[self.lease_s, self.instance, "0", tag])

    def reap(self) -> tuple[list[str], int]:
        """Mark for restore each message not renewed for `lease_s` that no live lease holds;
        returns their tags, and how many messages wait for a restore (these and earlier ones)."""
        keys = [LEASES_KEY, OWNERS_KEY, self.index_key]
        orphans, waiting = self._reap(keys=keys, args=[self.lease_s, REAP_LIMIT])
        return [as_text(t) for t in orphans], int(waiting)

    def release(self) -> None:
        """Drop every lease (a clean shutdown has acknowledged or handed back its messages)."""
        self.renew([])


def hand_back(redis: Any, instance: str, index_key: str = UNACKED_INDEX) -> int:
    """Give back every message a dead process held: those it leased, for the next restore to
    requeue, and those it fetched but had not claimed, straight to their queues (the supervisor
    calls this when its child dies); returns how many."""
    script = redis.register_script(_HAND_BACK)
    keys = [LEASES_KEY, OWNERS_KEY, lease_key(instance), index_key]
    return int(script(keys=keys, args=[instance])) + hand_back_fetching(redis, instance)


class HeldMessages:
    """The messages this process received and whose jobs have not ended, on any channel.

    A job ends when Celery acknowledges or rejects its message. Celery marks its request
    acknowledged even when the broker did not hear it (Redis down at that instant: "Couldn't
    ack" / "Couldn't reject"), while kombu's message stays unacknowledged; such a message is no
    longer held here, so its lease lapses and the reap puts it back (the job runs again, or its
    done mark drops it). Renewing it would keep it from every worker for as long as this process
    lives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, Any] = {}  # delivery tag -> the Celery request of its job

    def add(self, request: Any) -> str:
        """Track one received job by its Celery request; returns its message's delivery tag."""
        tag = str(request.message.delivery_tag)
        with self._lock:
            self._requests[tag] = request
        return tag

    def tags(self) -> list[str]:
        """The tags of the messages whose jobs have not ended (ended ones are forgotten)."""
        with self._lock:
            for tag in [t for t, r in self._requests.items() if _ended(r)]:
                del self._requests[tag]
            return list(self._requests)


def _ended(request: Any) -> bool:
    """Acknowledged or rejected, by the broker's word or by Celery's attempt."""
    return bool(request.acknowledged or request.message.acknowledged)


class Renewer:
    """The thread that renews this process's leases every `every_s` until stopped, and ends the
    process when its model thread has had work without progress for `stale_after_s`."""

    def __init__(
        self,
        keeper: LeaseKeeper,
        held: HeldMessages,
        every_s: float,
        *,
        stalled_s: Callable[[], float] = lambda: 0.0,
        stale_after_s: float = float("inf"),
        on_stalled: Callable[[float], None] | None = None,
    ) -> None:
        self.keeper = keeper
        self.held = held
        self.every_s = every_s
        self.stalled_s = stalled_s
        self.stale_after_s = stale_after_s
        self.on_stalled = on_stalled or exit_stalled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capworks-leases", daemon=True)

    def start(self) -> None:
        """Renew now, then every `every_s` on the thread."""
        self.renew_once()
        self._thread.start()

    def renew_once(self) -> bool:
        """One renewal, unless the model thread is stuck; False when it is (nothing renewed)."""
        stalled = self.stalled_s()
        if stalled >= self.stale_after_s:
            self.on_stalled(stalled)
            return False
        try:
            self.keeper.renew(self.held.tags())
        except Exception as exc:  # noqa: BLE001 - logged; the next renewal tries again
            log.warning("lease renewal failed (%r); trying again in %.1f s", exc, self.every_s)
        return True

    def stop(self) -> None:
        """Stop renewing and release the leases (after the warm shutdown's drain)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.every_s + 5)
        try:
            self.keeper.renew(self.held.tags())  # what is still unacknowledged stays leased
            if not self.held.tags():
                self.keeper.release()
        except Exception as exc:  # noqa: BLE001 - the leases expire by themselves
            log.warning("could not release the leases (%r); they expire by themselves", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if not self.renew_once():
                return


def exit_stalled(stalled_s: float) -> None:
    """End this process now: its model thread has had work for `stalled_s` without progress
    (a hung GPU, a deadlock). A warm shutdown would wait on the hung batch for ever; the
    supervisor hands the jobs back at once, and without one the leases lapse."""
    log.critical(
        "the model thread made no progress for %.0f s with images waiting: exiting so that "
        "its jobs go to another worker (exit %d)",
        stalled_s,
        EXIT_STALLED,
    )
    logging.shutdown()
    os._exit(EXIT_STALLED)


def model_stalled_s() -> float:
    """How long this process's model thread has had work without progress (0 before the
    runtime is built)."""
    from capworks.workers.runtime import built_runtime

    runtime = built_runtime()
    return runtime.path.batcher.stalled_s() if runtime is not None else 0.0


_held = HeldMessages()
_renewer: Renewer | None = None
_renewer_lock = threading.Lock()


def start_renewer(channel: Any) -> Renewer:
    """This process's renewal thread, started by the first consumer start (once)."""
    global _renewer
    from capworks.schema.queue import make_redis
    from capworks.schema.settings import get_settings

    with _renewer_lock:
        if _renewer is None:
            settings = get_settings()
            every_s = renew_every_s(settings.lease_s)
            client = make_redis(settings, socket_timeout_s=every_s)
            keeper = LeaseKeeper(client, instance_id(), settings.lease_s, channel.unacked_index_key)
            _renewer = Renewer(
                keeper,
                _held,
                every_s,
                stalled_s=model_stalled_s,
                stale_after_s=settings.heartbeat_stale_s,
            )
            _renewer.start()
            signals.worker_shutdown.connect(stop_renewer, weak=False)
        return _renewer


def stop_renewer(**_: Any) -> None:
    """`worker_shutdown`, sent once the pool has drained: stop renewing, release the leases."""
    if _renewer is not None:
        _renewer.stop()


class LeaseStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """The consumer bootstep: leases each message on receipt, starts the renewal thread, and
    reaps and sweeps on the consumer's timer (`renew_every_s`)."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._tref: Any = None
        self._renewer: Renewer | None = None
        self._sweeper: FetchingSweeper | None = None

    def start(self, c: Any) -> None:
        """Start (once) the renewal thread, and reaping on this consumer's timer."""
        self._renewer = start_renewer(c.task_consumer.channel)
        self._sweeper = FetchingSweeper(self._renewer.keeper.redis)
        self.tick(c)
        self._tref = c.timer.call_repeatedly(self._renewer.every_s, self.tick, (c,))
        signals.task_received.connect(self.received, sender=c, weak=False)

    def received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """`task_received`, on the consumer's thread: hold and lease the message now."""
        if self._renewer is None or request is None:
            return
        tag = _held.add(request)
        try:
            self._renewer.keeper.hold(tag)
        except Exception as exc:  # noqa: BLE001 - the next renewal leases it
            log.warning("could not lease a message on receipt (%r)", exc)

    def tick(self, c: Any) -> None:
        """Reap, restore what was reaped through this consumer's channel, and sweep fetched
        but unclaimed jobs back to their queues."""
        if self._renewer is None or self._sweeper is None:
            return
        try:
            orphans, waiting = self._renewer.keeper.reap()
            if orphans:
                log.warning("%d job(s) lost their worker: back to the queue", len(orphans))
            if waiting:
                c.task_consumer.channel.qos.restore_visible(num=None, interval=1)
            self._sweeper.sweep()
        except Exception as exc:  # noqa: BLE001 - logged; the next tick tries again
            log.warning("reaping failed (%r); trying again next tick", exc)

    def stop(self, c: Any) -> None:
        """Stop reaping on this consumer (a reconnect, or the shutdown); the renewal thread
        goes on until the pool has drained."""
        signals.task_received.disconnect(self.received, sender=c)
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
