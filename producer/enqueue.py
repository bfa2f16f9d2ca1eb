"""Publishing jobs: the Python API for upload hooks, and the crawl set-up for `capworks enqueue`
(the publisher, and the lock that lets one run of a crawl publish at a time)."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from capworks.producer.crawl import Publisher
from capworks.schema.jobs import Job
from capworks.schema.queue import CAPTION_TASK, make_celery, make_redis, task_reprs
from capworks.schema.settings import Settings, get_settings
from capworks.schema.uris import ImageRef, is_s3, parse_s3

log = logging.getLogger(__name__)
LOCK_POLL_S = 1.0
_Lock = tuple[Callable[[], bool], Callable[[], None]]  # (try to take it, let it go)


class CrawlLocked(ValueError):
    """Another run holds the crawl (a cron job overlapping a slow run)."""


def make_publisher(settings: Settings) -> Publisher:
    """A publisher on the configured broker."""
    app = make_celery(settings)

    def send(body: dict[str, Any]) -> None:
        app.send_task(CAPTION_TASK, args=[body], queue=settings.queue_name, **task_reprs(body))

    return Publisher(
        send,
        make_redis(settings),
        settings.queue_name,
        settings.job_images,
        settings.enqueue_wait_replicas,
        settings.enqueue_wait_timeout_ms,
    )


def enqueue(
    images: Iterable[str | ImageRef],
    settings: Settings | None = None,
    publisher: Publisher | None = None,
) -> list[str]:
    """Enqueue images now (e.g. from an upload hook), `job_images` per job; returns the job ids."""
    settings = settings or get_settings()
    publisher = publisher or make_publisher(settings)
    refs = [to_ref(i) for i in images]
    job_ids = []
    for start in range(0, len(refs), settings.job_images):
        job = Job.new(refs[start : start + settings.job_images])
        publisher.publish(job)
        job_ids.append(job.job_id)
    publisher.confirm()  # the caller acts on the ids: replicas hold the jobs first, if asked
    return job_ids


def to_ref(image: str | ImageRef) -> ImageRef:
    """A reference for a URI string (bucket and key filled in for `s3://`)."""
    if isinstance(image, ImageRef):
        return image
    if is_s3(image):
        loc = parse_s3(image)
        return ImageRef(uri=image, bucket=loc.bucket, key=loc.key)
    return ImageRef(uri=image)


@contextmanager
def crawl_lock(db: Engine, crawl_id: str, wait: bool = False) -> Iterator[None]:
    """Hold the crawl for this run: PostgreSQL `pg_try_advisory_lock` on a connection of its
    own, SQLite `flock` on a file beside the database. Either is freed when the process dies.

    Raises `CrawlLocked` when another run holds it, or with `wait` polls until it is free.
    """
    try_lock, release = _lock_for(db, crawl_id)
    try:
        waited = False
        while not try_lock():
            if not wait:
                raise CrawlLocked(
                    f"crawl {crawl_id} is being run by another process; give --wait to run after it"
                )
            if not waited:
                log.warning("crawl %s is being run by another process: waiting", crawl_id)
                waited = True
            time.sleep(LOCK_POLL_S)
        yield
    finally:
        release()


def _lock_for(db: Engine, crawl_id: str) -> _Lock:
    digest = hashlib.sha256(f"capworks-crawl:{crawl_id}".encode()).digest()
    if db.dialect.name == "postgresql":
        return _pg_lock(db.connect(), int.from_bytes(digest[:8], "big", signed=True))
    if db.dialect.name == "sqlite":
        database = db.url.database
        if not database or database == ":memory:":  # no other process can open it
            return (lambda: True), (lambda: None)
        return _file_lock(Path(f"{database}.crawl-{digest[:8].hex()}.lock"))
    raise CrawlLocked(f"cannot lock crawls on {db.dialect.name}: use PostgreSQL or SQLite")


def _pg_lock(conn: Connection, key: int) -> _Lock:
    held = False

    def try_lock() -> bool:
        nonlocal held
        held = bool(conn.scalar(select(func.pg_try_advisory_lock(key))))
        conn.commit()  # a session lock outlives the transaction; no transaction stays open
        return held

    def release() -> None:
        try:
            if held:
                conn.scalar(select(func.pg_advisory_unlock(key)))
                conn.commit()
        finally:
            conn.invalidate()  # never hand a connection that may hold the lock back to the pool
            conn.close()

    return try_lock, release


def _file_lock(path: Path) -> _Lock:
    f = path.open("a")

    def try_lock() -> bool:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    return try_lock, f.close  # closing the file frees the lock
