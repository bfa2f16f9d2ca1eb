"""What a worker promises about the jobs it takes, each with a test that fails without it.

- A job is acknowledged only after its captions are committed. The worker's write is held
  waiting on a lock the test takes on the captions table; the worker is SIGKILLed while it waits;
  the lock is released. Had the job been acknowledged before the commit (a write left to a
  background thread, say), nothing would run it again and its images would never be captioned.
- A job is leased the moment it is received, not when its task starts: a job received but not
  yet started when its worker is killed is back within a lease, not after kombu's visibility
  timeout (an hour).
Each image's fetches are counted by the worker (tests/wrappers/fake_farm_worker.py), so a job run
again is seen."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO
from faults.test_farm_faults import enqueue, held, ready, runs, runs_per_image, slow_images
from pipeline_support import captions, failures, own_queue, wait_until
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "wrappers" / "fake_farm_worker.py"


def test_a_worker_killed_while_its_write_waits_leaves_its_job_to_run_again(
    pg_url: str, s3_endpoint: str, shapes_dir: Path, tmp_path: Path
) -> None:
    with own_queue(pg_url, tmp_path, s3_endpoint) as p:
        p.extra_env.update(CAPWORKS_JOB_IMAGES="4", CAPWORKS_TEST_SLOW_S="0")
        uris = slow_images(p, "held-write", 4, seed=206)
        first = p.start_worker("first", WORKER, concurrency=1)
        ready(p, "first")  # its model is loaded and the tables are migrated
        locker = create_engine(p.db_url, poolclass=NullPool)
        with locker.connect() as conn:
            # EXCLUSIVE blocks writes, not reads: the producer still checks what is captioned.
            conn.execute(text("LOCK TABLE captions IN EXCLUSIVE MODE"))

            def write_waits() -> bool:
                with locker.connect() as probe:
                    waiting = probe.scalar(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND datname = current_database()"
                        )
                    )
                return bool(waiting)

            enqueue(p, "held-write")
            wait_until(write_waits, 120, "the worker's write to wait on the lock")
            first.kill()
            first.wait(timeout=30)
            conn.rollback()  # the lock goes; nothing the worker did was committed
        locker.dispose()
        assert captions(p.db_url) == {}
        p.start_worker("second", WORKER, concurrency=1)
        wait_until(
            lambda: set(captions(p.db_url)) == set(uris),
            180,
            "every caption, from the job run again",
            lambda: p.log_text("second")[-3000:],
        )
        assert runs_per_image(p) == Counter(dict.fromkeys(uris, 2))
        assert failures(p.db_url) == {}


def test_a_job_received_a_moment_before_a_kill_is_back_within_a_lease(
    pg_url: str, s3_endpoint: str, shapes_dir: Path, tmp_path: Path
) -> None:
    with own_queue(pg_url, tmp_path, s3_endpoint) as p:
        p.extra_env.update(CAPWORKS_JOB_IMAGES="1", CAPWORKS_TEST_DELAY_START_S="600")
        uris = slow_images(p, "on-receipt", 1, seed=207)
        first = p.start_worker("first", WORKER, concurrency=1)
        ready(p, "first")
        enqueue(p, "on-receipt")
        # Received, not started: no fetch yet, and already leased.
        wait_until(lambda: len(held(p, first.pid)) == 1, 60, "the received job's lease")
        assert runs(p) == []
        first.kill()
        first.wait(timeout=30)
        p.extra_env.pop("CAPWORKS_TEST_DELAY_START_S")
        p.start_worker("second", WORKER, concurrency=1)
        ready(p, "second")
        # Reaped at the new worker's first lease tick; kombu alone would wait an hour.
        wait_until(
            lambda: set(captions(p.db_url)) == set(uris),
            60,
            "the job back from the dead worker",
            lambda: p.log_text("second")[-3000:],
        )
        assert runs_per_image(p) == Counter(dict.fromkeys(uris, 1))
        assert failures(p.db_url) == {}
