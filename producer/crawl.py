"""A resumable crawl: list a source, skip what is filtered or already captioned, and publish
chunks of references as jobs, recording progress in SQL after every page of the listing.

Resuming: the crawl row keeps the position after the last published page. A page's jobs are
written to the row (`pending_job`) before they are published and cleared with the new position
after, and each publish is marked in Redis; so a crawl killed between the two republishes exactly
the jobs not marked as sent, with their ids unchanged (workers drop a job id they have committed);
every other job gets an id no run has used before.

An object the database cannot hold (a file name that is not UTF-8, a URI over the column's
length) is kept in `bad_messages` and counted as skipped, so it never stalls the crawl.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, String, any_, bindparam, exists, or_, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from capworks.producer.imagenames import is_image_name
from capworks.producer.inventory import is_inventory, iter_inventory
from capworks.producer.listing import (
    ONE_STREAM,
    ListingPlan,
    is_parts_position,
    iter_parallel_pages,
)
from capworks.producer.replicas import wait_for_replicas
from capworks.producer.sources import InputError, iter_positions
from capworks.producer.tables import TableSpec, iter_table, row_problem, save_table_columns
from capworks.schema.errors import Code
from capworks.schema.jobs import MAX_ROOT_ID_CHARS, MAX_URI_CHARS, Job, new_job_id, unstorable
from capworks.schema.redact import redact, redact_uri, stored_text
from capworks.schema.tables import BadMessage, Caption, Crawl, Failure, Image, utcnow
from capworks.schema.uris import ImageRef, is_http, is_s3

log = logging.getLogger(__name__)
SENT_KEY = "capworks:sent:{}"
SENT_TTL_S = 7 * 24 * 3600
PAGE_SIZE = 1000  # listed objects per progress commit: one S3 ListObjectsV2 page


@dataclass(frozen=True)
class Filters:
    """Which listed objects to caption."""

    # `--suffix` (lower case, with the dot), judged on every source; None: the image suffix
    # policy (producer/imagenames.py), judged on listings only (folders, prefixes, inventories)
    suffixes: frozenset[str] | None = None
    min_bytes: int | None = None
    max_bytes: int | None = None
    modified_since: datetime | None = None

    def named_as_image(self, ref: ImageRef, listing: bool) -> bool:
        """True when the object's name passes the suffix policy (`listing`: the source is a
        folder, prefix or inventory, not a list naming each image)."""
        if self.suffixes is not None:
            return is_image_name(ref.uri, self.suffixes)
        return not listing or is_image_name(ref.uri)

    def accept(self, ref: ImageRef) -> bool:
        """True when the object passes the size and time filters."""
        size = ref.size_bytes
        if size is not None and self.min_bytes is not None and size < self.min_bytes:
            return False
        if size is not None and self.max_bytes is not None and size > self.max_bytes:
            return False
        return not (
            self.modified_since and ref.last_modified and ref.last_modified < self.modified_since
        )


@dataclass
class CrawlStats:
    """Counts of one crawl so far (across resumes)."""

    listed: int = 0
    skipped: int = 0
    enqueued: int = 0
    jobs: int = 0
    not_images: int = 0  # of `skipped`, this run: names the suffix policy says are no images
    resumed_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Publisher:
    """Sends jobs to the queue and tells how many images wait there."""

    def __init__(
        self,
        send: Callable[[dict[str, Any]], None],
        redis: Any,
        queue: str,
        job_images: int,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self._send = send
        self.redis = redis
        self._queue = queue
        self._job_images = job_images
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms

    def publish(self, job: Job) -> None:
        """Send one job and mark it as sent."""
        self._send(job.to_wire())
        self.redis.set(SENT_KEY.format(job.job_id), 1, ex=SENT_TTL_S)

    def confirm(self) -> None:
        """Return once the configured number of Redis replicas hold every job published so
        far (none by default); raises `ReplicasBehind` (a `RedisError`) when they do not."""
        wait_for_replicas(self.redis, self._wait_replicas, self._wait_timeout_ms)

    def was_sent(self, job_id: str) -> bool:
        """True when a job id was published before."""
        return bool(self.redis.exists(SENT_KEY.format(job_id)))

    def queued_images(self) -> int:
        """About how many images wait in the queue (jobs times images per job)."""
        return int(self.redis.llen(self._queue)) * self._job_images


def crawl_id_for(source: str, filters: Filters, identity: tuple[str, str, str]) -> str:
    """A stable id for crawling this source with these filters for this model."""
    blob = json.dumps(
        [
            source,
            sorted(filters.suffixes or ()),
            filters.min_bytes,
            filters.max_bytes,
            str(filters.modified_since),
            identity,
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_crawl(
    source: str,
    *,
    crawl_id: str,
    db: Engine,
    publisher: Publisher,
    s3_client: Any | None,
    identity: tuple[str, str, str],
    filters: Filters = Filters(),
    job_images: int = 64,
    max_queued_images: int = 200_000,
    force: bool = False,
    reconcile: bool = False,
    retry_failed: bool = False,
    on_progress: Callable[[CrawlStats], None] | None = None,
    listing: ListingPlan = ONE_STREAM,
    page_size: int = PAGE_SIZE,
    table: TableSpec | None = None,
) -> CrawlStats:
    """Crawl `source` to the end (or resume it), publishing jobs; returns the counts.

    `reconcile` lists the source from the start whatever the crawl's state and pending jobs,
    and publishes every object with neither a caption by this model nor a failure: the way
    back from a lost queue, with SQL as the record of what is done.
    """
    if len(crawl_id) > MAX_ROOT_ID_CHARS:
        raise InputError(f"crawl id is {len(crawl_id)} characters; at most {MAX_ROOT_ID_CHARS}")
    with Session(db) as session:
        crawl = session.get(Crawl, crawl_id)
        if crawl is None or crawl.state == "done" or reconcile:
            crawl = _start(session, crawl, crawl_id, source)
        stats = CrawlStats(
            crawl.listed, crawl.skipped, crawl.enqueued, crawl.jobs, resumed_from=crawl.last_key
        )
        if crawl.pending_job:
            _finish_pending(session, crawl, publisher, stats)
        # Job ids are unique for ever: a crawl run again (finished, --force, a reused crawl id)
        # must not reuse an id whose done mark would make workers drop the new job. Only the
        # jobs of a cut-off page keep their ids (above), so a resume does not send them twice.
        run_id = f"{crawl_id}-{new_job_id()[:8]}"
        pages = source_pages(source, s3_client, crawl.last_key, listing, page_size, table)
        lists_names = is_listing(source, table)
        for position, page in pages:
            named = [r for r in page if filters.named_as_image(r, lists_names) or row_problem(r)]
            stats.not_images += len(page) - len(named)
            accepted = [ref for ref in named if filters.accept(ref) or row_problem(ref)]
            keep = _storable(session, crawl_id, accepted)
            if table is not None and table.keeps_columns:
                save_table_columns(session, keep)  # committed with the page's progress
            if not force:
                keep = _drop_done(session, keep, identity, reconcile, retry_failed)
            stats.listed += len(page)
            stats.skipped += len(page) - len(keep)
            jobs = [
                Job.new(
                    keep[n : n + job_images],
                    crawl_id,
                    job_id=f"{run_id}-{number:06d}",
                    model=identity,
                )
                for number, n in enumerate(range(0, len(keep), job_images), start=stats.jobs)
            ]
            if jobs:
                crawl.pending_job = json.dumps(
                    {"jobs": [job.to_wire() for job in jobs], "last_key": position}
                )
                crawl.listed, crawl.skipped = stats.listed, stats.skipped
                session.commit()
                # One queue-length read for the page when all of it fits: a round trip less a
                # job for a producer far from Redis. Else the room is checked before each job.
                fits = publisher.queued_images() + len(keep) <= max_queued_images
                for job in jobs:
                    if not fits:
                        wait_for_room(publisher, max_queued_images)
                    publisher.publish(job)
                publisher.confirm()  # the position moves on only once replicas hold the page
                stats.enqueued += len(keep)
                stats.jobs += len(jobs)
            _save(session, crawl, stats, last_key=position)
            if on_progress:
                on_progress(stats)
        crawl.state = "done"
        _save(session, crawl, stats, last_key=crawl.last_key)
    return stats


def _start(session: Session, old: Crawl | None, crawl_id: str, source: str) -> Crawl:
    if old is not None:  # a finished crawl runs again from the start; dedup skips what is done
        session.delete(old)
        session.flush()
    crawl = Crawl(
        id=crawl_id,
        source=redact(source),  # a presigned URL is kept without its signature
        state="running",
        listed=0,
        skipped=0,
        enqueued=0,
        jobs=0,
        created=utcnow(),
        updated=utcnow(),
    )
    session.add(crawl)
    session.commit()
    return crawl


def _finish_pending(
    session: Session, crawl: Crawl, publisher: Publisher, stats: CrawlStats
) -> None:
    pending = json.loads(crawl.pending_job or "{}")
    stats.resumed_from = pending["last_key"]
    for wire in pending["jobs"]:
        job = Job.from_wire(wire)
        if not publisher.was_sent(job.job_id):
            log.info("republishing job %s, cut off by the last run", job.job_id)
            publisher.publish(job)
        stats.enqueued += len(job.images)
        stats.jobs += 1
    publisher.confirm()
    _save(session, crawl, stats, last_key=pending["last_key"])


def _save(session: Session, crawl: Crawl, stats: CrawlStats, last_key: str | None) -> None:
    crawl.last_key = last_key
    crawl.pending_job = None
    crawl.listed, crawl.skipped = stats.listed, stats.skipped
    crawl.enqueued, crawl.jobs = stats.enqueued, stats.jobs
    crawl.updated = utcnow()
    session.commit()


def is_listing(source: str, table: TableSpec | None) -> bool:
    """True for a source that lists names (a folder, a prefix, an inventory), whose names the
    suffix policy judges; a URI list, a table or a single file names each image itself."""
    if table is not None or source.startswith("@"):
        return False
    return is_s3(source) or is_inventory(source) or Path(source).is_dir()


def source_pages(
    source: str,
    s3_client: Any | None,
    position: str | None,
    listing: ListingPlan,
    size: int,
    table: TableSpec | None = None,
) -> Iterator[tuple[str, list[ImageRef]]]:
    """(resume position after the page, page) of one source from a position: an S3 Inventory,
    a bucket listed by concurrent streams (a crawl begun so resumes so, whatever `listing` says
    now, and one begun with one stream goes on with one), or one stream of (position,
    reference) pairs cut into pages."""
    if table is not None:  # a table's rows, resumed by row number (producer/tables.py)
        return _pages(iter_table(source, s3_client, position, table), size)
    if is_inventory(source):
        return _pages(iter_inventory(source, s3_client, position), size)
    parallel = (listing.streams > 1 or bool(listing.prefixes)) and not position
    if is_s3(source) and (parallel or is_parts_position(position)):
        if s3_client is None:
            raise InputError(f"{source}: no S3 client configured")
        return iter_parallel_pages(source, s3_client, position, listing, size)
    return _pages(iter_positions(source, s3_client, position), size)


def _pages(
    items: Iterator[tuple[str, ImageRef]], size: int
) -> Iterator[tuple[str, list[ImageRef]]]:
    page: list[ImageRef] = []
    position = ""
    for position, ref in items:
        page.append(ref)
        if len(page) == size:
            yield position, page
            page = []
    if page:
        yield position, page


def unstorable_reason(uri: str) -> str | None:
    """Why the database cannot hold `uri` as an image (None when it can)."""
    problem = unstorable(uri)  # NUL, or surrogate escapes of a name that is not UTF-8
    if problem:
        return f"{'URI' if is_s3(uri) or is_http(uri) else 'file name'} {problem}"
    if len(uri) > MAX_URI_CHARS:
        return f"URI is {len(uri)} characters; the database holds at most {MAX_URI_CHARS}"
    return None


def not_a_uri_reason(uri: str) -> str | None:
    """Why `uri` names no image a worker could fetch (None when it can): a URI list line that
    is a table's header or row (`url,caption`, `https://x/a.jpg,a dog`), or a relative path."""
    if is_s3(uri):
        bucket, _, key = uri[len("s3://") :].partition("/")
        problem = None if bucket and key else "an s3:// URI needs a bucket and a key"
    elif is_http(uri):
        problem = None
        if any(c.isspace() for c in uri):
            problem = "an http(s) URL holds no spaces (a table row?)"
        elif not urlsplit(uri).netloc:
            problem = "an http(s) URL needs a host"
    else:
        problem = None if uri.startswith("/") else "a local path must be absolute"
    return f"not an image URI: {problem}" if problem else None


def _storable(session: Session, crawl_id: str, refs: list[ImageRef]) -> list[ImageRef]:
    """The references the database can hold; the others are kept in `bad_messages`, once per
    crawl (a crawl run again lists them again), in the transaction of the page's progress."""
    keep, bad = [], {}
    for ref in refs:
        reason = row_problem(ref) or unstorable_reason(ref.uri) or not_a_uri_reason(ref.uri)
        if reason is None:
            keep.append(ref)
        else:
            bad[stored_text(ref.uri, 10_000)] = reason  # cut before it is redacted
    if bad:
        job_key = f"crawl:{crawl_id}"
        known = set(
            session.scalars(
                select(BadMessage.body).where(
                    BadMessage.job_key == job_key, BadMessage.body.in_(list(bad))
                )
            )
        )
        for body, reason in bad.items():
            log.warning("skipped %s: %s (kept in bad_messages)", body[:300], reason)
            if body not in known:
                session.add(
                    BadMessage(job_key=job_key, reason=reason, body=body, received=utcnow())
                )
    return keep


# Dead letters whose cause is the image itself: the same bytes fail the same way every crawl.
# Others (storage, access, the file roots, the guard, the model) may be fixed since, so a crawl
# sends their images again.
IMAGE_FAULTS = frozenset(
    {
        Code.EMPTY,
        Code.UNDECODABLE,
        Code.TRUNCATED,
        Code.UNSUPPORTED_FORMAT,
        Code.TOO_LARGE_BYTES,
        Code.TOO_LARGE_PIXELS,
        Code.TOO_MANY_SCANS,
        Code.BAD_URI,
    }
)


def _drop_done(
    session: Session,
    refs: list[ImageRef],
    identity: tuple[str, str, str],
    failed_too: bool,
    retry_failed: bool = False,
) -> list[ImageRef]:
    """The objects not yet captioned by this model with this ETag, nor dead-lettered with this
    ETag: with `failed_too` for any cause, else (unless `retry_failed`) for a cause in the image
    itself (`IMAGE_FAULTS`) by this model."""
    if not refs:
        return refs
    model_id, revision, settings_hash = identity
    # Rows name an http(s) image by its masked URI: one object, one row, whatever its token.
    stored = {ref.uri: redact_uri(ref.uri) for ref in refs}
    uris = list(dict.fromkeys(stored.values()))
    # One statement a page, the URIs as one array parameter on PostgreSQL: two lookups of
    # 1,000 bound parameters each took ~90 ms a page, most of a table crawl's time there.
    done_by = [
        exists().where(
            Caption.image_id == Image.id,
            Caption.model_id == model_id,
            Caption.revision == revision,
            Caption.settings_hash == settings_hash,
        )
    ]
    if failed_too:
        done_by.append(exists().where(Failure.image_id == Image.id))
    elif not retry_failed:
        done_by.append(
            exists().where(
                Failure.image_id == Image.id,
                Failure.code.in_([code.value for code in IMAGE_FAULTS]),
                Failure.model_id.in_([model_id, ""]),  # "": a letter from before letters had models
            )
        )
    named = (
        Image.uri == any_(bindparam("uris", uris, type_=postgresql.ARRAY(String)))
        if session.get_bind().dialect.name == "postgresql"
        else Image.uri.in_(uris)
    )
    done: dict[str, str | None] = dict(
        session.execute(select(Image.uri, Image.etag).where(named, or_(*done_by))).all()
    )
    # An object whose ETag changed since it was captioned is captioned again.
    return [
        ref
        for ref in refs
        if stored[ref.uri] not in done
        or (ref.etag is not None and done[stored[ref.uri]] != ref.etag)
    ]


def wait_for_room(publisher: Publisher, max_queued_images: int) -> None:
    """Backpressure: pause while the queue holds more than the allowed number of images."""
    waited = False
    while publisher.queued_images() > max_queued_images:
        if not waited:
            log.info("queue holds over %d images: pausing the crawl", max_queued_images)
            waited = True
        time.sleep(0.5)
