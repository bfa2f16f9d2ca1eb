"""Storage events to captions: events/s one consumer publishes, and upload -> caption-row
latency through the webhook and the SeaweedFS filer stream, against a real worker.

    .venv/bin/python bench/events.py [--events 20000] [--uploads 200] [--rate 5]

Publish rate (Redis only, one consumer, no worker): 20,000 distinct created-object events in
bodies of 100 records, through `EventSink` with `BulkSender` (the default); the same through the
crawl's publisher (`send_task` per job) as a ratio; the same bodies POSTed to the webhook by one
client; and the 20,000 again, absorbed as duplicates.

Latency (SeaweedFS S3, a scratch PostgreSQL, one real `celery` worker on the shapes model):
`--uploads` objects PUT at a steady `--rate`; each is announced to the webhook as an S3 record
right after its PUT returns (as a store's notification would be), or followed from the filer's
metadata stream. Latency = the caption row's `created` - the time the PUT returned. The goal is
p50 <= max batch wait + one batch time + 100 ms, with the batch time measured here.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from rich.progress import track
from scratch_pg import scratch_database
from seaweed import s3_client
from sqlalchemy import create_engine, select

from capworks.checkpoints.build import ensure_checkpoint
from capworks.checkpoints.shapes_world import sample_scenes
from capworks.commands.worker import celery_worker_argv
from capworks.producer.enqueue import make_publisher
from capworks.producer.events.bulk import BulkSender
from capworks.producer.events.filer import FilerFollower, FilerPosition
from capworks.producer.events.records import ObjectCreated
from capworks.producer.events.sink import EventSink, one_by_one
from capworks.producer.events.webhook import WebhookAuth, WebhookServer
from capworks.schema.checkpoint import resolve_checkpoint, resolve_identity
from capworks.schema.db import connect
from capworks.schema.queue import make_celery
from capworks.schema.settings import Settings, get_settings
from capworks.schema.tables import Caption, Image
from capworks.seaweed import SeaweedServer

REDIS_URL = "redis://127.0.0.1:6379/13"
TOKEN = "bench-token"
BATCH = 8


def make_sink(
    queue: str, db_url: str, bulk: bool = True, identity: tuple[str, str, str] | None = None
) -> EventSink:
    settings = Settings(broker_url=REDIS_URL, queue_name=queue)
    broker = redis.Redis.from_url(REDIS_URL)
    if bulk:
        send = BulkSender(make_celery(settings), broker, queue).send
    else:
        send = one_by_one(make_publisher(settings))
    identity = identity or ("bench", "", uuid.uuid4().hex)  # a fresh one: nothing deduped yet
    return EventSink(send, broker, identity, connect(db_url))


@contextmanager
def webhook(sink: EventSink) -> Iterator[WebhookServer]:
    server = WebhookServer("127.0.0.1", 0, sink, WebhookAuth(token=TOKEN))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def s3_body(bucket: str, items: list[tuple[str, str]]) -> bytes:
    from urllib.parse import quote_plus

    recs = [
        {
            "eventName": "ObjectCreated:Put",
            "eventSource": "aws:s3",
            "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(k), "eTag": e}},
        }
        for k, e in items
    ]
    return json.dumps({"Records": recs}).encode()


def post(url: str, body: bytes) -> int:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=30) as reply:
        return int(reply.status)


def rate(run: Callable[[], None], count: int) -> float:
    started = time.perf_counter()
    run()
    return count / (time.perf_counter() - started)


def publish_rates(db_url: str, count: int) -> dict[str, float]:
    """events/s of one consumer, four ways."""
    queue = f"bench-events-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(REDIS_URL)
    events = [ObjectCreated("bench", f"k/{i:06d}.jpg", f"e{i}") for i in range(count)]
    chunks = [events[i : i + 100] for i in range(0, count, 100)]
    out: dict[str, float] = {}
    try:
        bulk = make_sink(queue, db_url)
        bulk.publish([ObjectCreated("warm", "up.jpg")])  # connections and imports off the clock
        r.delete(queue)
        out["sink + BulkSender"] = rate(lambda: [bulk.publish(c) for c in chunks] and None, count)
        out["duplicates absorbed"] = rate(lambda: [bulk.publish(c) for c in chunks] and None, count)
        assert r.llen(queue) == count, r.llen(queue)
        slow = make_sink(queue, db_url, bulk=False)
        out["sink + send_task per job"] = rate(
            lambda: [slow.publish(c) for c in chunks] and None, count
        )
        bodies = [
            s3_body("hook", [(f"k/{i:06d}.jpg", f"e{i}") for i in range(n, n + 100)])
            for n in range(0, count, 100)
        ]
        with webhook(make_sink(queue, db_url)) as server:
            out["webhook, 100 records a POST"] = rate(
                lambda: [post(server.url, b) for b in bodies] and None, count
            )
    finally:
        r.delete(queue)
        for key in r.scan_iter("capworks:event:*"):
            r.delete(key)
    return out


def batch_time_s(model: str) -> float:
    """Seconds the engine takes for one full batch of shapes images on this machine."""
    from capworks.workers.engine import OfaEngine

    config = resolve_checkpoint(model, None, get_settings().checkpoint_dir)
    engine = OfaEngine.load(config, device="cpu", batch_size=BATCH)
    blobs = []
    for img, _ in sample_scenes(BATCH, 5):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    engine.caption_images(blobs)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        engine.caption_images(blobs)
        times.append(time.perf_counter() - started)
    engine.close()
    return statistics.median(times)


@contextmanager
def worker(queue: str, db_url: str, s3_endpoint: str, folder: Path, model: str) -> Iterator[None]:
    env = {
        **os.environ,
        "CAPWORKS_DATABASE_URL": db_url,
        "CAPWORKS_BROKER_URL": REDIS_URL,
        "CAPWORKS_QUEUE_NAME": queue,
        "CAPWORKS_MODEL": model,
        "CAPWORKS_DEVICE": "cpu",
        "CAPWORKS_BATCH_SIZE": str(BATCH),
        "CAPWORKS_S3_ENDPOINT_URL": s3_endpoint,
        "CAPWORKS_S3_ADDRESSING_STYLE": "path",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CAPWORKS_METRICS_PORT": "0",
        "CUDA_VISIBLE_DEVICES": "",
    }
    log = (folder / f"worker-{queue}.log").open("wb")
    proc = subprocess.Popen(
        celery_worker_argv(queue, 4, f"bench-{queue}@%h"),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def latencies(
    s3: Any,
    db_url: str,
    bucket: str,
    count: int,
    per_s: float,
    announce: Callable[[str, str], None],
    label: str,
) -> list[float]:
    """Upload `count` images at `per_s`; seconds from each PUT's return to its caption row."""
    s3.create_bucket(Bucket=bucket)
    blobs = []
    for img, _ in sample_scenes(count + 1, 99):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    db = create_engine(db_url)
    uploaded: dict[str, float] = {}
    # Warm-up: one upload, so the worker has loaded its model before the clock runs.
    key = "warm.png"
    reply = s3.put_object(Bucket=bucket, Key=key, Body=blobs[0])
    announce(key, reply["ETag"].strip('"'))
    _wait_for(db, [f"s3://{bucket}/{key}"], 300)
    started = time.monotonic()
    for i in track(range(count), description=f"{label}: uploading at {per_s:g}/s"):
        time.sleep(max(0.0, started + i / per_s - time.monotonic()))
        key = f"up/{i:04d} photo.png"
        reply = s3.put_object(Bucket=bucket, Key=key, Body=blobs[i + 1])
        uploaded[f"s3://{bucket}/{key}"] = time.time()
        announce(key, reply["ETag"].strip('"'))
    created = _wait_for(db, list(uploaded), 300)
    db.dispose()
    return [created[uri] - t for uri, t in uploaded.items()]


def _wait_for(db: Any, uris: list[str], timeout_s: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    stmt = select(Image.uri, Caption.created).join(Caption).where(Image.uri.in_(uris))
    while True:
        with db.connect() as conn:
            rows: dict[str, datetime] = dict(conn.execute(stmt).all())
        if len(rows) == len(uris):
            return {u: c.timestamp() for u, c in rows.items()}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(rows)} of {len(uris)} captioned")
        time.sleep(0.1)


def percentiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=100)
    return statistics.median(values), q[94]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--rate", type=float, default=5.0, help="uploads per second")
    parser.add_argument("--skip-filer", action="store_true")
    parser.add_argument("--model", default="shapes", help="offline checkpoint the worker runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # the model libraries' import chatter off
    # A SIGTERM unwinds like Ctrl-C: the worker, the S3 server and the scratch database go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_checkpoint(args.model, get_settings().checkpoint_dir)
    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    with scratch_database() as db_url, tempfile.TemporaryDirectory() as tmp:
        connect(db_url).dispose()
        rates = publish_rates(db_url, args.events)
        print("| one consumer publishing | events/s | ratio to send_task |")
        print("|---|---|---|")
        base = rates["sink + send_task per job"]
        for name, value in rates.items():
            print(f"| {name} | {value:,.0f} | {value / base:.2f} |", flush=True)
        batch_s = batch_time_s(args.model)
        print(f"\none batch of {BATCH} ({args.model}, CPU): {batch_s * 1000:.0f} ms", flush=True)
        identity = resolve_identity(args.model, None, get_settings().checkpoint_dir)
        wait_ms = get_settings().max_batch_wait_ms
        goal_s = wait_ms / 1000 + batch_s + 0.1
        server = SeaweedServer(Path(tmp), 1800)
        endpoint = server.start()
        s3 = s3_client(endpoint)
        results = {}
        try:
            queue = f"bench-hook-{uuid.uuid4().hex[:8]}"
            with (
                worker(queue, db_url, endpoint, Path(tmp), args.model),
                webhook(make_sink(queue, db_url, identity=identity)) as hook,
            ):
                results["webhook"] = latencies(
                    s3,
                    db_url,
                    "hooked",
                    args.uploads,
                    args.rate,
                    lambda k, e: post(hook.url, s3_body("hooked", [(k, e)])) and None,
                    "webhook",
                )
            if weed and not args.skip_filer:
                queue = f"bench-filer-{uuid.uuid4().hex[:8]}"
                sink = make_sink(queue, db_url, identity=identity)
                stop, ready = threading.Event(), threading.Event()
                follower = FilerFollower(
                    weed, server.filer, sink, FilerPosition(sink.db, server.filer, "/buckets/")
                )
                thread = threading.Thread(target=follower.run, args=(stop, ready))
                thread.start()
                ready.wait(30)
                try:
                    with worker(queue, db_url, endpoint, Path(tmp), args.model):
                        results["filer stream"] = latencies(
                            s3,
                            db_url,
                            "streamed",
                            args.uploads,
                            args.rate,
                            lambda k, e: None,
                            "filer",
                        )
                finally:
                    stop.set()
                    thread.join()
        finally:
            server.stop()
            r = redis.Redis.from_url(REDIS_URL)
            for key in r.scan_iter("capworks:*"):
                r.delete(key)
    print()
    print(
        f"one batch of {BATCH} ({args.model}, CPU): {batch_s * 1000:.0f} ms; "
        f"max batch wait {wait_ms} ms; "
        f"goal p50 <= {goal_s * 1000:.0f} ms"
    )
    print("| source | uploads | rate/s | p50 ms | p95 ms | max ms | p50 goal ms |")
    print("|---|---|---|---|---|---|---|")
    for name, values in results.items():
        p50, p95 = percentiles(values)
        print(
            f"| {name} | {len(values)} | {args.rate:g} | {p50 * 1000:.0f} | {p95 * 1000:.0f} "
            f"| {max(values) * 1000:.0f} | {goal_s * 1000:.0f} |"
        )


if __name__ == "__main__":
    main()
