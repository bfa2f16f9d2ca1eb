"""A Redis failover under running workers, on loopback: a primary, a replica and three Sentinels
(tests/sentinel_servers.py), two real `capworks worker --gpus cpu` supervisors and `capworks
enqueue`, all given the same `sentinel://` broker URL. The primary is SIGKILLed mid-run.

What asynchronous replication loses is made certain rather than left to chance: a second crawl
is published while the replica is stopped (and the workers too, so none of its jobs is taken
before the kill); the primary acknowledged it, the replica never saw it. The workers and the
producer follow the new primary by themselves; the lost crawl is found by `capworks enqueue
--reconcile`, and the test shows 0 images missing after it. Figures are printed as one JSON line
(and appended to CAPWORKS_FARM_OUT when set)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import png_bytes
from pipeline_support import Pipeline, wait_until
from sentinel_servers import SentinelGroup, sentinel_group
from sqlalchemy import create_engine, func, select

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.schema.tables import Caption, Failure, Image

pytestmark = pytest.mark.slow
CAPWORKS = Path(sys.executable).parent / "capworks"
RUN_LINE = re.compile(r"job (\S+): attempt (\d+) starts")
FIRST_IMAGES, LOST_IMAGES, JOB_IMAGES = 96, 32, 8
OUT = os.environ.get("CAPWORKS_FARM_OUT")


def write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    for i, (img, _) in enumerate(sample_scenes(count, seed)):
        (folder / f"{i:05d}.png").write_bytes(png_bytes(img))


def counts(db_url: str, folder: Path) -> tuple[int, int, int]:
    """(images captioned, caption rows, dead letters) under `folder`."""
    like = Image.uri.like(f"%{folder.name}/%")
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            done = conn.scalar(
                select(func.count(func.distinct(Caption.image_id))).join(Image).where(like)
            )
            rows = conn.scalar(select(func.count()).select_from(Caption).join(Image).where(like))
            dead = conn.scalar(select(func.count()).select_from(Failure).join(Image).where(like))
    finally:
        engine.dispose()
    return int(done or 0), int(rows or 0), int(dead or 0)


class Workers:
    """`capworks worker --gpus cpu` supervisors, each in a process group of its own (so the
    test can stop and resume every process of one at once)."""

    def __init__(self, p: Pipeline, count: int) -> None:
        self.p = p
        self.logs = [p.tmp / f"worker{i}.log" for i in range(count)]
        env = {**p.env, "CUDA_VISIBLE_DEVICES": "", "CAPWORKS_DEVICE": "cpu"}
        self.procs = [
            subprocess.Popen(
                [str(CAPWORKS), "worker", "--gpus", "cpu"],
                stdout=log.open("ab"),
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            for log in self.logs
        ]

    def text(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace") if self.logs[i].exists() else ""

    def wait_ready(self, timeout_s: float = 300) -> None:
        wait_until(
            lambda: all(" ready." in self.text(i) for i in range(len(self.logs))),
            timeout_s,
            "the workers to load their models",
            lambda: "\n".join(self.text(i)[-2000:] for i in range(len(self.logs))),
        )

    def signal_all(self, sig: signal.Signals) -> None:
        for proc in self.procs:
            os.killpg(proc.pid, sig)

    def runs(self, since: list[int] | None = None) -> Counter[tuple[str, int]]:
        """Each (job id, attempt) started, summed over the workers' logs (from `since`)."""
        found: Counter[tuple[str, int]] = Counter()
        for i in range(len(self.logs)):
            text = self.text(i)[since[i] if since else 0 :]
            found.update((job, int(a)) for job, a in RUN_LINE.findall(text))
        return found

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def settled(group: SentinelGroup, queue: str) -> bool:
    """The new primary holds no job: none queued, none delivered and unacknowledged."""
    r = group.new_primary()
    return int(r.llen(queue)) == 0 and int(r.hlen("unacked")) == 0


def test_workers_and_producers_follow_a_failover_and_reconcile_finds_what_it_lost(
    pg_url: str, shapes_dir: Path, tmp_path: Path
) -> None:
    first, lost = tmp_path / "images" / "first", tmp_path / "images" / "lost"
    write_images(first, FIRST_IMAGES, seed=27)
    write_images(lost, LOST_IMAGES, seed=28)
    with sentinel_group(tmp_path / "redis") as group:
        p = Pipeline(pg_url, "http://127.0.0.1:9", tmp_path)
        p.extra_env.update(group.env(), CAPWORKS_JOB_IMAGES=str(JOB_IMAGES))
        # The lease and visibility timeout at their defaults, as in production.
        for name in ("CAPWORKS_LEASE_S", "CAPWORKS_VISIBILITY_TIMEOUT_S"):
            p.extra_env.pop(name, None)
        workers = Workers(p, 2)
        try:
            workers.wait_ready()
            started = time.monotonic()
            done = p.cli("enqueue", str(first), "--no-progress")
            assert done.returncode == 0, done.stderr
            wait_until(lambda: counts(pg_url, first)[0] >= 16, 300, "first captions")
            # Every write so far on the replica; then a crawl the replica never receives.
            group.wait(group.replica_synced_fully, 10, "the replica to catch up")
            workers.signal_all(signal.SIGSTOP)
            frozen_at = time.monotonic()
            marks = [len(workers.text(i)) for i in range(2)]
            group.pause_replica()
            done = p.cli("enqueue", str(lost), "--no-progress")
            assert done.returncode == 0, done.stderr
            group.kill_primary()
            fault_at = time.monotonic()
            group.resume_replica()
            workers.signal_all(signal.SIGCONT)
            frozen_s = time.monotonic() - frozen_at
            group.wait_failover()
            failover_s = time.monotonic() - fault_at
            wait_until(lambda: settled(group, p.queue), 300, "the new primary's queue to drain")
            recovered_s = time.monotonic() - fault_at
            missing_before = FIRST_IMAGES + LOST_IMAGES
            missing_before -= counts(pg_url, first)[0] + counts(pg_url, lost)[0]
            # The producer, with the same settings, finds what the failover lost.
            for folder in (first, lost):
                done = p.cli("enqueue", str(folder), "--reconcile", "--no-progress")
                assert done.returncode == 0, done.stderr
            wait_until(
                lambda: (
                    counts(pg_url, first)[0] + counts(pg_url, lost)[0] >= FIRST_IMAGES + LOST_IMAGES
                ),
                300,
                "every image after the reconcile",
            )
            wall_s = time.monotonic() - started
            after_failover = workers.runs(marks)
            alive = [proc.poll() is None for proc in workers.procs]
        finally:
            workers.stop()
    twice = {key: n for key, n in workers.runs().items() if n > 1}
    started_before = set(workers.runs() - workers.runs(marks))
    first_counts, lost_counts = counts(pg_url, first), counts(pg_url, lost)
    figures = {
        "fault": "Redis failover (primary SIGKILLed, 3 Sentinels)",
        "images": FIRST_IMAGES + LOST_IMAGES,
        "missing_before_reconcile": missing_before,
        "lost_after_reconcile": FIRST_IMAGES - first_counts[0] + LOST_IMAGES - lost_counts[0],
        "rows_per_image": (first_counts[1] + lost_counts[1]) / (first_counts[0] + lost_counts[0]),
        "dead_letters": first_counts[2] + lost_counts[2],
        "jobs_run_twice": len(twice),
        "workers_frozen_s": round(frozen_s, 1),
        "failover_s": round(failover_s, 1),
        "queue_drained_s": round(recovered_s, 1),
        "wall_s": round(wall_s, 1),
    }
    print(f"\nfailover: {json.dumps(figures)}")
    if OUT:
        with open(OUT, "a") as out:
            out.write(json.dumps(figures) + "\n")
    assert figures["lost_after_reconcile"] == 0, figures
    assert figures["rows_per_image"] == 1.0 and figures["dead_letters"] == 0, figures
    # The crawl published while the replica was stopped is what the failover lost, all of it.
    assert missing_before == LOST_IMAGES, figures
    assert all(alive), "a worker's supervisor died in the failover"
    # Frozen, then without Redis until the failover, the workers renewed no lease for longer
    # than the lease: jobs they held then may have run again elsewhere, and no others.
    assert set(twice) <= started_before, figures
    # Both workers consumed from the new primary (the reconcile's jobs at least).
    assert all(RUN_LINE.search(workers.text(i)[marks[i] :]) for i in range(2)), (
        f"a worker took no job after the failover: {after_failover}"
    )
