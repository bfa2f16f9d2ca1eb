"""Per-process worker resources, built once on first use (never at import time): the model on
its device, the batcher, the S3 client, the database engine, Redis, and thread pools."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import torch
from sqlalchemy import Engine

from schema.backoff import compute_backoff
from schema.checkpoint import resolve_checkpoint
from schema.db import connect
from schema.errors import CapworksError
from schema.settings import Settings
from schema.storage import make_s3_client
from workers import metrics
from workers.batcher import Batcher
from workers.engine import OfaEngine
from workers.fetch import Fetcher
from workers.persist import DatabaseUnavailable, Outcome, ResultWriter, SaveCounts

log = logging.getLogger(__name__)
RUNS_KEY = "capworks:runs:{}"
DONE_KEY = "capworks:done:{}"
KEY_TTL_S = 7 * 24 * 3600
T = TypeVar("T")


@dataclass
class Runtime:
    """Everything a job needs, shared by the job threads of one worker process."""

    settings: Settings
    engine: OfaEngine
    batcher: Batcher
    fetcher: Fetcher
    db: Engine
    writer: ResultWriter
    redis: Any
    fetch_pool: ThreadPoolExecutor
    slots: RunSlots = field(default_factory=lambda: RunSlots())

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Load the model and open every connection."""
        config = resolve_checkpoint(settings.model, settings.revision, settings.checkpoint_dir)
        # The batcher's thread loads the model and is the only one to run it (see batcher.py).
        batcher = Batcher(
            lambda: OfaEngine.from_settings(config, settings),
            settings.batch_size,
            settings.max_batch_wait_ms,
        )
        engine = batcher.engine
        db = connect(settings.database_url)
        return cls(
            settings=settings,
            engine=engine,
            batcher=batcher,
            fetcher=Fetcher(
                make_s3_client(settings), settings.max_image_bytes, settings.http_timeout_s
            ),
            db=db,
            writer=ResultWriter(db, config),
            redis=redis.Redis.from_url(settings.broker_url),
            fetch_pool=ThreadPoolExecutor(16, "capworks-fetch"),
        )

    def save(
        self, outcomes: list[Outcome], job_id: str | None = None, trace: str | None = None
    ) -> SaveCounts:
        """Commit final outcomes (captions and dead letters) and count them in the metrics;
        while the database is down, wait for it (the job stays unacknowledged meanwhile)."""
        with metrics.WRITE_SECONDS.time():
            counts = self.durably(lambda: self.writer.save(outcomes, job_id=job_id, trace=trace))
        for o in outcomes:
            if isinstance(o.result, CapworksError):
                metrics.IMAGES.labels("dead_letter", o.result.code.value).inc()
            else:
                metrics.IMAGES.labels("captioned", "").inc()
        return counts

    def durably(self, write: Callable[[], T]) -> T:
        """Run a database write until it succeeds: a database outage is waited out with a
        backoff that grows to `database_retry_cap_s`, never turned into a lost job."""
        attempt = 1
        while True:
            try:
                return write()
            except DatabaseUnavailable as exc:
                delay_s = compute_backoff(
                    attempt, self.settings.retry_base_s, self.settings.database_retry_cap_s
                )
                log.warning(
                    "database unavailable (%s); writing again in %.1f s (wait %d)",
                    exc.message,
                    delay_s,
                    attempt,
                )
                metrics.DATABASE_WAITS.inc()
                time.sleep(delay_s)
                attempt += 1

    def unfinished_runs(self, job_id: str) -> int:
        """How many runs of this job started and never finished: its process died each time."""
        return int(self.redis.get(RUNS_KEY.format(job_id)) or 0)

    def count_run(self, job_id: str) -> None:
        """Record that a run of this job starts (cleared by `mark_done` when it finishes)."""
        key = RUNS_KEY.format(job_id)
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, KEY_TTL_S)
        pipe.execute()

    def is_done(self, job_id: str) -> bool:
        """True when a job with this id has already been fully committed."""
        return bool(self.redis.exists(DONE_KEY.format(job_id)))

    def mark_done(self, job_id: str) -> None:
        """Remember that a job is committed, so a redelivered copy is dropped."""
        self.redis.set(DONE_KEY.format(job_id), 1, ex=KEY_TTL_S)
        self.redis.delete(RUNS_KEY.format(job_id))


class RunSlots:
    """Job threads run side by side (shared), except a suspect job, which runs alone (exclusive):
    it waits for the running jobs to finish, and new jobs wait for it. Waiting exclusive holders
    go first, so a suspect is never starved. Two copies of one job id never run at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._job_ids: set[str] = set()

    @contextmanager
    def one_copy(self, job_id: str) -> Iterator[None]:
        """Wait while another copy of this job runs in this process, then hold the job id."""
        with self._cond:
            self._cond.wait_for(lambda: job_id not in self._job_ids)
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
                self._cond.wait_for(lambda: self._shared == 0 and not self._exclusive)
                self._waiting_exclusive -= 1
                self._exclusive = True
            else:
                self._cond.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
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


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    """The process's runtime, built by the first job thread that asks."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime.build(settings)
            log.info(
                "worker runtime ready: %s on %s, %d torch threads",
                settings.model,
                _runtime.engine.device,
                torch.get_num_threads(),
            )
        return _runtime
