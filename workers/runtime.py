"""Per-process worker resources, built once on first use (never at import time): the model on
its device, the batcher, the S3 client, the database engine, Redis, and thread pools."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Engine

from schema.checkpoint import resolve_checkpoint
from schema.db import connect
from schema.settings import Settings
from schema.storage import make_s3_client
from workers.batcher import Batcher
from workers.engine import OfaEngine
from workers.fetch import Fetcher
from workers.persist import ResultWriter

log = logging.getLogger(__name__)
DELIVERY_KEY = "capworks:deliveries:{}"
DONE_KEY = "capworks:done:{}"
KEY_TTL_S = 7 * 24 * 3600


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

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Load the model and open every connection."""
        config = resolve_checkpoint(settings.model, settings.revision, settings.checkpoint_dir)
        engine = OfaEngine.from_settings(config, settings)
        db = connect(settings.database_url)
        return cls(
            settings=settings,
            engine=engine,
            batcher=Batcher(engine, settings.batch_size, settings.max_batch_wait_ms),
            fetcher=Fetcher(
                make_s3_client(settings), settings.max_image_bytes, settings.http_timeout_s
            ),
            db=db,
            writer=ResultWriter(db, config),
            redis=redis.Redis.from_url(settings.broker_url),
            fetch_pool=ThreadPoolExecutor(16, "capworks-fetch"),
        )

    def count_delivery(self, job_id: str) -> int:
        """How many times this job has been delivered, this delivery included."""
        key = DELIVERY_KEY.format(job_id)
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, KEY_TTL_S)
        return int(pipe.execute()[0])

    def is_done(self, job_id: str) -> bool:
        """True when a job with this id has already been fully committed."""
        return bool(self.redis.exists(DONE_KEY.format(job_id)))

    def mark_done(self, job_id: str) -> None:
        """Remember that a job is committed, so a redelivered copy is dropped."""
        self.redis.set(DONE_KEY.format(job_id), 1, ex=KEY_TTL_S)
        self.redis.delete(DELIVERY_KEY.format(job_id))


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    """The process's runtime, built by the first job thread that asks."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime.build(settings)
            log.info("worker runtime ready: %s on %s", settings.model, _runtime.engine.device)
        return _runtime
