"""Waiting out a broker or database that is down while a process starts.

A worker started during a Redis or PostgreSQL restart (a deploy, a failover, a host booting
before its services) waits for them, as Celery's own consumer does for its broker, instead of
exiting: only `Unreachable` (refused, dropped, timed out) is waited for, with the capped, jittered
backoff of every other retry, until `start_wait_s` has passed. A bad URL, a refused CONFIG or an
evicting broker fails at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from capworks.schema.backoff import compute_backoff
from capworks.schema.errors import Unreachable

log = logging.getLogger(__name__)
T = TypeVar("T")


def wait_until_reachable(
    attempt: Callable[[], T],
    what: str,
    wait_s: float,
    base_s: float = 1.0,
    cap_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`attempt()`'s result, calling it again after a backoff while it raises `Unreachable`
    and less than `wait_s` has passed; then the last `Unreachable` is raised."""
    deadline = clock() + wait_s
    tries = 1
    while True:
        try:
            return attempt()
        except Unreachable as exc:
            left_s = deadline - clock()
            if left_s <= 0:
                raise
            delay_s = min(max(compute_backoff(tries, base_s, cap_s), 0.1), left_s)
            log.warning(
                "%s unreachable at start (%s); trying again in %.1f s (wait %d, %.0f s left)",
                what,
                exc.message,
                delay_s,
                tries,
                left_s,
            )
            sleep(delay_s)
            tries += 1
