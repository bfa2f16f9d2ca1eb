"""Producer throughput: URIs enqueued per second for a crawl of a large listing, and the Redis
bytes each queued URI costs. Goals (issue 3): >= 20,000 URIs/s and <= 200 bytes per URI.

    .venv/bin/python bench/enqueue_rate.py [--keys 100000] [--db URL] [--job-images 256]

The listing is a local file of S3 URIs (`@FILE` source); the queue is a scratch list in Redis
database 14; crawl state goes to the given database (a scratch SQLite file by default).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import redis

from producer.crawl import Filters, run_crawl
from producer.enqueue import make_publisher
from schema.db import connect
from schema.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/14"


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--job-images", type=int, default=256)
    parser.add_argument("--db", help="SQLAlchemy URL for crawl state (default: scratch SQLite)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "keys.txt"
        listing.write_text(
            "".join(f"s3://photos/2024/{i % 97:02d}/IMG_{i:07d}.jpg\n" for i in range(args.keys))
        )
        db = connect(args.db or f"sqlite:///{tmp}/crawl.db")
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        settings = Settings(broker_url=REDIS_URL, queue_name=queue, job_images=args.job_images)
        publisher = make_publisher(settings)
        r = redis.Redis.from_url(REDIS_URL)
        try:
            started = time.perf_counter()
            stats = run_crawl(
                f"@{listing}",
                crawl_id=queue,
                db=db,
                publisher=publisher,
                s3_client=None,
                identity=("bench", "", "x"),
                filters=Filters(),
                job_images=args.job_images,
                max_queued_images=10**9,
            )
            elapsed = time.perf_counter() - started
            queue_bytes = int(r.memory_usage(queue, samples=0) or 0)
        finally:
            r.delete(queue)
            for key in r.scan_iter(f"capworks:sent:{queue}-*"):
                r.delete(key)
    rate = stats.enqueued / elapsed
    per_uri = queue_bytes / stats.enqueued
    print(
        "| keys | job images | seconds | URIs/s | vs goal 20,000/s | Redis bytes/URI "
        "| vs goal 200 |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {stats.enqueued:,} | {args.job_images} | {elapsed:.2f} | {rate:,.0f} | "
        f"{rate / 20000:.2f}x | {per_uri:.1f} | {200 / per_uri:.2f}x under |"
    )


if __name__ == "__main__":
    main()
