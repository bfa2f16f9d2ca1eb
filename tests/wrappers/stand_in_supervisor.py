"""The `capworks worker` supervisor over stand-in children, to test what it does on SIGTERM.

A stand-in either exits at once (like a worker that cannot load its model, so it is restarted
again and again) or sleeps until it is signalled (like a healthy worker). The first
--exit-first processes exit; after them each exits with odds 1 - --live-share. With
--signal-self-at N the supervisor sends itself SIGTERM right after starting its N-th process,
before the start returns: a SIGTERM landing during a restart, made certain. Every pid is
appended to --pids, so a test can check that none outlives the supervisor.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from capworks.commands.worker import supervise


class StandInLauncher:
    """Starts `false` or `sleep 300` in place of a Celery worker."""

    def __init__(
        self, pids: Path, exit_first: int, live_share: float, signal_self_at: int, seed: int
    ) -> None:
        self.pids = pids
        self.exit_first = exit_first
        self.live_share = live_share
        self.signal_self_at = signal_self_at
        self.random = random.Random(seed)
        self.started = 0

    def start(self, gpu: str | None, index: int, instance: str) -> subprocess.Popen[bytes]:
        self.started += 1
        exits = self.started <= self.exit_first or self.random.random() >= self.live_share
        proc = subprocess.Popen(["false"] if exits else ["sleep", "300"])
        with self.pids.open("a") as f:
            f.write(f"{proc.pid}\n")
        if self.started == self.signal_self_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return proc


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pids", type=Path, required=True)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--exit-first", type=int, default=0)
    parser.add_argument("--live-share", type=float, default=1.0)
    parser.add_argument("--signal-self-at", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    launcher = StandInLauncher(
        args.pids, args.exit_first, args.live_share, args.signal_self_at, args.seed
    )
    gpus = [str(n) for n in range(args.slots)]
    code = supervise(gpus, launcher, restart_delay_s=0.001, poll_s=0.01)
    # Said before exiting: a SIGTERM that lands while the interpreter shuts down (its handlers
    # back to the default) ends the process with -15 after the supervisor did its work.
    print(f"supervisor returned {code}", flush=True)
    sys.exit(code)
