"""Run slots: jobs share the process, a suspect job runs alone and is not starved. Threads are
ordered by events and by `RunSlots.waiting`, never by sleeps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from capworks.workers.slots import RunSlots


def until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    """Until `condition()` holds (polled); fails with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_suspect_waits_for_running_jobs_and_later_jobs_wait_for_it() -> None:
    slots = RunSlots()
    log: list[str] = []
    lock = threading.Lock()
    release = {name: threading.Event() for name in ("a", "b")}
    alone: list[int] = []

    def job(name: str, exclusive: bool) -> None:
        with slots.hold(exclusive):
            with lock:
                log.append(f"{name}+")
            if name in release:
                assert release[name].wait(10)
            if exclusive:
                alone.append(slots.running)
            with lock:
                log.append(f"{name}-")

    first = [threading.Thread(target=job, args=(n, False)) for n in ("a", "b")]
    for t in first:
        t.start()
    until(lambda: {"a+", "b+"} <= set(log), "a and b to run")
    suspect = threading.Thread(target=job, args=("s", True))
    suspect.start()
    until(lambda: slots.waiting == 1, "s to wait for a and b")
    late = threading.Thread(target=job, args=("c", False))
    late.start()  # c arrives while s waits: s goes first
    until(lambda: slots.waiting == 2 or "c+" in log, "c to wait (or, wrongly, to run)")
    release["a"].set()
    release["b"].set()
    for t in [*first, suspect, late]:
        t.join(timeout=10)
    assert log[:2] in (["a+", "b+"], ["b+", "a+"])  # shared jobs ran side by side
    assert log.index("s+") > max(log.index("a-"), log.index("b-"))  # the suspect ran alone...
    assert log.index("s-") == log.index("s+") + 1 and alone == [1]
    assert log.index("c+") > log.index("s-")  # ...and was not overtaken by a later job


def test_a_second_copy_of_a_job_waits_for_the_first() -> None:
    slots = RunSlots()
    log: list[str] = []
    release = threading.Event()

    def copy(name: str) -> None:
        with slots.one_copy("job-1"):
            log.append(f"{name}+")
            if name == "first":
                assert release.wait(10)
            log.append(f"{name}-")

    threads = [threading.Thread(target=copy, args=(n,)) for n in ("first", "second")]
    threads[0].start()
    until(lambda: log == ["first+"], "the first copy to run")
    threads[1].start()
    until(lambda: slots.waiting == 1 or "second+" in log, "the second copy to wait")
    with slots.one_copy("job-2"):  # another job id is not held up
        log.append("other")
    release.set()
    for t in threads:
        t.join(timeout=10)
    assert log == ["first+", "other", "first-", "second+", "second-"]
