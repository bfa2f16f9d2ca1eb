"""Captions out: `capworks export` of captions from PostgreSQL, time and peak RSS growth.
Goal (issue 25, item 5): 1,000,000 captions to Parquet in <= 30 s, RSS flat.

    .venv/bin/python bench/export.py [--captions 1000000] [--formats parquet,parquet-rows,...]

Fills a scratch PostgreSQL database with `--captions` images and captions (set-based SQL:
S3 URIs, ETags, a 6-word caption, two alternatives, three tags, as workers store them), then
runs the export path (`run_export`, what `capworks export` calls) to a local file once per
format, each in a child process of its own so that peak RSS is its alone, and reads each
Parquet file back to check its row count. `parquet` reads PostgreSQL by COPY into Arrow
(`capworks/export_copy.py`); `parquet-rows` is the row path it replaced (`iter_batches`, patched
into its child), and the two files are compared row for row. The database and files are
removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from child_rss import peak_growth_bytes, rss_bytes, run_in_child
from scratch_pg import scratch_database
from sqlalchemy import text

from capworks.commands import export as export_command
from capworks.commands.export import ExportRequest, run_export
from capworks.export import iter_batches
from capworks.schema.db import connect

GOAL_S = 30.0

FILL = [
    """INSERT INTO images (uri, bucket, key, etag, size_bytes, first_seen, updated_at)
       SELECT 's3://library/photos/' || lpad((n / 10000)::text, 4, '0') || '/IMG_'
              || lpad(n::text, 7, '0') || '.jpg',
              'library', 'photos/' || lpad((n / 10000)::text, 4, '0') || '/IMG_'
              || lpad(n::text, 7, '0') || '.jpg',
              md5(n::text), 200000 + n, now(), now()
       FROM generate_series(1, :n) AS n""",
    """INSERT INTO captions (image_id, model_id, revision, settings_hash, settings, text, score,
                             alternatives, tags, created)
       SELECT id, 'damo/ofa_image-caption_coco_distilled_en', 'v1.0.1', 'abc123', '{}'::json,
              'a red bus parked on a street ' || id, -0.42,
              '[{"text": "a red bus on a street", "score": -0.61},
                {"text": "a bus parked outside", "score": -0.83}]'::json,
              '{"bus": 1.0, "red": 0.82, "street": 0.64}'::jsonb,
              now() - (id || ' seconds')::interval
       FROM images""",
]


def measure(db_url: str, out: str, fmt: str) -> dict[str, Any]:
    """One export (in a child of its own): its time and peak RSS growth."""
    if fmt == "parquet-rows":  # the way before: rows from psycopg, built into Arrow in Python
        export_command._batches = lambda db, window, _: iter_batches(db, window)  # type: ignore[assignment]
        fmt = "parquet"
    base = rss_bytes()
    started = time.perf_counter()
    run_export(ExportRequest(out, fmt, db_url, show_progress=False))  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rss": peak_growth_bytes(base)}


def same_rows(one: Path, other: Path) -> bool:
    """True when two Parquet exports hold the same rows (in any order)."""
    tables = [pq.read_table(path).sort_by("uri") for path in (one, other)]
    return bool(tables[0].equals(tables[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--formats", default="parquet,parquet-rows,jsonl,csv")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="capworks-export-bench-"))
    try:
        with scratch_database() as db_url:
            engine = connect(db_url)
            started = time.perf_counter()
            with engine.begin() as conn:
                for statement in FILL:
                    conn.execute(text(statement), {"n": args.captions})
            with engine.connect() as conn:
                conn.execute(text("ANALYZE"))
            engine.dispose()
            print(f"filled {args.captions:,} captions in {time.perf_counter() - started:.1f} s")
            seconds = {}
            for fmt in args.formats.split(","):
                out = tmp / f"captions.{fmt}"
                r = run_in_child(measure, db_url, str(out), fmt)
                seconds[fmt] = r["seconds"]
                size_mb = out.stat().st_size / 2**20
                check = ""
                if fmt.startswith("parquet"):
                    rows = pq.ParquetFile(out).metadata.num_rows
                    check = f", {rows:,} rows read back"
                goal = f" (goal <= {GOAL_S:.0f} s)" if fmt.startswith("parquet") else ""
                print(
                    f"{fmt:12s} {r['seconds']:6.1f} s{goal}, "
                    f"{args.captions / r['seconds']:9,.0f} captions/s, {size_mb:6.1f} MiB, "
                    f"peak RSS +{r['rss'] / 2**20:.1f} MiB{check}"
                )
                if not fmt.startswith("parquet"):
                    out.unlink()
            if {"parquet", "parquet-rows"} <= set(seconds):
                same = same_rows(tmp / "captions.parquet", tmp / "captions.parquet-rows")
                ratio = seconds["parquet-rows"] / seconds["parquet"]
                print(f"parquet by COPY: {ratio:.2f}x the row path's speed; same rows: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
