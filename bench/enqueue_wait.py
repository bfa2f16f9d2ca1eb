"""What waiting for a Redis replica (`CAPWORKS_ENQUEUE_WAIT_REPLICAS=1`) costs the enqueue rate,
against no wait (the default), measured in one run on the same pair of servers.

    .venv/bin/python bench/enqueue_wait.py [--uris 10000] [--calls 300] [--rounds 8]

Starts a redis-server of its own on a loopback port and a second one as its `--replicaof`
(asynchronous replication, as a production replica), then alternates, `--rounds` times:
- a crawl of a URI list of `--uris` lines (64 images per job; one WAIT per 1,000-URI page);
- `--calls` calls of `enqueue()` with one image each (one job and one WAIT per call: the
  worst case, as an event source publishing one object per delivery).
Crawl state is kept in a scratch SQLite file; the queue is emptied between runs. The modes are
interleaved (the order flipped every round) after one warm-up crawl; each rate is the total
work over the total time of its mode.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pipeline_support import free_port  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from capworks.producer.crawl import run_crawl  # noqa: E402
from capworks.producer.enqueue import enqueue, make_publisher  # noqa: E402
from capworks.schema.db import connect  # noqa: E402
from capworks.schema.settings import Settings  # noqa: E402

QUEUE = "bench-wait"


def crawl_seconds(url: str, uris: Path, count: int, wait: int, scratch: Path) -> float:
    """Seconds one crawl of the list takes."""
    settings = Settings(broker_url=url, queue_name=QUEUE, enqueue_wait_replicas=wait)
    db = connect(f"sqlite:///{scratch / f'crawl-{time.monotonic_ns()}.db'}")
    started = time.perf_counter()
    run_crawl(
        f"@{uris}",
        crawl_id="bench",
        db=db,
        publisher=make_publisher(settings),
        s3_client=None,
        identity=("m", "r", "h"),
        job_images=64,
        max_queued_images=10 * count,
    )
    elapsed = time.perf_counter() - started
    db.dispose()
    return elapsed


def calls_seconds(url: str, calls: int, wait: int) -> float:
    """Seconds `calls` calls of `enqueue()` (one single-image job each) take."""
    settings = Settings(broker_url=url, queue_name=QUEUE, enqueue_wait_replicas=wait)
    publisher = make_publisher(settings)
    started = time.perf_counter()
    for n in range(calls):
        enqueue([f"s3://library/upload/{n:06d}.jpg"], settings, publisher)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uris", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="capworks-wait-"))
    uris = scratch / "uris.txt"
    uris.write_text("".join(f"s3://library/photos/{n:07d}.jpg\n" for n in range(args.uris)))
    primary = RedisServer(free_port(), scratch / "primary")
    primary.start()
    replica_args = ["--replicaof", "127.0.0.1", str(primary.port)]
    replica = RedisServer(free_port(), scratch / "replica", replica_args)
    replica.start()
    client = redis.Redis.from_url(primary.url)
    try:
        copy = redis.Redis.from_url(replica.url)
        while copy.info("replication").get("master_link_status") != "up":
            time.sleep(0.1)
        crawl_seconds(primary.url, uris, args.uris, 0, scratch)  # warm-up
        client.flushdb()
        # Interleaved, the order flipped every round, so that the load of other processes on
        # the machine falls on both alike; the rate is the total work over the total time.
        seconds = {(kind, wait): 0.0 for kind in ("crawl", "calls") for wait in (0, 1)}
        for n in range(args.rounds):
            for wait in (0, 1) if n % 2 == 0 else (1, 0):
                seconds[("crawl", wait)] += crawl_seconds(
                    primary.url, uris, args.uris, wait, scratch
                )
                client.flushdb()
                seconds[("calls", wait)] += calls_seconds(primary.url, args.calls, wait)
                client.flushdb()
        print("| producer | no wait | WAIT 1 replica | ratio |")
        print("|---|---|---|---|")
        for kind, name, work in (
            ("crawl", "crawl, 64 per job (URIs/s)", args.uris),
            ("calls", "enqueue(), 1 image per call (calls/s)", args.calls),
        ):
            off = work * args.rounds / seconds[(kind, 0)]
            on = work * args.rounds / seconds[(kind, 1)]
            print(f"| {name} | {off:,.0f} | {on:,.0f} | {on / off:.2f} |")
    finally:
        replica.stop()
        primary.stop()


if __name__ == "__main__":
    main()
