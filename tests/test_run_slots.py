"""Run slots: jobs share the process, a suspect job runs alone and is not starved."""

from __future__ import annotations

import threading
import time

from capworks.workers.slots import RunSlots


def test_a_suspect_waits_for_running_jobs_and_later_jobs_wait_for_it() -> None:
    slots = RunSlots()
    log: list[str] = []
    lock = threading.Lock()

    def job(name: str, exclusive: bool, hold_s: float) -> None:
        with slots.hold(exclusive):
            with lock:
                log.append(f"{name}+")
            time.sleep(hold_s)
            with lock:
                log.append(f"{name}-")

    first = [threading.Thread(target=job, args=(n, False, 0.3)) for n in ("a", "b")]
    for t in first:
        t.start()
    time.sleep(0.1)  # a and b are running
    suspect = threading.Thread(target=job, args=("s", True, 0.3))
    suspect.start()
    time.sleep(0.1)  # s waits for a and b
    late = threading.Thread(target=job, args=("c", False, 0.0))
    late.start()  # c arrives while s waits: s goes first
    for t in [*first, suspect, late]:
        t.join(timeout=5)
    assert set(log[:2]) == {"a+", "b+"}  # shared jobs ran side by side
    assert log.index("s+") > max(log.index("a-"), log.index("b-"))  # the suspect ran alone...
    assert log.index("s-") == log.index("s+") + 1
    assert log.index("c+") > log.index("s-")  # ...and was not overtaken by a later job


def test_a_second_copy_of_a_job_waits_for_the_first() -> None:
    slots = RunSlots()
    log: list[str] = []

    def copy(name: str) -> None:
        with slots.one_copy("job-1"):
            log.append(f"{name}+")
            time.sleep(0.2)
            log.append(f"{name}-")

    threads = [threading.Thread(target=copy, args=(n,)) for n in ("first", "second")]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    with slots.one_copy("job-2"):  # another job id is not held up
        log.append("other")
    for t in threads:
        t.join(timeout=5)
    assert log == ["first+", "other", "first-", "second+", "second-"]
