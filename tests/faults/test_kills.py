"""3,000 images through two supervised worker processes with the default lease and visibility
settings, with six SIGKILLs (one while the farm is idle, five at random moments of the run):
nothing lost, no caption twice, the queue empty, and every killed process's jobs committed again
within the supervisor's promise: handed back at once, run at the other process's next tick
(README, "Delivery and retries"), with a margin for CI's load that stays below what the lease
alone could do. With CAPWORKS_FAULT_CALM=1 the same crawl runs calm first, for RELIABILITY.md's
slowdown figure (a timing, not asserted; CI leaves it out: two minutes of its time)."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import count_rows, make_bucket, own_queue, wait_until

from capworks.commands.worker import POLL_S
from capworks.schema.settings import Settings
from capworks.workers.leases import renew_every_s
from faults.harness import Farm, clear, default_env, distinct_captioned, timed_crawl

pytestmark = pytest.mark.slow
IMAGES = 3000
LEASE_S = Settings.model_fields["lease_s"].default
# The hand-back's promise: the supervisor sees the death within a poll (0.5 s) and hands the jobs
# back, the other process's next tick (2 s) restores them, then one job's run. Without it a job
# waits for its lease to expire (at least lease - tick after the kill), a tick to be reaped, and
# its run: 10.4-15.2 s here with the hand-back disabled, against 3.8 s p50 / 5.1 s max with it on
# a loaded machine (2026-12-05). The bound, the lease itself, leaves ~3 s of that for CI's load.
PROMISED_S = POLL_S + renew_every_s(LEASE_S)
BOUND_S = LEASE_S
CALM = os.environ.get("CAPWORKS_FAULT_CALM") == "1"


def test_six_sigkills_lose_nothing_repeat_nothing_and_recover_by_the_hand_back(
    pg_url: str, s3_endpoint: str, shapes_dir: Path, tmp_path: Path
) -> None:
    with own_queue(pg_url, tmp_path, s3_endpoint) as p:
        make_bucket(p.s3_endpoint, "faults", IMAGES, seed=91)
        env = default_env(p, CAPWORKS_JOB_IMAGES="8")
        r = p.redis()

        def done() -> bool:
            rows = count_rows(p.db_url)
            return rows["captions"] + rows["failures"] >= IMAGES and p.queue_length() == 0

        calm_s: float | None = None
        if CALM:
            calm_s = timed_crawl(Farm(env, 2, tmp_path / "calm.log"), r, "s3://faults/", done, 0)
            assert count_rows(p.db_url)["captions"] == IMAGES
            clear(p.db_url)
        farm = Farm(env, 2, tmp_path / "rough.log")
        rough_s = timed_crawl(farm, r, "s3://faults/", done, 5, gap_s=(8.0, 16.0))
        rows = count_rows(p.db_url)
        wait_until(lambda: p.queue_length() == 0, 30, "an empty queue")
        assert (rows["images"], rows["captions"], rows["failures"]) == (IMAGES, IMAGES, 0)
        assert distinct_captioned(p.db_url) == IMAGES  # no image captioned twice
        killed = [k for k in farm.kills]
        assert len(killed) == 6 and killed[0].idle
        recovered = [k.recovered_s for k in killed if k.jobs]
        assert len(recovered) >= 3, [(k.pid, k.jobs) for k in killed]
        assert all(s is not None for s in recovered), "a killed process's jobs never came back"
        times: list[float] = [s for s in recovered if s is not None]
        report(calm_s, rough_s, farm, times)
        assert max(times) < BOUND_S, (
            f"recovery took {max(times):.1f} s: promised {PROMISED_S:.1f} s and a job's run, "
            f"bound {BOUND_S:.0f} s (the lease)"
        )
        # The slowdown (rough_s / calm_s) is printed by `report` and recorded in RELIABILITY.md,
        # not asserted: a timing on a shared 2-core machine, not a pass or fail.


def report(calm_s: float | None, rough_s: float, farm: Any, times: list[float]) -> None:
    """The figures RELIABILITY.md records (shown with `pytest -s`)."""
    walls = f"{rough_s:.0f} s with kills"
    if calm_s is not None:
        walls = f"{calm_s:.0f} s calm, {walls} ({rough_s / calm_s:.2f}x)"
    print(
        f"\nkills: {len(farm.kills)} ({sum(k.idle for k in farm.kills)} idle); "
        f"recovery p50 {statistics.median(times):.1f} s, max {max(times):.1f} s; restart "
        f"{[round(k.restarted_s or -1, 1) for k in farm.kills]} s; {walls}"
    )
