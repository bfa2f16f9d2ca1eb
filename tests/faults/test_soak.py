"""A soak: one worker process captioning without a pause for CAPWORKS_SOAK_MINUTES (5 by
default; 30 or more for the record), its resident memory sampled every 10 s. scripts/test.sh
runs it beside CI's train pass: what it asserts is memory, not time. It must stay bounded: the
last fifth of the samples no more than 15% (plus 64 MiB) above the fifth after warm-up. The
samples go to `soak-rss.csv` and a plot to `soak-rss.svg` in CAPWORKS_SOAK_OUT (default: the
test's temporary folder).

    CAPWORKS_SOAK_MINUTES=30 CAPWORKS_SOAK_OUT=. .venv/bin/pytest -s tests/faults/test_soak.py
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from pipeline_support import count_rows, make_bucket, own_queue

from faults.harness import CAPWORKS, Farm, default_env, rss_bytes

pytestmark = [pytest.mark.slow, pytest.mark.soak]
MINUTES = float(os.environ.get("CAPWORKS_SOAK_MINUTES", "5"))
MIB = 1024 * 1024


def svg_plot(samples: list[tuple[float, int]], path: Path) -> None:
    """RSS (MiB) over minutes as a plain SVG line: no plotting library needed."""
    width, height, pad = 640, 320, 40
    t_max = max(t for t, _ in samples) or 1.0
    r_max = max(r for _, r in samples) / MIB * 1.1 or 1.0
    points = " ".join(
        f"{pad + t / t_max * (width - 2 * pad):.1f},"
        f"{height - pad - r / MIB / r_max * (height - 2 * pad):.1f}"
        for t, r in samples
    )
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<polyline fill="none" stroke="steelblue" stroke-width="2" points="{points}"/>'
        f'<text x="{pad}" y="20">worker RSS, MiB (0 to {r_max:.0f}) over {t_max / 60:.0f} '
        f"minutes</text></svg>"
    )


def test_a_workers_memory_stays_bounded_over_a_long_run(
    pg_url: str, s3_endpoint: str, shapes_dir: Path, tmp_path: Path
) -> None:
    out = Path(os.environ.get("CAPWORKS_SOAK_OUT", str(tmp_path)))
    with own_queue(pg_url, tmp_path, s3_endpoint) as p:
        make_bucket(p.s3_endpoint, "soak", 400, seed=95)
        env = default_env(p, CAPWORKS_JOB_IMAGES="16")
        farm = Farm(env, procs=1, log=tmp_path / "soak.log")
        farm.start()
        r = p.redis()
        samples: list[tuple[float, int]] = []
        try:
            farm.wait_ready(r)
            (pid,) = farm.workers()
            started = time.monotonic()
            rng = random.Random(5)
            while (elapsed := time.monotonic() - started) < MINUTES * 60:
                if p.queue_length() < 8:  # keep it busy: the bucket again, as new jobs
                    subprocess.run(
                        [str(CAPWORKS), "enqueue", "s3://soak/", "--no-progress", "--force"],
                        env=env,
                        capture_output=True,
                        check=True,
                    )
                samples.append((elapsed, rss_bytes(pid)))
                assert farm.workers() == [pid], "the worker process died or was restarted"
                time.sleep(10 + rng.uniform(-1, 1))
        finally:
            farm.stop()
        with (out / "soak-rss.csv").open("w") as f:
            f.write("seconds,rss_bytes\n")
            f.writelines(f"{t:.0f},{rss}\n" for t, rss in samples)
        svg_plot(samples, out / "soak-rss.svg")
        fifth = max(1, len(samples) // 5)
        early = statistics.median(rss for _, rss in samples[fifth : 2 * fifth])
        late = statistics.median(rss for _, rss in samples[-fifth:])
        captioned = count_rows(p.db_url)["captions"]
        print(
            f"\nsoak: {MINUTES:.0f} min, {captioned} images captioned, RSS after warm-up "
            f"{early / MIB:.0f} MiB, at the end {late / MIB:.0f} MiB ({late / early:.2f}x)"
        )
        assert captioned == 400
        assert late <= 1.15 * early + 64 * MIB, (
            f"RSS grew from {early / MIB:.0f} to {late / MIB:.0f} MiB"
        )
