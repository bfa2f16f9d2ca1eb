"""The real `capworks worker` supervisor (one CPU process, restarted when it dies, its jobs
handed back at once) over the crash wrapper's workers (fake_crash_worker.py), whose slow
fetches keep jobs held long enough to kill a child mid-run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from capworks.commands.worker import CeleryLauncher, hand_back_jobs, supervise

WRAPPER = Path(__file__).with_name("fake_crash_worker.py")


class CrashWorkerLauncher(CeleryLauncher):
    """CeleryLauncher's command and environment, run through the crash wrapper."""

    def start(self, gpu: str | None, index: int, instance: str) -> subprocess.Popen[bytes]:
        cmd, env = self.command(gpu, index, instance)
        cmd[1:6] = [str(WRAPPER), "worker"]  # `python -m celery -A capworks.workers.tasks worker`
        return subprocess.Popen(cmd, env=env)


if __name__ == "__main__":
    sys.exit(supervise([None], CrashWorkerLauncher(4), on_death=hand_back_jobs))
