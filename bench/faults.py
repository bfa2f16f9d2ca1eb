"""Workers SIGKILLed at random moments, with the default lease and visibility settings: images
lost, duplicate caption rows, and how long a dead process's jobs waited; against the same run
with no kills, in one go.

    .venv/bin/python bench/faults.py [--images 1000] [--kills 5] [--procs 2] [--bare]

Images: shapes scenes (128 px PNG) in a scratch SeaweedFS bucket; results in a scratch
PostgreSQL database; jobs on Redis db 8. Workers: `--procs` supervised `capworks worker --gpus
cpu` processes (each supervisor hands its dead child's jobs back), or with `--bare` plain Celery
worker processes with no supervisor, restarted by this script (recovery by lease expiry alone,
as after a whole host is lost). Time to recover a kill: from the SIGKILL to the first commit of
a job the dead process held (a done mark in Redis).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from scratch_pg import scratch_database
from seaweed import s3_client, scratch_s3
from sqlalchemy import create_engine, delete, func, select

from capworks.checkpoints.build import ensure_checkpoint
from capworks.checkpoints.shapes_world import sample_scenes
from capworks.commands.worker import celery_worker_argv
from schema.db import connect
from schema.settings import get_settings
from schema.tables import Caption, Failure
from workers.leases import lease_key
from workers.ledger import DONE_KEY

REDIS_URL = "redis://127.0.0.1:6379/8"
CAPWORKS = Path(sys.executable).parent / "capworks"


def png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def job_ids_held(r: Any, pid: int) -> list[str]:
    """The job ids a worker process holds, from its lease and kombu's unacked hash."""
    ids = []
    for tag in r.smembers(lease_key(socket.gethostname(), pid)):
        raw = r.hget("unacked", tag)
        if raw is None:
            continue
        message = json.loads(raw)[0]
        args = json.loads(base64.b64decode(message["body"]))[0]
        ids.append(args[0]["id"])
    return ids


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


class Farm:
    """Worker processes on one queue, supervised or bare."""

    def __init__(self, env: dict[str, str], procs: int, bare: bool, logs: Path) -> None:
        self.env, self.procs, self.bare, self.logs = env, procs, bare, logs
        self.top: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for i in range(self.procs):
            self.top.append(self._launch(i))

    def _launch(self, i: int) -> subprocess.Popen[bytes]:
        log = (self.logs / f"worker-{i}.log").open("ab")
        if self.bare:
            cmd = celery_worker_argv(
                self.env["CAPWORKS_QUEUE_NAME"], 4, f"bench{i}-{uuid.uuid4().hex[:4]}@%h"
            )
        else:
            cmd = [str(CAPWORKS), "worker", "--gpus", "cpu"]
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def worker_pids(self) -> list[int]:
        """The pids of the processes that hold jobs (the supervisors' children when supervised)."""
        if self.bare:
            return [p.pid for p in self.top if p.poll() is None]
        return [c for p in self.top for c in children_of(p.pid)]

    def restart_dead(self) -> None:
        """Bare mode: start a dead worker again (a supervisor does this itself)."""
        if self.bare:
            for i, p in enumerate(self.top):
                if p.poll() is not None:
                    self.top[i] = self._launch(i)

    def stop(self) -> None:
        for p in self.top:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.top:
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                p.kill()


def count(db: Any, table: Any) -> int:
    with db.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)


def run(
    images: int, kills: int, procs: int, bare: bool, db_url: str, endpoint: str, bucket: str
) -> dict[str, Any]:
    """One crawl of the bucket through a fresh farm; `kills` SIGKILLs spread over the run."""
    queue = f"bench-faults-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CAPWORKS_DATABASE_URL": db_url,
        "CAPWORKS_BROKER_URL": REDIS_URL,
        "CAPWORKS_QUEUE_NAME": queue,
        "CAPWORKS_MODEL": "shapes",
        "CAPWORKS_DEVICE": "cpu",
        "CAPWORKS_S3_ENDPOINT_URL": endpoint,
        "CAPWORKS_S3_ADDRESSING_STYLE": "path",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CAPWORKS_JOB_IMAGES": "16",
        "CAPWORKS_METRICS_PORT": "0",
        "CAPWORKS_ALLOW_EVICTING_BROKER": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    r = redis.Redis.from_url(REDIS_URL)
    db = create_engine(db_url)
    logs = Path(tempfile.mkdtemp(prefix="capworks-faults-"))
    farm = Farm(env, procs, bare, logs)
    farm.start()
    # Wait until every process is up before publishing, so the runs compare like with like.
    while len(r.keys(f"capworks:heartbeat:{queue}:*")) < procs:
        time.sleep(0.5)
    started = time.monotonic()
    crawl = subprocess.run(
        [str(CAPWORKS), "enqueue", f"s3://{bucket}/", "--no-progress", "--force"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert crawl.returncode == 0, crawl.stderr
    recoveries: list[float] = []
    pending: list[tuple[float, list[str]]] = []
    kill_gap_s = 4.0
    next_kill = started + kill_gap_s
    done_kills = 0
    rng = random.Random(7)
    while count(db, Caption) + count(db, Failure) < images:
        now = time.monotonic()
        farm.restart_dead()
        if done_kills < kills and now >= next_kill:
            pids = farm.worker_pids()
            if pids:
                victim = rng.choice(pids)
                held = job_ids_held(r, victim)
                os.kill(victim, signal.SIGKILL)
                pending.append((time.monotonic(), held))
                done_kills += 1
                next_kill = time.monotonic() + kill_gap_s + rng.uniform(0, 6)
        for entry in list(pending):
            killed_at, held = entry
            if not held or any(r.exists(DONE_KEY.format(j)) for j in held):
                if held:
                    recoveries.append(time.monotonic() - killed_at)
                pending.remove(entry)
        if now - started > 1800:
            break
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    farm.stop()
    r.delete(queue)
    result = {
        "elapsed_s": elapsed,
        "captioned": count(db, Caption),
        "dead_letters": count(db, Failure),
        "kills": done_kills,
        "recoveries": recoveries,
    }
    with db.begin() as conn:
        conn.execute(delete(Caption))
        conn.execute(delete(Failure))
    db.dispose()
    return result


def main() -> None:
    """Both runs, then the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--bare", action="store_true", help="no supervisor: lease expiry alone")
    args = parser.parse_args()
    ensure_checkpoint("shapes", get_settings().checkpoint_dir)
    with scratch_database() as db_url, scratch_s3() as endpoint:
        connect(db_url).dispose()
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket="faults")
        for i, (img, _) in enumerate(sample_scenes(args.images, 900)):
            s3.put_object(Bucket="faults", Key=f"img/{i:05d}.png", Body=png(img))
        calm = run(args.images, 0, args.procs, args.bare, db_url, endpoint, "faults")
        rough = run(args.images, args.kills, args.procs, args.bare, db_url, endpoint, "faults")
    mode = "bare workers (lease expiry)" if args.bare else "supervised (hand-back)"
    rec = rough["recoveries"]
    print(f"{args.images} images, {args.procs} worker processes, {mode}, default lease settings")
    print("| run | kills | captioned | dead letters | lost | time s | recover p50 s | max s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in (("no kills", calm), ("kills", rough)):
        lost = args.images - res["captioned"] - res["dead_letters"]
        recs = res["recoveries"]
        p50 = f"{statistics.median(recs):.1f}" if recs else "-"
        top = f"{max(recs):.1f}" if recs else "-"
        print(
            f"| {name} | {res['kills']} | {res['captioned']} | {res['dead_letters']} | {lost} "
            f"| {res['elapsed_s']:.1f} | {p50} | {top} |"
        )
    print(f"time with kills / without: {rough['elapsed_s'] / calm['elapsed_s']:.2f} (goal <= 1.5)")
    print(f"kills whose held jobs were seen recovered: {len(rec)} of {rough['kills']}")


if __name__ == "__main__":
    main()
