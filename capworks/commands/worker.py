"""`capworks worker`: one Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES
before torch starts (the parent never imports torch), restarted if it dies."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from schema.settings import get_settings

log = logging.getLogger(__name__)
RESTART_DELAY_S = 2.0


@dataclass
class Child:
    """One worker process and the device it owns."""

    gpu: str | None
    proc: subprocess.Popen[bytes]


def parse_gpus(spec: str) -> list[str | None]:
    """`cpu` -> [None]; `all` -> every GPU nvidia-smi lists; `0,1` -> those indices."""
    if spec == "cpu":
        return [None]
    if spec == "all":
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            raise ValueError("--gpus all: nvidia-smi found no GPU; use --gpus cpu") from None
        gpus: list[str | None] = [
            str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")
        ]
        if not gpus:
            raise ValueError("--gpus all: no GPU listed by nvidia-smi; use --gpus cpu")
        return gpus
    parts = [p.strip() for p in spec.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--gpus takes all, cpu or a list like 0,1; got {spec!r}")
    return list(dict.fromkeys(parts))


def celery_worker_argv(
    queue: str, concurrency: int, hostname: str, loglevel: str = "INFO"
) -> list[str]:
    """The command line of one capworks Celery worker process (threads pool, events on)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.tasks",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--hostname",
        hostname,
        "--queues",
        queue,
        "--loglevel",
        loglevel,
        "--task-events",
        "--without-gossip",
        "--without-mingle",
    ]


def start_child(gpu: str | None, index: int, concurrency: int, loglevel: str) -> Child:
    """Start the `index`-th Celery worker process, pinned to one GPU (or the CPU)."""
    settings = get_settings()
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = gpu or ""
    env["CAPWORKS_DEVICE"] = "cuda:0" if gpu is not None else "cpu"
    if settings.metrics_port:  # one metrics port per process
        env["CAPWORKS_METRICS_PORT"] = str(settings.metrics_port + index)
    name = f"gpu{gpu}@%h" if gpu is not None else "cpu@%h"
    cmd = celery_worker_argv(settings.queue_name, concurrency, name, loglevel)
    log.info("starting %s", " ".join(cmd))
    return Child(gpu, subprocess.Popen(cmd, env=env))


def run_worker(args: argparse.Namespace) -> int:
    """Run and supervise the worker processes until SIGTERM or SIGINT."""
    gpus = parse_gpus(args.gpus)
    concurrency = args.concurrency or get_settings().prefetch_jobs
    children = [start_child(g, i, concurrency, args.loglevel) for i, g in enumerate(gpus)]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)  # warm shutdown: running jobs finish

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        for i, child in enumerate(children):
            code = child.proc.poll()
            if code is not None and not stopping:
                log.warning("worker for %s exited with %s; restarting", child.gpu or "cpu", code)
                time.sleep(RESTART_DELAY_S)
                children[i] = start_child(child.gpu, i, concurrency, args.loglevel)
        time.sleep(0.5)
    for child in children:
        child.proc.wait()
    return 0
