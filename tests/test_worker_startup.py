"""A worker's start-up is a few lines, none of them the model libraries' chatter (issue 23,
item 13): before, `capworks worker` printed 66-96 lines before "ready" (DEBUG lines of redis and
alembic once the root logger was left at DEBUG, transformers' GenerationMixin notice three times,
fairseq's tensorboardX note)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from pipeline_support import own_queue, wait_until

# The supervisor's two lines, Celery's banner (about 20) and a handful of our own; the root
# warning Celery prints when run as root (8 lines) is the environment's, and counted too.
MAX_START_LINES = 40
CHATTER = ("DEBUG", "GenerationMixin", "tensorboardX", "alembic", "botocore", "redis.connection")


def test_a_worker_says_ready_within_a_few_lines_and_no_library_chatter(
    tmp_path: Path, shapes_dir: Path
) -> None:
    log = tmp_path / "worker.log"
    with own_queue(f"sqlite:///{tmp_path / 'w.db'}", tmp_path) as p:
        exe = Path(sys.executable).parent / "capworks"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [str(exe), "worker", "--gpus", "cpu", "--concurrency", "1", "--model", "shapes"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**p.env, "CAPWORKS_METRICS_PORT": "0"},
                cwd=REPO,
            )
        try:
            wait_until(lambda: " ready." in log.read_text(), 240, "ready", log.read_text)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    lines = log.read_text().splitlines()
    before = lines[: next(i for i, line in enumerate(lines) if " ready." in line)]
    shown = "\n".join(before)
    assert len(before) <= MAX_START_LINES, f"{len(before)} lines before ready:\n{shown}"
    assert not [line for line in before if any(word in line for word in CHATTER)], shown
    assert any("serving shapes" in line for line in before), "what is served is said"
