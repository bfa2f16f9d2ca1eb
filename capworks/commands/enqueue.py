"""`capworks enqueue`: crawl sources into jobs, with a progress bar and a summary."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from producer.crawl import CrawlStats, Filters, crawl_id_for, run_crawl
from producer.enqueue import make_publisher
from producer.sources import InputError
from schema.checkpoint import resolve_checkpoint
from schema.db import connect
from schema.settings import get_settings
from schema.storage import make_s3_client
from schema.uris import is_s3


def run_enqueue(args: argparse.Namespace) -> int:
    """Crawl each source to the end (resuming where a previous run stopped)."""
    settings = get_settings()
    db = connect(args.db)
    identity = resolve_checkpoint(args.model, args.revision, settings.checkpoint_dir).identity
    publisher = make_publisher(settings)
    s3 = make_s3_client(settings) if any(is_s3(s) for s in args.sources) else None
    filters = Filters(
        frozenset(s.lower() for s in args.suffix),
        args.min_bytes,
        args.max_bytes,
        args.modified_since,
    )
    console = Console(stderr=True)
    for source in args.sources:
        if args.crawl_id and len(args.sources) > 1:
            raise InputError("--crawl-id names one crawl: give one source with it")
        crawl_id = args.crawl_id or crawl_id_for(source, filters, identity)
        started = time.monotonic()
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            disable=args.no_progress,
        ) as progress:
            task = progress.add_task(source, total=None)

            def show(
                stats: CrawlStats,
                source: str = source,
                task: TaskID = task,
                started: float = started,
            ) -> None:
                rate = stats.enqueued / max(time.monotonic() - started, 1e-6)
                progress.update(
                    task,
                    description=(
                        f"{source}: listed {stats.listed:,}  skipped {stats.skipped:,}  "
                        f"enqueued {stats.enqueued:,} ({rate:,.0f}/s)"
                    ),
                )

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
                on_progress=show,
            )
        resumed = f", resumed after {stats.resumed_from!r}" if stats.resumed_from else ""
        print(
            f"crawl {crawl_id} of {source}: listed {stats.listed}, skipped {stats.skipped}, "
            f"enqueued {stats.enqueued} in {stats.jobs} jobs{resumed}"
        )
    return 0
