"""The worker's write path: caption rows (with their images and tags) upserted per second into
PostgreSQL by `ResultWriter.save`, in worker-sized chunks. Goal (issue 3): >= 10,000 rows/s.

    .venv/bin/python bench/db_write.py [--rows 20000] [--chunk 256] [--db URL]

The default database is a scratch one created on the local PostgreSQL and dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from scratch_pg import scratch_database

from schema.checkpoint import CheckpointConfig
from schema.db import connect
from schema.uris import ImageRef
from workers.engine import Alternative, Caption, CaptionedImage
from workers.persist import Outcome, ResultWriter

WORDS = "a man riding a horse on a beach next to the ocean at sunset".split()


def outcome(i: int) -> Outcome:
    """A realistic caption with four alternatives for image i."""
    text_ = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8))
    alts = tuple(
        Alternative(" ".join(WORDS[(i + k + j) % len(WORDS)] for k in range(8)), -1.0 - j)
        for j in range(1, 5)
    )
    ref = ImageRef(
        f"s3://photos/bench/{i:08d}.jpg",
        bucket="photos",
        key=f"bench/{i:08d}.jpg",
        etag=f"{i:032x}",
        size_bytes=100_000 + i,
    )
    return Outcome(ref, CaptionedImage(Caption(text_, -0.4, alts, (0, 1, 2)), 640, 480))


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--db", help="SQLAlchemy URL (default: a scratch PostgreSQL database)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.db or stack.enter_context(scratch_database())
        engine = connect(url)
        writer = ResultWriter(engine, CheckpointConfig(Path("."), "bench-model", "r1"))
        outcomes = [outcome(i) for i in range(args.rows)]
        results = []
        for label in ("insert", "re-write (upsert of existing rows)"):
            started = time.perf_counter()
            for n in range(0, len(outcomes), args.chunk):
                writer.save(outcomes[n : n + args.chunk])
            elapsed = time.perf_counter() - started
            results.append((label, elapsed, args.rows / elapsed))
        engine.dispose()
    print("| pass | caption rows | chunk | seconds | rows/s | vs goal 10,000/s |")
    print("|---|---|---|---|---|---|")
    for label, elapsed, rate in results:
        print(
            f"| {label} | {args.rows:,} | {args.chunk} | {elapsed:.2f} | {rate:,.0f} | "
            f"{rate / 10000:.2f}x |"
        )


if __name__ == "__main__":
    main()
