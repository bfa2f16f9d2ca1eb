"""Waiting for Redis replicas before a producer moves its position on.

Redis acknowledges a publish once it is in the primary's memory. With `appendfsync everysec` a
crash of the primary loses up to a second of writes, and an asynchronous replica promoted in a
failover may lack the last ones; a producer that has already acted on its publish (committed a
crawl position, deleted an SQS message, committed a filer position, answered 200) has then
dropped those jobs for good. With `enqueue_wait_replicas` set, a producer calls `wait_for_replicas`
after publishing a batch and before it acts: Redis `WAIT` returns once that many replicas hold
every write made before it, or reports fewer after the timeout, and then `ReplicasBehind` (a
`RedisError`) makes the producer treat the batch as unpublished: it keeps its position and
publishes again (duplicates are absorbed; see RELIABILITY.md).

`WAIT` counts the writes of the connection it is sent on, and jobs go out on Celery's own
connection; so the wait first writes a mark on its connection. Replication is one ordered stream:
a replica that holds the mark holds every publish that Redis acknowledged before it.
"""

from __future__ import annotations

import logging
from typing import Any

from redis import RedisError

log = logging.getLogger(__name__)
MARK_KEY = "capworks:replicated"  # a counter each wait writes, so that WAIT has a write to count


class ReplicasBehind(RedisError):
    """Fewer Redis replicas than asked for acknowledged a published batch in time."""


def wait_for_replicas(client: Any, replicas: int, timeout_ms: int) -> None:
    """Return once `replicas` replicas of `client`'s Redis hold every write it acknowledged
    before this call; raise `ReplicasBehind` when fewer do after `timeout_ms`. 0: return."""
    if replicas <= 0:
        return
    pipe = client.pipeline(transaction=False)  # one connection: the mark, then WAIT for it
    pipe.incr(MARK_KEY)
    pipe.wait(replicas, timeout_ms)
    _, acked = pipe.execute()
    if int(acked) < replicas:
        log.warning("%d of %d Redis replicas hold the published jobs", int(acked), replicas)
        raise ReplicasBehind(
            f"{int(acked)} of {replicas} Redis replicas acknowledged the published jobs within "
            f"{timeout_ms} ms: the position is not moved on"
        )
