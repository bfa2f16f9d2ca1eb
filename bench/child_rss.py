"""One measured piece of work in a child process of its own, so that its peak RSS is its alone
(the benchmarks of issue 25 compare old and new code in one run)."""

from __future__ import annotations

import multiprocessing
import os
import resource
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth_bytes(base: int) -> int:
    """How far this process's peak RSS rose above `base` (an `rss_bytes()` taken earlier)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def _child(work: Callable[..., dict[str, Any]], args: tuple[Any, ...], out: Connection) -> None:
    out.send(work(*args))


def run_in_child(work: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`work(*args)` in a forked child; its figures (a dict) come back through a pipe."""
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(work, args, child))
    proc.start()
    result: dict[str, Any] = parent.recv()
    proc.join()
    return result
