"""`capworks enqueue`: crawl sources into jobs, with a progress bar and a summary."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from capworks.models import resolve_model_identity
from capworks.producer.crawl import CrawlStats, Filters, crawl_id_for, run_crawl
from capworks.producer.enqueue import crawl_lock, make_publisher
from capworks.producer.imagenames import IMAGE_SUFFIXES, suffix_set
from capworks.producer.inventory import SCHEME as INVENTORY_SCHEME
from capworks.producer.inventory import is_inventory
from capworks.producer.inventory_eta import inventory_rows
from capworks.producer.listing import ListingPlan, collect_less, describe_position
from capworks.producer.sources import InputError, count_uri_file
from capworks.producer.tables import TableSpec, table_rows
from capworks.schema.broker_check import check_broker
from capworks.schema.db import connect
from capworks.schema.settings import get_settings
from capworks.schema.storage import make_s3_client
from capworks.schema.uris import is_s3
from capworks.workers.fileroots import FileRoots

log = logging.getLogger(__name__)


def run_enqueue(args: argparse.Namespace) -> int:
    """Crawl each source to the end (resuming where a previous run stopped), one run per crawl
    at a time; `--reconcile` lists anew and enqueues whatever SQL does not show as done."""
    settings = get_settings()
    collect_less()
    publisher = make_publisher(settings)
    for warning in check_broker(publisher.redis, settings.allow_evicting_broker):
        log.warning("%s", warning)
    db = connect(args.db)
    identity = resolve_model_identity(args.model, args.revision, settings, say=say)
    for line in file_root_notes(args.sources, settings.file_roots):
        say(line)
    s3 = (
        make_s3_client(settings)
        if any(is_s3(s) or s.startswith(INVENTORY_SCHEME) for s in args.sources)
        else None
    )
    if args.list_processes > args.list_streams:
        raise InputError("--list-processes cannot be more than --list-streams")
    listing = ListingPlan(
        args.list_streams, args.prefixes, args.list_processes, partial(make_s3_client, settings)
    )
    table = table_spec(args)
    filters = Filters(
        suffix_set(args.suffix) or None,
        args.min_bytes,
        args.max_bytes,
        args.modified_since,
    )
    console = Console(stderr=True)
    for source in args.sources:
        if args.crawl_id and len(args.sources) > 1:
            raise InputError("--crawl-id names one crawl: give one source with it")
        crawl_id = args.crawl_id or crawl_id_for(source, filters, identity)
        total = expected_objects(source, args.expect)
        if total is None and table is not None:
            total = table_rows(source)
        elif total is None and is_inventory(source):
            total = inventory_rows(source, s3)
        with (
            crawl_lock(db, crawl_id, wait=args.wait),
            CrawlProgress(source, total, console, disable=args.no_progress) as bar,
        ):
            stats = run_crawl(
                source,
                crawl_id=crawl_id,
                db=db,
                publisher=publisher,
                s3_client=s3,
                identity=identity,
                filters=filters,
                job_images=settings.job_images,
                max_queued_images=settings.max_queued_images,
                force=args.force,
                reconcile=args.reconcile,
                retry_failed=args.retry_failed,
                on_progress=bar.show,
                listing=listing,
                table=table,
            )
        resumed = (
            f", resumed after {describe_position(stats.resumed_from)}" if stats.resumed_from else ""
        )
        print(
            f"crawl {crawl_id} of {source}: listed {stats.listed}, skipped {stats.skipped}, "
            f"enqueued {stats.enqueued} in {stats.jobs} jobs{resumed}"
        )
        if stats.not_images:
            print(not_images_line(stats.not_images, filters.suffixes or IMAGE_SUFFIXES))
    return 0


def not_images_line(count: int, suffixes: frozenset[str]) -> str:
    """The summary's line on what the suffix policy skipped (producer/imagenames.py)."""
    names = "name" if count == 1 else "names"
    return f"  {count} {names} not ending in {' '.join(sorted(suffixes))} (any case): skipped"


class CrawlProgress:
    """A progress bar for one crawl: listed / expected with ETA, listing rate, skipped, enqueued.

    Rate and ETA count this run's listing only: a resumed crawl starts the bar at what earlier
    runs listed."""

    def __init__(
        self, source: str, total: int | None, console: Console, disable: bool = False
    ) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=disable,
        )
        self._source = source
        self._total = total
        self._task = self.progress.add_task(source, total=total)
        self._started = time.monotonic()
        self._first: int | None = None

    def __enter__(self) -> CrawlProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, stats: CrawlStats) -> None:
        """Update the bar from the crawl's counts."""
        if self._first is None:
            self._first = stats.listed
            self._started = time.monotonic()
            self.progress.reset(self._task, total=self._total, completed=stats.listed)
            return
        rate = (stats.listed - self._first) / max(time.monotonic() - self._started, 1e-6)
        self.progress.update(
            self._task,
            completed=stats.listed,
            description=(
                f"{self._source}: listed {stats.listed:,} ({rate:,.0f}/s)  "
                f"skipped {stats.skipped:,}  enqueued {stats.enqueued:,}"
            ),
        )


def file_root_notes(sources: list[str], roots: tuple[Path, ...]) -> list[str]:
    """One line per local folder that the file roots of this host's settings do not cover:
    workers read no local file unless told, so every image of such a crawl would be
    dead-lettered as `forbidden_path` on a worker started the same way."""
    inside = FileRoots(roots).covers
    notes = []
    for source in sources:
        folder = Path(source).expanduser().absolute()
        if "://" not in source and folder.is_dir() and not inside(folder):
            notes.append(
                f"note: workers read local files only under their file roots: start them with "
                f"`capworks worker --file-root {folder}` or CAPWORKS_FILE_ROOTS={folder}"
            )
    return notes


def say(line: str) -> None:
    """A line for the person at the terminal, on stderr at once."""
    print(f"capworks: {line}", file=sys.stderr, flush=True)


def table_spec(args: argparse.Namespace) -> TableSpec | None:
    """The columns to read when the sources are tables (`--url-col`), else None."""
    if args.url_col is None:
        if args.id_col or args.keep_cols:
            raise InputError("--id-col and --keep-cols read tables: give --url-col too")
        return None
    return TableSpec(args.url_col, args.id_col, args.keep_cols)


def expected_objects(source: str, expect: int | None) -> int | None:
    """How many objects the listing will give, for the ETA: `--expect`, or a URI list's length.
    S3 and folders do not say up front (unknown: the bar shows counts and rate, no ETA); tables
    and inventories are sized by `table_rows` and `inventory_rows`."""
    if expect is not None:
        return expect
    if source.startswith("@"):
        try:
            return count_uri_file(Path(source[1:]))
        except OSError:
            return None  # the crawl reports the missing list with its own error
    return None
