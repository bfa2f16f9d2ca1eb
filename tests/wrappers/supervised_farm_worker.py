"""The real `capworks worker` supervisor (one CPU process, restarted when it dies or hangs, its
jobs handed back at once) over the counting workers of fake_farm_worker.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from capworks.commands.worker import CeleryLauncher, hand_back_jobs, heartbeat_age_s, supervise
from capworks.schema.settings import get_settings

WRAPPER = Path(__file__).with_name("fake_farm_worker.py")


class FarmWorkerLauncher(CeleryLauncher):
    """CeleryLauncher's command and environment, run through the counting wrapper."""

    def start(self, gpu: str | None, index: int, instance: str) -> subprocess.Popen[bytes]:
        cmd, env = self.command(gpu, index, instance)
        cmd[1:6] = [str(WRAPPER), "worker"]  # `python -m celery -A capworks.workers.tasks worker`
        return subprocess.Popen(cmd, env=env)


if __name__ == "__main__":
    settings = get_settings()
    sys.exit(
        supervise(
            [None],
            FarmWorkerLauncher(settings.prefetch_jobs),
            on_death=hand_back_jobs,
            stale_for_s=heartbeat_age_s(settings),
        )
    )
