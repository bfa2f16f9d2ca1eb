"""kombu's Redis transport with a reliable fetch: no job is lost between Redis and a worker.

kombu takes a message with BRPOP and records it as unacknowledged (the `unacked` hash and
`unacked_index`) in a second command. A message popped in the instant Redis goes down, or whose
reply never reaches the worker, is in neither place: the fault suite's Redis restart lost one job
this way in each of its runs.

This transport takes a message with BLMOVE into a list of the consuming channel's own
(`capworks:fetching:<instance>:<token>:<queue>`, the pattern Redis documents for reliable
queues), and one Lua script then removes it from that list and records it as unacknowledged,
atomically. So at every instant a message is in the queue, in a fetching list, or in `unacked`.
Before each fetch the channel registers its list in `capworks:fetching` with a deadline (Redis
server time plus the fetch's wait): a live channel claims what it moved within milliseconds, so
an entry in a list whose deadline passed `STALE_AFTER_S` ago was left behind (its worker died,
its connection dropped, its reply was never read). `FetchingSweeper`, run on every worker's lease
tick, moves such entries back to the head of their queues in one script per list; a channel that
reads its reply later finds nothing to claim and drops it, so the job is delivered once. The
sweep costs one sorted-set range per tick whatever the size of the farm or the keyspace.

Only a channel that consumes a single Redis list can block on BLMOVE (one source key), so
capworks runs with one priority step (`priority_steps: [0]`); a channel consuming several lists
falls back to kombu's BRPOP, with a warning. `global_keyprefix` is not supported with it.
`SentinelTransport` is the same fetch behind Redis Sentinels (`sentinel://` broker URLs).
"""

from __future__ import annotations

import base64
import logging
import uuid
from queue import Empty
from time import monotonic, time
from typing import Any, Protocol

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from capworks.schema.instance import instance_id

log = logging.getLogger(__name__)

FETCHING_KEY = "capworks:fetching:{instance}:{token}:{queue}"
REGISTRY_KEY = "capworks:fetching"  # sorted set: fetching list -> deadline of its latest fetch
STALE_AFTER_S = 3.0  # past a fetch's deadline, far beyond a live channel's claim (milliseconds)
SWEEP_LIMIT = 100  # lists drained per sweep

# KEYS: fetching list, unacked_index, unacked. ARGV: raw message, delivery tag, (unused), the
# unacked record, "1" when the consumer does not acknowledge. 0: the entry was swept back. The
# delivery time is Redis's clock, the one the leases compare it with (workers/leases.py).
_CLAIM = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if ARGV[5] == '0' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
end
return 1
"""

# KEYS: registry, fetching list. ARGV: seconds the fetch may wait. The deadline is Redis's own
# clock, so hosts whose clocks disagree still agree on what is stale.
_REGISTER = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1]), KEYS[2])
"""

# KEYS: registry, fetching list, queue. ARGV: seconds past the deadline ("force": any). Moves
# every entry back to the queue's head and forgets the list, if it is (still) stale.
_DRAIN = """
if ARGV[1] ~= 'force' then
  local deadline = redis.call('ZSCORE', KEYS[1], KEYS[2])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  if deadline and tonumber(deadline) > now - tonumber(ARGV[1]) then return 0 end
end
local moved = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', 'RIGHT') do moved = moved + 1 end
redis.call('ZREM', KEYS[1], KEYS[2])
return moved
"""

QUARANTINE_KEY = "capworks:quarantine:{queue}"  # list: entries of a queue that were no messages
QUARANTINE_MAX_ENTRIES = 10_000  # per queue; the oldest are dropped past it

# KEYS: fetching list, quarantine list. ARGV: the raw entry, the quarantine's length bound.
# Moves a fetched entry that is no message to the quarantine in one step, so the sweep can never
# put it back in the queue for the next worker. 0: the entry was swept back first.
_QUARANTINE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
return 1
"""


class BadEntry(ValueError):
    """A queue entry that is not a kombu message: kombu cannot deliver, acknowledge or requeue
    it, and raising it out of a fetch ends the worker (Celery calls it unrecoverable)."""


def quarantine_key(queue: str) -> str:
    """The list a queue's entries that were no messages are moved to (`capworks dlq` shows it)."""
    return QUARANTINE_KEY.format(queue=queue)


def envelope_of(item: bytes | str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """A raw queue entry's kombu message, its delivery tag and delivery info, each checked
    where kombu would index it; raises `BadEntry` with the reason when it is not one."""
    try:
        payload = loads(as_text(item))
    except (ValueError, TypeError, KeyError) as exc:  # UTF-8 and JSON errors are ValueErrors
        raise BadEntry(f"not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise BadEntry(f"JSON {type(payload).__name__}, not a kombu message")
    props = payload.get("properties")
    if not isinstance(props, dict):
        raise BadEntry("JSON object with no kombu properties")
    if not isinstance(payload.get("headers") or {}, dict):
        raise BadEntry("kombu message whose headers are not an object")
    tag = props.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        raise BadEntry("kombu message with no delivery tag")
    info = props.get("delivery_info")
    if not isinstance(info, dict) or not {"exchange", "routing_key"} <= info.keys():
        raise BadEntry("kombu message with no delivery info (exchange, routing key)")
    body, encoding = payload.get("body"), props.get("body_encoding")
    if body is not None and not isinstance(body, str):
        raise BadEntry(f"kombu message whose body is a JSON {type(body).__name__}")
    if body and encoding == "base64":
        try:
            base64.b64decode(body)  # as kombu decodes it: junk is skipped, bad padding raises
        except ValueError as exc:
            raise BadEntry(f"kombu message whose body is not base64: {exc}") from exc
    elif encoding not in (None, "base64", "utf-8"):
        raise BadEntry(f"kombu message with an unknown body encoding {encoding!r}")
    return payload, tag, info


class QuarantineRecorder(Protocol):
    """Keeps a record of an entry moved to its queue's quarantine (the worker writes a
    `bad_messages` row)."""

    def __call__(self, queue: str, item: bytes, reason: str) -> None: ...


_recorder: QuarantineRecorder | None = None


def record_quarantined_with(recorder: QuarantineRecorder | None) -> None:
    """Have `recorder` keep a record of every entry this process's channels quarantine (the
    transport cannot import the worker that owns the database)."""
    global _recorder
    _recorder = recorder


def quarantine_entry(
    client: Any,
    fetching: str,
    queue: str,
    item: bytes,
    reason: str,
    max_entries: int = QUARANTINE_MAX_ENTRIES,
) -> bool:
    """Move `item` from the fetching list to `queue`'s quarantine, atomically, and have the
    recorder keep it; False where the sweep had already put it back in the queue. A failure to
    record is logged, never raised: the entry is kept in the quarantine list either way."""
    move = client.register_script(_QUARANTINE)
    if not move(keys=[fetching, quarantine_key(queue)], args=[item, max_entries], client=client):
        return False
    log.error(
        "queue %r held an entry that is no message (%s): moved to %s: %r",
        queue,
        reason,
        quarantine_key(queue),
        item[:200],
    )
    if _recorder is not None:
        try:
            _recorder(queue, item, reason)
        except Exception:  # noqa: BLE001 - the entry is kept in the list; the cause is logged
            log.exception("could not record the quarantined entry of %r", queue)
    return True


def fetching_key(instance: str, token: str, queue: str) -> str:
    """The list a channel's fetches move messages into before it claims them."""
    return FETCHING_KEY.format(instance=instance, token=token, queue=queue)


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (clients may or may not decode replies)."""
    return value.decode() if isinstance(value, bytes) else value


def queue_of(key: str) -> str:
    """The queue a fetching list's messages came from (the key's last part)."""
    return key.split(":", 4)[4]


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, except that a message the fetch has already claimed is not recorded
    again (the claim wrote its `unacked` entry atomically with taking it)."""

    def restore_unacked(self, client: Any = None) -> Any:
        """kombu's hand-back of this channel's delivered messages as the channel closes, except
        when the transport was detached from its connection first: kombu then has no address
        to reach Redis with and raised AttributeError, which Celery takes as unrecoverable, and
        the worker exited (seen in the Redis restart test, two outages seconds apart). The
        messages stay in `unacked`, as when Redis is down at that moment, and the leases hand
        them back once this process stops renewing them."""
        transport = getattr(self.channel, "connection", None)
        if transport is not None and getattr(transport, "client", None) is None:
            log.warning(
                "channel closed after its connection: %d held job(s) left to the leases",
                len(self._delivered),
            )
            return None
        return super().restore_unacked(client)

    def append(self, message: Any, delivery_tag: str) -> None:
        """Track a delivered message; record it in Redis unless the fetch did."""
        if delivery_tag in self.channel.claimed:
            self.channel.claimed.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)


class AfterMove(Protocol):
    """Called with a fetched entry between its move into the fetching list and its claim:
    where a test stops Redis or kills the worker (`Channel.after_move`)."""

    def __call__(self, queue: str, item: bytes) -> None: ...


class Channel(kombu_redis.Channel):
    """A Redis channel whose fetch cannot lose a message (see the module docstring)."""

    QoS = QoS
    # kombu's own: the connection a fetch is outstanding on (False or None when none), and when.
    _in_poll: Any = False
    _brpop_sent_at: float | None = None  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.claimed: set[str] = set()
        self._token = uuid.uuid4().hex[:12]
        self._no_ack: dict[str, bool] = {}
        self._moving_from: str | None = None
        self._warned_brpop = False
        self._saved_params: dict[str, Any] | None = None
        # None in service; a test sets it to fault the fetch at its one fragile instant.
        self.after_move: AfterMove | None = None
        super().__init__(*args, **kwargs)
        self._connparams()  # remembered for acknowledgements after the channel closes
        self._claim = self.client.register_script(_CLAIM)
        self._register = self.client.register_script(_REGISTER)

    def _connparams(self, asynchronous: bool = False) -> Any:
        """kombu's connection parameters, remembered: once the channel is closed (its
        connection lost and replaced), kombu has no address left, and the acknowledgement of a
        job that ran across the reconnect raised AttributeError ('NoneType' object has no
        attribute 'client'), which Celery takes as unrecoverable: the worker died and the job
        ran again elsewhere. With the remembered address the acknowledgement reaches Redis."""
        if self.connection is None and not asynchronous and self._saved_params is not None:
            return dict(self._saved_params)
        params = super()._connparams(asynchronous)
        if not asynchronous:
            self._saved_params = dict(params)
        return params

    def fetching_key(self, queue: str) -> str:
        """This channel's fetching list for `queue`."""
        return fetching_key(instance_id(), self._token, queue)

    def register_fetch(self, queue: str, wait_s: float) -> None:
        """Name this channel's fetching list for `queue` in the registry, with the deadline of
        a fetch about to wait up to `wait_s`."""
        with self.conn_or_acquire() as client:
            self._register(
                keys=[REGISTRY_KEY, self.fetching_key(queue)], args=[wait_s], client=client
            )

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        """Consume `queue`, remembering whether its consumer acknowledges."""
        no_ack = args[0] if args else kwargs.get("no_ack", False)
        self._no_ack[queue] = bool(no_ack)
        return super().basic_consume(queue, *args, **kwargs)

    def _source(self, queues: list[str]) -> str | None:
        """The one Redis list a fetch from `queues` blocks on, or None where there are several
        (several queues or priority steps) and kombu's BRPOP has to take it."""
        keys = {self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues}
        if len(keys) == 1 and not self.global_keyprefix:
            return str(keys.pop())
        if not self._warned_brpop:
            self._warned_brpop = True
            log.warning(
                "queues %s are read from %d Redis lists (priority steps %s) or under a key "
                "prefix: taken with BRPOP, a job can be lost if Redis goes down as it is taken; "
                "consume one queue with one priority step for the reliable fetch",
                queues,
                len(keys),
                self.priority_steps,
            )
        return None

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        source = self._source(list(queues))
        if source is None:
            self._moving_from = None
            super()._brpop_start(timeout)
            return
        wait_s = self.brpop_timeout if timeout is None else timeout
        self.register_fetch(queues[0], wait_s or 0)
        self._moving_from = queues[0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(
            "BLMOVE", source, self.fetching_key(queues[0]), "RIGHT", "LEFT", wait_s or 0
        )

    def _brpop_read(self, **options: Any) -> bool:
        queue = self._moving_from
        if queue is None:
            return bool(super()._brpop_read(**options))
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                # What was moved stays in the fetching list for the sweep; reconnect next time.
                self.client.connection.disconnect()
                raise
            if not item or not self._claim_and_deliver(queue, item):
                raise Empty()
            return True
        finally:
            self._in_poll = None
            self._moving_from = None
            self._flush_brpop_reauth()

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        source = self._source([queue])
        if source is None:
            return super()._get(queue)
        self.register_fetch(queue, 0)
        with self.conn_or_acquire() as client:
            item = client.lmove(source, self.fetching_key(queue), "RIGHT", "LEFT")
        if item is None:
            raise Empty()
        if self.after_move is not None:
            self.after_move(queue, item)
        payload = self._claimed_payload(queue, item)
        if payload is None:
            raise Empty()
        return payload

    def _claim_and_deliver(self, queue: str, item: bytes) -> bool:
        if self.after_move is not None:
            self.after_move(queue, item)
        payload = self._claimed_payload(queue, item)
        if payload is None:
            return False
        self._queue_cycle.rotate(queue)
        self.connection._deliver(payload, queue)
        return True

    def _claimed_payload(self, queue: str, item: bytes) -> Any:
        """Claim a moved message (out of the fetching list, into `unacked`, in one script);
        its payload, or None where the sweep had already put it back in the queue or the entry
        was no message (then it is quarantined: raising here would end the worker, and the
        sweep would hand the entry to the next one)."""
        try:
            payload, tag, info = envelope_of(item)
        except BadEntry as exc:
            with self.conn_or_acquire() as client:
                quarantine_entry(client, self.fetching_key(queue), queue, item, str(exc))
            return None
        record = dumps([payload, info["exchange"], info["routing_key"]])
        no_ack = "1" if self._no_ack.get(queue, False) else "0"
        with self.conn_or_acquire() as client:
            keys = [self.fetching_key(queue), self.unacked_index_key, self.unacked_key]
            won = self._claim(keys=keys, args=[item, tag, time(), record, no_ack], client=client)
        if not won:
            log.warning("a fetched job was swept back to %r before it was claimed", queue)
            return None
        if no_ack == "0":
            self.claimed.add(tag)
        return payload


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with `Channel`'s reliable fetch."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """The reliable fetch on kombu's Sentinel channel: every connection it opens goes to the
    primary the Sentinels name at that moment, so a reconnect after a failover follows it
    (`sentinel://` broker URLs, schema/sentinel.py)."""


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with `SentinelChannel`'s reliable fetch."""

    Channel = SentinelChannel


class FetchingSweeper:
    """Moves the entries of stale fetching lists (deadline `stale_after_s` ago) back to the head
    of their queues."""

    def __init__(self, redis: Any, stale_after_s: float = STALE_AFTER_S) -> None:
        self.redis = redis
        self.stale_after_s = stale_after_s
        self._drain = redis.register_script(_DRAIN)

    def sweep(self, stale_after_s: float | None = None) -> int:
        """One sweep; returns how many messages went back to their queues."""
        grace_s = self.stale_after_s if stale_after_s is None else stale_after_s
        seconds, micros = self.redis.time()
        cutoff = seconds + micros / 1e6 - grace_s
        lists = self.redis.zrangebyscore(REGISTRY_KEY, "-inf", cutoff, start=0, num=SWEEP_LIMIT)
        moved = sum(self.drain(as_text(raw), grace_s) for raw in lists)
        if moved:
            log.warning("put %d fetched but unclaimed jobs back in their queues", moved)
        return moved

    def drain(self, key: str, grace_s: float | str) -> int:
        """Move fetching list `key`'s entries back to its queue and forget it, if its deadline
        passed `grace_s` ago ("force": whatever its deadline); returns how many moved."""
        return int(self._drain(keys=[REGISTRY_KEY, key, queue_of(key)], args=[grace_s]))


def hand_back_fetching(redis: Any, instance: str) -> int:
    """Move every entry of a dead process's fetching lists back to its queue at once (its
    supervisor calls this); returns how many."""
    sweeper = FetchingSweeper(redis)
    lists = redis.zscan_iter(REGISTRY_KEY, match=f"capworks:fetching:{instance}:*", count=1000)
    return sum(sweeper.drain(as_text(raw), "force") for raw, _ in lists)
