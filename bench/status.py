"""`capworks status` on a deep queue: 1,000,000 images waiting as 15,625 job messages of 64.

    .venv/bin/python bench/status.py [--images 1000000] [--job-images 64] [--runs 5]
                                     [--redis redis://127.0.0.1:6379/13]

The queue is a list of its own (a fresh name, deleted afterwards) in the given Redis database;
the database is a scratch PostgreSQL one. One job is published through the producer's real
Celery publisher; the rest are the same Celery envelope with each job's own message body
(`schema/jobs.py`) and ids, pushed in pipelines, which is byte for byte what the publisher
writes and 20x faster to fill. Timed: the queue reading alone (jobs counted exactly, images
estimated from 1,000 sampled jobs past 2,000 jobs), the same reading every message, and the
whole command (`capworks status --json` as a process, start-up included) on this queue and
on an empty one.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from rich.progress import Progress
from scratch_pg import scratch_database

from capworks.farm import read_queue
from capworks.producer.enqueue import make_publisher
from capworks.schema.db import connect
from capworks.schema.jobs import Job
from capworks.schema.settings import Settings
from capworks.schema.uris import ImageRef

PIPELINE_JOBS = 500


def job(n: int, size: int) -> Job:
    """Job n with `size` S3 images, as a crawl makes them."""
    refs = [
        ImageRef(f"s3://photos/bench/{n:06d}/{i:03d}.jpg", etag=f"{n * size + i:032x}",
                 size_bytes=250_000 + i)
        for i in range(size)
    ]  # fmt: skip
    return Job.new(refs, crawl_id="bench-crawl")


def fill(client: Any, settings: Settings, jobs: int, size: int) -> None:
    """`jobs` job messages on the settings' queue."""
    make_publisher(settings).publish(job(0, size))
    template = json.loads(client.lindex(settings.queue_name, 0))
    _args, kwargs, embed = json.loads(base64.b64decode(template["body"]))
    with Progress() as bar:
        task = bar.add_task("filling the queue", total=jobs)
        bar.advance(task)
        for start in range(1, jobs, PIPELINE_JOBS):
            pipe = client.pipeline(transaction=False)
            for n in range(start, min(jobs, start + PIPELINE_JOBS)):
                body = [[job(n, size).to_wire()], kwargs, embed]
                envelope = dict(template, body=base64.b64encode(json.dumps(body).encode()).decode())
                task_id = str(uuid.uuid4())
                envelope["headers"] = dict(template["headers"], id=task_id, root_id=task_id)
                envelope["properties"] = dict(
                    template["properties"], correlation_id=task_id, delivery_tag=str(uuid.uuid4())
                )
                pipe.lpush(settings.queue_name, json.dumps(envelope))
            pipe.execute()
            bar.advance(task, min(jobs, start + PIPELINE_JOBS) - start)


def timed(runs: int, work: Any) -> tuple[float, Any]:
    """Median seconds of `runs` calls of `work`, and its last result."""
    times, result = [], None
    for _ in range(runs):
        began = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def main() -> None:
    """Fill, measure, print a table, clean up."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--job-images", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    queue = f"bench-status-{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=args.redis, queue_name=queue)
    client = redis.Redis.from_url(args.redis)
    jobs = -(-args.images // args.job_images)
    exe = Path(sys.executable).parent / "capworks"
    try:
        with scratch_database() as db_url:
            connect(db_url).dispose()
            fill(client, settings, jobs, args.job_images)
            used = client.memory_usage(queue) or 0
            sampled_s, sampled = timed(args.runs, lambda: read_queue(client, queue))
            exact_s, exact = timed(
                max(1, args.runs // 2), lambda: read_queue(client, queue, exact_jobs=jobs)
            )
            env = {**os.environ, "CAPWORKS_BROKER_URL": args.redis, "CAPWORKS_QUEUE_NAME": queue}
            command = [str(exe), "status", "--json", "--db", db_url]
            cli_s, done = timed(
                args.runs, lambda: subprocess.run(command, env=env, capture_output=True, text=True)
            )
            if done.returncode != 0:
                raise SystemExit(f"capworks status failed: {done.stderr.strip()}")
            shown = json.loads(done.stdout)["queue"]
            empty_env = {**env, "CAPWORKS_QUEUE_NAME": f"{queue}-empty"}
            empty_s, _ = timed(
                args.runs,
                lambda: subprocess.run(command, env=empty_env, capture_output=True, check=True),
            )
    finally:
        client.delete(queue, *client.scan_iter(f"_kombu.binding*.{queue}"))
    print(f"queue: {jobs:,} jobs of {args.job_images} images, {used / 2**20:.0f} MiB in Redis")
    print("| what | jobs | images | estimated | median s |")
    print("|---|---|---|---|---|")
    print(f"| read_queue (sampled) | {sampled.jobs_waiting:,} | {sampled.images_waiting:,} | "
          f"yes | {sampled_s:.3f} |")  # fmt: skip
    print(f"| read_queue (every message) | {exact.jobs_waiting:,} | {exact.images_waiting:,} | "
          f"no | {exact_s:.3f} |")  # fmt: skip
    print(f"| capworks status --json (process) | {shown['jobs_waiting']:,} | "
          f"{shown['images_waiting']:,} | yes | {cli_s:.3f} |")  # fmt: skip
    print(f"| capworks status --json, empty queue (start-up) | 0 | 0 | no | {empty_s:.3f} |")
    print(
        f"every message vs sampled: {exact_s / sampled_s:.0f}x; the deep queue adds "
        f"{cli_s - empty_s:.3f} s to the command ({cli_s / empty_s:.2f}x its empty-queue time)"
    )


if __name__ == "__main__":
    main()
