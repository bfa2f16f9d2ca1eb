"""Producer throughput: URIs enqueued per second by a crawl, and the Redis bytes each queued URI
costs, counting every key the crawl writes. Goals (issue 3): >= 20,000 URIs/s, <= 200 B per URI.

    .venv/bin/python bench/enqueue_rate.py [--keys 100000] [--s3-keys 3000] [--job-images 64,256]

Two sources over the same key names (`photos/2024/07/31/IMG_000123.jpg` in bucket `library`):
- a URI list (`@FILE`) of `--keys` lines: references without ETag or size;
- an S3 listing of `--s3-keys` objects on a scratch SeaweedFS server started on 127.0.0.1: the
  references a real crawl sends, with 32-hex ETags and sizes (the objects are 1-9 kB, so sizes
  have 4 digits where photos have 6 or 7).
Each crawl publishes through the real publisher (Celery on Redis database 14, a scratch queue)
with crawl state in a scratch SQLite file. Redis bytes are `MEMORY USAGE` (all samples) of every
key that appeared in the database during the crawl: the queue list, the `capworks:sent:*` marks,
kombu's bindings and anything else. `used_memory` is the drop in Redis's INFO used_memory when
those keys are deleted (it also counts the expiry entries of the marks and the hash table; other
clients of the server move it too, so it is a cross-check).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from seaweed import s3_client, scratch_s3

from capworks.producer.crawl import SENT_KEY, Filters, run_crawl
from capworks.producer.enqueue import make_publisher
from capworks.producer.sources import iter_s3
from capworks.schema.db import connect
from capworks.schema.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/14"
BUCKET = "library"
GOAL_URIS_PER_S = 20_000
GOAL_BYTES_PER_URI = 200
PUT_THREADS = 8


@dataclass
class Footprint:
    """What one crawl left in Redis, per kind of key."""

    keys: dict[str, int] = field(default_factory=dict)  # kind -> number of keys
    memory_bytes: dict[str, int] = field(default_factory=dict)  # kind -> MEMORY USAGE sum
    entry_bytes: int = 0  # the queue's list entries as stored strings, without overhead
    used_memory_bytes: int = 0  # INFO used_memory drop when the keys are deleted
    unattributed: list[str] = field(default_factory=list)


@dataclass
class Result:
    """One measured crawl."""

    source: str
    job_images: int
    uris: int
    uri_chars: float
    seconds: float
    footprint: Footprint


def object_keys(count: int) -> list[str]:
    """Camera-roll keys: one folder per day, numbered files."""
    keys = []
    for i in range(count):
        day = i // 400
        keys.append(f"photos/2024/{day // 28 % 12 + 1:02d}/{day % 28 + 1:02d}/IMG_{i:06d}.jpg")
    return keys


def put_objects(client: Any, keys: list[str]) -> float:
    """Upload small random objects under `keys`; returns the seconds it took."""
    client.create_bucket(Bucket=BUCKET)
    rng = random.Random(0)
    sizes = [rng.randint(1_000, 9_999) for _ in keys]
    started = time.perf_counter()
    with ThreadPoolExecutor(PUT_THREADS) as pool:
        list(
            pool.map(
                lambda ks: client.put_object(Bucket=BUCKET, Key=ks[0], Body=os.urandom(ks[1])),
                zip(keys, sizes, strict=True),
            )
        )
    return time.perf_counter() - started


def kind_of(key: str, queue: str) -> str | None:
    """Which part of the crawl a Redis key belongs to; None when it is not this run's."""
    if key == queue:
        return "queue"
    if key.startswith(SENT_KEY.format(f"{queue}-")):
        return "sent marks"
    if key.startswith("_kombu.") and key.endswith(f".{queue}"):
        return "other"
    return None


def measure_footprint(r: redis.Redis, before: set[str], queue: str) -> Footprint:
    """Every key new since `before`, by kind, then delete this run's keys."""
    fp = Footprint()
    new = sorted(k.decode() for k in r.scan_iter(count=10_000) if k.decode() not in before)
    for key in new:
        kind = kind_of(key, queue)
        if kind is None:  # counted all the same: it appeared while the crawl ran
            fp.unattributed.append(key)
            kind = "other"
        fp.keys[kind] = fp.keys.get(kind, 0) + 1
        usage = int(r.memory_usage(key, samples=0) or 0)
        fp.memory_bytes[kind] = fp.memory_bytes.get(kind, 0) + usage
    for start in range(0, int(r.llen(queue)), 1000):
        fp.entry_bytes += sum(len(e) for e in r.lrange(queue, start, start + 999))
    used = int(r.info("memory")["used_memory"])
    ours = [k for k in new if kind_of(k, queue) is not None]
    for start in range(0, len(ours), 1000):
        r.delete(*ours[start : start + 1000])
    fp.used_memory_bytes = used - int(r.info("memory")["used_memory"])
    return fp


def crawl(
    source: str, label: str, s3: Any | None, job_images: int, uri_chars: float, tmp: Path
) -> Result:
    """Crawl `source` into a scratch queue and measure the rate and what Redis holds."""
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=REDIS_URL, queue_name=queue, job_images=job_images)
    publisher = make_publisher(settings)
    r = redis.Redis.from_url(REDIS_URL)
    before = {k.decode() for k in r.scan_iter(count=10_000)}
    db = connect(f"sqlite:///{tmp}/crawl-{queue}.db")
    try:
        started = time.perf_counter()
        stats = run_crawl(
            source,
            crawl_id=queue,
            db=db,
            publisher=publisher,
            s3_client=s3,
            identity=("bench", "", "x"),
            filters=Filters(),
            job_images=job_images,
            max_queued_images=10**9,
        )
        seconds = time.perf_counter() - started
    finally:
        footprint = measure_footprint(r, before, queue)
        db.dispose()
    return Result(label, job_images, stats.enqueued, uri_chars, seconds, footprint)


def print_table(results: list[Result]) -> None:
    """One row per crawl: rate, then bytes per URI by kind of key."""
    print(
        "| source | URIs | URI chars | images/job | URIs/s | vs goal 20,000/s "
        "| list entries B/URI | queue | sent marks | other keys | all keys B/URI | vs goal 200 "
        "| used_memory B/URI |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        fp, n = res.footprint, res.uris
        rate = n / res.seconds
        total = sum(fp.memory_bytes.values()) / n
        parts = [fp.memory_bytes.get(k, 0) / n for k in ("queue", "sent marks", "other")]
        print(
            f"| {res.source} | {n:,} | {res.uri_chars:.0f} | {res.job_images} | {rate:,.0f} "
            f"| {rate / GOAL_URIS_PER_S:.2f}x | {fp.entry_bytes / n:.1f} | "
            + " | ".join(f"{p:.1f}" for p in parts)
            + f" | **{total:.1f}** | {GOAL_BYTES_PER_URI / total:.2f}x under "
            f"| {fp.used_memory_bytes / n:.1f} |"
        )
    for res in results:
        fp = res.footprint
        counts = ", ".join(f"{v:,} {k}" for k, v in sorted(fp.keys.items()))
        print(f"{res.source}, {res.job_images}/job: keys written: {counts}")
        if fp.unattributed:
            print(f"  counted as other, not deleted (another client?): {fp.unattributed[:5]}")


def uri_list_results(count: int, job_sizes: list[int], tmp: Path) -> list[Result]:
    """Crawls of a URI list of `count` lines, one per job size."""
    uris = [f"s3://{BUCKET}/{key}" for key in object_keys(count)]
    listing = tmp / "uris.txt"
    listing.write_text("".join(u + "\n" for u in uris))
    chars = sum(map(len, uris)) / count
    return [crawl(f"@{listing}", "URI list", None, n, chars, tmp) for n in job_sizes]


def s3_results(count: int, job_sizes: list[int], tmp: Path) -> list[Result]:
    """Crawls of an S3 listing of `count` objects on a scratch server, one per job size."""
    keys = object_keys(count)
    source = f"s3://{BUCKET}/photos/"
    with scratch_s3() as endpoint:
        client = s3_client(endpoint)
        put_s = put_objects(client, keys)
        print(f"put {count:,} objects in {put_s:.1f} s ({count / put_s:.0f}/s)")
        started = time.perf_counter()
        listed = sum(1 for _ in iter_s3(source, client))
        list_s = time.perf_counter() - started
        print(
            f"listing alone (ListObjectsV2 pages of 1,000, no crawl): {listed:,} objects "
            f"in {list_s:.2f} s ({listed / list_s:,.0f}/s)"
        )
        chars = sum(len(f"s3://{BUCKET}/{key}") for key in keys) / count
        return [crawl(source, "S3 listing", client, n, chars, tmp) for n in job_sizes]


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000, help="URIs in the URI list (0: none)")
    parser.add_argument("--s3-keys", type=int, default=3_000, help="objects listed (0: no S3)")
    parser.add_argument("--job-images", default="64,256", help="images per job, comma-separated")
    args = parser.parse_args()
    job_sizes = [int(n) for n in args.job_images.split(",") if n.strip()]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        if args.keys:
            results += uri_list_results(args.keys, job_sizes, Path(tmp_name))
        if args.s3_keys:
            results += s3_results(args.s3_keys, job_sizes, Path(tmp_name))
    print_table(results)


if __name__ == "__main__":
    main()
