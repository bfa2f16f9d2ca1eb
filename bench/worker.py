"""The full worker against the raw engine on the same checkpoint and machine, as a ratio.
Goal (issue 3): >= 0.90.

    .venv/bin/python bench/worker.py [--images 256] [--model shapes] [--db URL]

Raw engine: `OfaEngine.caption_images` on the encoded images, batch after batch, in this
process's main thread. Worker: the same images as files, enqueued with the real producer,
captioned by one real `celery` worker process (threads pool) into PostgreSQL; timed from the
first job published to the last caption committed, after the worker has loaded its model. The
raw engine runs before and after the worker and the ratio uses the mean of the two (the machine's
speed drifts by 10% within a minute).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis
from scratch_pg import scratch_database
from sqlalchemy import create_engine, func, select

from capworks.checkpoints.build import ensure_checkpoint
from capworks.checkpoints.shapes_world import sample_scenes
from capworks.commands.worker import celery_worker_argv
from producer.enqueue import enqueue, make_publisher
from producer.sources import iter_local
from schema.checkpoint import resolve_checkpoint
from schema.db import connect
from schema.settings import Settings, get_settings
from schema.tables import Caption
from workers.engine import OfaEngine

REDIS_URL = "redis://127.0.0.1:6379/13"


def engine_rate(model: str, blobs: list[bytes], batch: int) -> float:
    """Images/s of the raw engine (decode + generate + text), after one warm-up batch."""
    settings = get_settings()
    config = resolve_checkpoint(model, None, settings.checkpoint_dir)
    engine = OfaEngine.load(config, device="cpu", batch_size=batch)
    engine.caption_images(blobs[:batch])
    started = time.perf_counter()
    engine.caption_images(blobs)
    elapsed = time.perf_counter() - started
    engine.close()
    return len(blobs) / elapsed


def worker_rate(model: str, folder: Path, count: int, db_url: str, batch: int) -> float:
    """Images/s of the enqueue -> worker -> PostgreSQL path."""
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CAPWORKS_DATABASE_URL": db_url,
        "CAPWORKS_BROKER_URL": REDIS_URL,
        "CAPWORKS_QUEUE_NAME": queue,
        "CAPWORKS_MODEL": model,
        "CAPWORKS_DEVICE": "cpu",
        "CAPWORKS_BATCH_SIZE": str(batch),
        "CAPWORKS_JOB_IMAGES": "16",
        "CUDA_VISIBLE_DEVICES": "",
    }
    settings = Settings(broker_url=REDIS_URL, queue_name=queue, job_images=16)
    log = open(folder / "worker.log", "wb")  # noqa: SIM115 - closed below
    argv = celery_worker_argv(queue, 4, f"bench-{queue}@%h")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    db = create_engine(db_url)
    try:
        # Warm the worker: one image, so the model is loaded before the clock starts.
        refs = list(iter_local(folder / "images"))
        publisher = make_publisher(settings)
        enqueue(refs[:1], settings, publisher)
        while _captions(db) < 1:
            time.sleep(0.2)
        started = time.perf_counter()
        enqueue(refs[1 : count + 1], settings, publisher)
        while _captions(db) < count + 1:
            time.sleep(0.05)
        return count / (time.perf_counter() - started)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        db.dispose()
        redis.Redis.from_url(REDIS_URL).delete(queue)


def _captions(db: object) -> int:
    with db.connect() as conn:  # type: ignore[attr-defined]
        return int(conn.scalar(select(func.count()).select_from(Caption)) or 0)


def main() -> None:
    """Run both measurements in one go and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    ensure_checkpoint(args.model, get_settings().checkpoint_dir)
    with scratch_database() as db_url, tempfile.TemporaryDirectory() as tmp:
        connect(db_url).dispose()
        folder = Path(tmp)
        (folder / "images").mkdir()
        blobs = []
        for i, (img, _) in enumerate(sample_scenes(args.images + 1, 314)):
            path = folder / "images" / f"{i:05d}.png"
            img.save(path)
            blobs.append(path.read_bytes())
        before = engine_rate(args.model, blobs[1:], args.batch)
        full = worker_rate(args.model, folder, args.images, db_url, args.batch)
        after = engine_rate(args.model, blobs[1:], args.batch)
    raw = (before + after) / 2
    columns = ["model", "images", "batch", "raw engine img/s (before, after)", "worker img/s"]
    print("| " + " | ".join([*columns, "ratio", "goal"]) + " |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {args.images} | {args.batch} | {raw:.2f} ({before:.2f}, {after:.2f}) "
        f"| {full:.2f} | {full / raw:.2f} | >= 0.90 |"
    )


if __name__ == "__main__":
    main()
