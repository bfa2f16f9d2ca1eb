"""The full worker against the raw engine on the same checkpoint and machine, as a ratio.
Goal (issue 3): >= 0.90.

    .venv/bin/python bench/worker.py [--images 256] [--model shapes] [--photos] [--procs 1,2]

Raw engine: `OfaEngine.caption_images` on the encoded images, batch after batch, in this
process's main thread. Worker: the same images as files, enqueued with the real producer,
captioned by `capworks worker --gpus cpu --cpu-procs N` (real Celery processes, threads pool)
into PostgreSQL; timed from the first job published to the last caption committed, after every
worker process has loaded its model. The raw engine runs before and after the workers and the
ratio uses the mean of the two (the machine's speed drifts by 10% within a minute).
`--photos`: 640x480 photo-like JPEGs instead of the 128 px shapes scenes, so decoding costs
what it costs on real photos.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from decode import photo_like
from scratch_pg import scratch_database
from sqlalchemy import create_engine, delete, func, select

from capworks.checkpoints.build import ensure_checkpoint
from capworks.checkpoints.shapes_world import sample_scenes
from capworks.producer.enqueue import enqueue, make_publisher
from capworks.producer.sources import iter_local
from capworks.schema.checkpoint import resolve_checkpoint
from capworks.schema.db import connect
from capworks.schema.settings import Settings, get_settings
from capworks.schema.tables import Caption
from capworks.workers.engine import OfaEngine

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


def worker_rate(model: str, folder: Path, count: int, db_url: str, batch: int, procs: int) -> float:
    """Images/s of the enqueue -> `capworks worker` -> PostgreSQL path with `procs` processes."""
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
        "CAPWORKS_METRICS_PORT": "0",
    }
    settings = Settings(broker_url=REDIS_URL, queue_name=queue, job_images=16)
    log = open(folder / f"worker-{procs}.log", "wb")  # noqa: SIM115 - closed below
    capworks = Path(sys.executable).parent / "capworks"
    argv = [str(capworks), "worker", "--gpus", "cpu", "--cpu-procs", str(procs)]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    db = create_engine(db_url)
    try:
        # Warm every process: one image each, so the models are loaded before the clock starts.
        refs = list(iter_local(folder / "images"))
        publisher = make_publisher(settings)
        warm = refs[: 4 * procs]
        for ref in warm:
            enqueue([ref], settings, publisher)
        log_path = folder / f"worker-{procs}.log"
        while _captions(db) < len(warm) or log_path.read_text().count("runtime ready") < procs:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited: see {log_path}")
            time.sleep(0.2)
        started = time.perf_counter()
        enqueue(refs[len(warm) : len(warm) + count], settings, publisher)
        while _captions(db) < len(warm) + count:
            time.sleep(0.05)
        return count / (time.perf_counter() - started)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        db.dispose()
        redis.Redis.from_url(REDIS_URL).delete(queue)


def _clear(db: object) -> None:
    with db.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(delete(Caption))


def _captions(db: object) -> int:
    with db.connect() as conn:  # type: ignore[attr-defined]
        return int(conn.scalar(select(func.count()).select_from(Caption)) or 0)


def main() -> None:
    """Run both measurements in one go and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--photos", action="store_true", help="640x480 photo-like JPEGs")
    parser.add_argument("--procs", default="1", help="worker processes to try, e.g. 1,2")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    ensure_checkpoint(args.model, get_settings().checkpoint_dir)
    with scratch_database() as db_url, tempfile.TemporaryDirectory() as tmp:
        connect(db_url).dispose()
        folder = Path(tmp)
        (folder / "images").mkdir()
        blobs = []
        total = args.images + 4 * max(procs)
        for i in range(total):
            if args.photos:
                path = folder / "images" / f"{i:05d}.jpg"
                path.write_bytes(photo_like(640, 480, seed=i))
            else:
                path = folder / "images" / f"{i:05d}.png"
                sample_scenes(1, 314 + i)[0][0].save(path)
            blobs.append(path.read_bytes())
        measured = blobs[-args.images :]
        before = engine_rate(args.model, measured, args.batch)
        full = {}
        for n in procs:
            full[n] = worker_rate(args.model, folder, args.images, db_url, args.batch, n)
            _clear(create_engine(db_url))
        after = engine_rate(args.model, measured, args.batch)
    raw = (before + after) / 2
    source = "640x480 JPEG" if args.photos else "128 px PNG"
    columns = ["model", "images", "batch", "raw engine img/s (before, after)", "worker"]
    print("| " + " | ".join([*columns, "worker img/s", "ratio", "goal"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for n, rate in full.items():
        print(
            f"| {args.model} ({source}) | {args.images} | {args.batch} "
            f"| {raw:.2f} ({before:.2f}, {after:.2f}) | --cpu-procs {n} "
            f"| {rate:.2f} | {rate / raw:.2f} | >= 0.90 |"
        )


if __name__ == "__main__":
    main()
