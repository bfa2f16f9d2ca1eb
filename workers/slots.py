"""Run slots of one worker process: jobs share it, a suspect job runs alone."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class RunSlots:
    """Job threads run side by side (shared), except a suspect job, which runs alone (exclusive):
    it waits for the running jobs to finish, and new jobs wait for it. Waiting exclusive holders
    go first, so a suspect is never starved. Two copies of one job id never run at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._waiting = 0
        self._job_ids: set[str] = set()

    @property
    def running(self) -> int:
        """How many jobs hold a slot now."""
        with self._cond:
            return self._shared + int(self._exclusive)

    @property
    def waiting(self) -> int:
        """How many jobs wait for a slot, or for another copy of themselves to finish."""
        with self._cond:
            return self._waiting

    def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Wait (holding the condition) until `ready()`, counted in `waiting` meanwhile."""
        self._waiting += 1
        try:
            self._cond.wait_for(ready)
        finally:
            self._waiting -= 1

    @contextmanager
    def one_copy(self, job_id: str) -> Iterator[None]:
        """Wait while another copy of this job runs in this process, then hold the job id."""
        with self._cond:
            self._wait_for(lambda: job_id not in self._job_ids)
            self._job_ids.add(job_id)
        try:
            yield
        finally:
            with self._cond:
                self._job_ids.discard(job_id)
                self._cond.notify_all()

    @contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        """Hold a slot for the duration of the block."""
        with self._cond:
            if exclusive:
                self._waiting_exclusive += 1
                self._wait_for(lambda: self._shared == 0 and not self._exclusive)
                self._waiting_exclusive -= 1
                self._exclusive = True
            else:
                self._wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()
