"""Tables in: URIs enqueued per second from a Parquet table, and the producer's peak RSS growth.
Goal (issue 25, item 2): a table of 1,000,000 URLs enqueued at >= 20,000 URIs/s, RSS flat.

    .venv/bin/python bench/table_enqueue.py [--rows 1000000] [--row-group 100000]

Writes a Parquet table of `--rows` rows (`url` s3://library/photos/.../IMG_n.jpg, `key`,
`caption`) and the same URLs as a URI list, then crawls each into a scratch queue on Redis
database 14 through the real publisher (crawl state in a scratch SQLite file, or a scratch
PostgreSQL database where a case says so), each in a child process of its own so that peak RSS
is its alone: the URI list (`@FILE`, the way in before tables), the table with `--url-col url`,
and the table with `--id-col key --keep-cols caption` (which also writes each image's id and
kept columns into `images`), on SQLite and on PostgreSQL, each also with the ORM bulk upsert
those columns were written with before (`orm_upsert`, patched into the crawl in its child),
and on PostgreSQL with the crawl's done check before (`two_lookups_drop_done`, two lookups a
page; patched likewise).
The queue and its marks are deleted after each crawl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import redis
from child_rss import peak_growth_bytes, rss_bytes, run_in_child
from scratch_pg import scratch_database
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from capworks.producer import crawl
from capworks.producer.crawl import IMAGE_FAULTS, SENT_KEY, Filters, run_crawl
from capworks.producer.enqueue import make_publisher
from capworks.producer.tables import TableRef, TableSpec
from capworks.schema.db import connect
from capworks.schema.redact import redact_uri
from capworks.schema.settings import Settings
from capworks.schema.tables import Caption, Failure, Image, utcnow
from capworks.schema.uris import ImageRef

REDIS_URL = "redis://127.0.0.1:6379/14"
GOAL_URIS_PER_S = 20_000


def make_inputs(tmp: Path, rows: int, row_group: int) -> tuple[Path, Path]:
    urls = [f"s3://library/photos/{i // 10_000:04d}/IMG_{i:07d}.jpg" for i in range(rows)]
    table = pa.table(
        {
            "url": urls,
            "key": [f"{i:09d}" for i in range(rows)],
            "caption": [f"an alt text of image {i}" for i in range(rows)],
        }
    )
    parquet = tmp / "images.parquet"
    pq.write_table(table, parquet, row_group_size=row_group)
    listing = tmp / "images.txt"
    listing.write_text("\n".join(urls) + "\n")
    return parquet, listing


def orm_upsert(session: Session, refs: list[ImageRef]) -> None:
    """The way a page's ids and kept columns were written before: the ORM's bulk upsert."""
    rows = [
        {
            "uri": ref.uri,
            "bucket": ref.bucket,
            "key": ref.key,
            "source_id": ref.source_id,
            "extra": json.loads(ref.extra_json) if ref.extra_json else None,
            "first_seen": utcnow(),
            "updated_at": utcnow(),
        }
        for ref in refs
        if isinstance(ref, TableRef) and (ref.source_id is not None or ref.extra_json)
    ]
    if rows:
        dialect = session.get_bind().dialect.name
        stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Image)
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[Image.uri],
                set_={"source_id": stmt.excluded.source_id, "extra": stmt.excluded.extra},
            ),
            rows,
        )


def two_lookups_drop_done(
    session: Session,
    refs: list[ImageRef],
    identity: tuple[str, str, str],
    failed_too: bool,
    retry_failed: bool = False,
) -> list[ImageRef]:
    """The crawl's done check before (a copy): two lookups a page, the page's URIs as 1,000
    bound parameters each."""
    if not refs:
        return refs
    model_id, revision, settings_hash = identity
    # Rows name an http(s) image by its masked URI: one object, one row, whatever its token.
    stored = {ref.uri: redact_uri(ref.uri) for ref in refs}
    uris = list(dict.fromkeys(stored.values()))
    done: dict[str, str | None] = dict(
        session.execute(
            select(Image.uri, Image.etag)
            .join(Caption, Caption.image_id == Image.id)
            .where(
                Image.uri.in_(uris),
                Caption.model_id == model_id,
                Caption.revision == revision,
                Caption.settings_hash == settings_hash,
            )
        ).all()
    )
    failed = select(Image.uri, Image.etag).join(Failure, Failure.image_id == Image.id)
    if failed_too:
        done.update(session.execute(failed.where(Image.uri.in_(uris))).all())
    elif not retry_failed:
        permanent = failed.where(
            Image.uri.in_(uris),
            Failure.code.in_([code.value for code in IMAGE_FAULTS]),
            Failure.model_id.in_([model_id, ""]),  # "": a letter from before letters had models
        )
        done.update(session.execute(permanent).all())
    # An object whose ETag changed since it was captioned is captioned again.
    return [
        ref
        for ref in refs
        if stored[ref.uri] not in done
        or (ref.etag is not None and done[stored[ref.uri]] != ref.etag)
    ]


def measure(
    source: str, table: TableSpec | None, tmp: str, db_url: str | None, old: str
) -> dict[str, Any]:
    """One crawl to the end (in a child of its own): its count, time and peak RSS growth."""
    queue = f"bench-table-{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=REDIS_URL, queue_name=queue)
    publisher = make_publisher(settings)
    if old == "orm":
        crawl.save_table_columns = orm_upsert  # this child only
    if old == "two lookups":
        crawl._drop_done = two_lookups_drop_done  # this child only
    db = connect(db_url or f"sqlite:///{tmp}/crawl-{queue}.db")
    base = rss_bytes()
    started = time.perf_counter()
    stats = run_crawl(
        source,
        crawl_id=queue,
        db=db,
        publisher=publisher,
        s3_client=None,
        identity=("bench", "", "x"),
        filters=Filters(),
        job_images=settings.job_images,
        max_queued_images=10**9,
        table=table,
    )
    seconds = time.perf_counter() - started
    r = redis.Redis.from_url(REDIS_URL)
    r.delete(queue)
    marks = list(r.scan_iter(match=SENT_KEY.format(f"{queue}-*"), count=10_000))
    for start in range(0, len(marks), 1000):
        r.delete(*marks[start : start + 1000])
    db.dispose()
    return {"enqueued": stats.enqueued, "seconds": seconds, "rss": peak_growth_bytes(base)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--row-group", type=int, default=100_000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="capworks-table-bench-"))
    try:
        parquet, listing = make_inputs(tmp, args.rows, args.row_group)
        sizes_mb = [path.stat().st_size / 2**20 for path in (parquet, listing)]
        print(f"{args.rows:,} rows: Parquet {sizes_mb[0]:.1f} MiB, URI list {sizes_mb[1]:.1f} MiB")
        keep = TableSpec("url", "key", ("caption",))
        cases = [
            ("URI list (@FILE)", f"@{listing}", None, False, ""),
            ("Parquet --url-col url", str(parquet), TableSpec("url"), False, ""),
            ("Parquet --id-col key --keep-cols caption", str(parquet), keep, False, ""),
            ("  the same, ORM upsert (before)", str(parquet), keep, False, "orm"),
            ("Parquet --id-col key --keep-cols caption", str(parquet), keep, True, ""),
            ("  the same, ORM upsert (before)", str(parquet), keep, True, "orm"),
            ("  the same, two done lookups (before)", str(parquet), keep, True, "two lookups"),
        ]
        wanted = set(args.databases.split(","))
        rates = {}
        for label, source, table, on_pg, old in cases:
            if ("postgresql" if on_pg else "sqlite") not in wanted:
                continue
            if on_pg:
                with scratch_database() as db_url:
                    r = run_in_child(measure, source, table, tmp, db_url, old)
            else:
                r = run_in_child(measure, source, table, tmp, None, old)
            rates[f"{label} ({'PostgreSQL' if on_pg else 'SQLite'})"] = rate = (
                r["enqueued"] / r["seconds"]
            )
            goal = "meets" if rate >= GOAL_URIS_PER_S else "misses"
            print(
                f"{label:42s} {'PostgreSQL' if on_pg else 'SQLite':10s} "
                f"{r['enqueued']:>9,} URIs in {r['seconds']:6.1f} s = "
                f"{rate:8,.0f} URIs/s ({goal} the {GOAL_URIS_PER_S:,}/s goal), "
                f"peak RSS +{r['rss'] / 2**20:.1f} MiB"
            )
        base = rates.get("URI list (@FILE) (SQLite)")
        for label, rate in rates.items():
            if base:
                print(f"{label}: {rate / base:.2f}x the URI list's rate")
        pg = "Parquet --id-col key --keep-cols caption (PostgreSQL)"
        before = "  the same, two done lookups (before) (PostgreSQL)"
        if pg in rates and before in rates:
            print(f"PostgreSQL, one done lookup a page: {rates[pg] / rates[before]:.2f}x two")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
