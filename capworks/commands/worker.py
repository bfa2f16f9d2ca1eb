"""`capworks worker`: one Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES
before torch starts (the parent never imports torch), restarted if it dies."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from schema.metrics_endpoint import check_bind
from schema.settings import get_settings

log = logging.getLogger(__name__)
RESTART_DELAY_S = 2.0
MAX_RESTART_DELAY_S = 60.0
STABLE_S = 60.0  # a process that ran this long before dying is restarted after the base delay
KILLED_DELAY_S = 0.5  # after a SIGKILL: its slot idles, its jobs are handed back already
POLL_S = 0.5


@dataclass
class Child:
    """One worker process, the device it owns, and how long to wait if it dies."""

    gpu: str | None
    proc: subprocess.Popen[bytes]
    started_s: float
    delay_s: float = RESTART_DELAY_S

    def next_delay(
        self, now_s: float, base_s: float = RESTART_DELAY_S, code: int | None = None
    ) -> float:
        """Half a second after a SIGKILL (the OOM killer, an operator, a fault test: nothing a
        wait would cure); the base delay after a process that ran a while; doubling, up to a
        minute, after one that exited or crashed young (a worker that cannot load its model
        should not spin)."""
        if code == -signal.SIGKILL:
            return min(KILLED_DELAY_S, base_s)
        if now_s - self.started_s >= STABLE_S:
            return base_s
        return min(self.delay_s * 2, MAX_RESTART_DELAY_S)


def parse_gpus(spec: str) -> list[str | None]:
    """`cpu` -> [None]; `all` -> every GPU nvidia-smi lists; `0,1` -> those indices."""
    if spec == "cpu":
        return [None]
    if spec == "all":
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)  # noqa: S607 - found on PATH, as the operator's shell would
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


class Launcher(Protocol):
    """Starts one worker process; the seam where a test plugs in stand-in processes."""

    def start(self, gpu: str | None, index: int) -> subprocess.Popen[bytes]:
        """Start the `index`-th worker process, pinned to one GPU (or the CPU when None)."""
        ...


@dataclass(frozen=True)
class CeleryLauncher:
    """Starts capworks Celery worker processes, each with its device and metrics port."""

    concurrency: int
    loglevel: str = "INFO"
    threads_per_process: int = 0  # CPU processes: torch and decode threads each (0: all cores)

    def command(self, gpu: str | None, index: int) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of the `index`-th worker process."""
        settings = get_settings()
        env = worker_env(dict(os.environ), gpu, index, settings.metrics_port)
        if self.threads_per_process:
            env["CAPWORKS_TORCH_THREADS"] = str(self.threads_per_process)
            env["CAPWORKS_DECODE_THREADS"] = str(self.threads_per_process)
        name = f"gpu{gpu}@%h" if gpu is not None else f"cpu{index}@%h"
        return celery_worker_argv(settings.queue_name, self.concurrency, name, self.loglevel), env

    def start(self, gpu: str | None, index: int) -> subprocess.Popen[bytes]:
        """Start the `index`-th Celery worker process, pinned to one GPU (or the CPU)."""
        cmd, env = self.command(gpu, index)
        log.info("starting %s", " ".join(cmd))
        return subprocess.Popen(cmd, env=env)  # noqa: S603 - our own argv (sys.executable -m celery), no shell


def worker_env(
    env: dict[str, str], gpu: str | None, index: int, metrics_port: int
) -> dict[str, str]:
    """The environment of one worker process: its device, and its own metrics port."""
    env["CUDA_VISIBLE_DEVICES"] = gpu or ""
    env["CAPWORKS_DEVICE"] = "cuda:0" if gpu is not None else "cpu"
    if metrics_port:  # one metrics port per process
        env["CAPWORKS_METRICS_PORT"] = str(metrics_port + index)
    return env


def plan_processes(gpus_spec: str, cpu_procs: int | None) -> tuple[list[str | None], int]:
    """The device of each worker process, and the threads each CPU process may use (0: all):
    one process per GPU, or `cpu_procs` CPU processes sharing the cores evenly."""
    gpus = parse_gpus(gpus_spec)
    if cpu_procs is None:
        return gpus, 0
    if gpus != [None]:
        raise ValueError("--cpu-procs needs --gpus cpu")
    cores = len(os.sched_getaffinity(0))
    if cpu_procs > cores:
        raise ValueError(f"--cpu-procs {cpu_procs} is more than this machine's {cores} cores")
    return [None] * cpu_procs, cores // cpu_procs


def run_worker(args: argparse.Namespace) -> int:
    """Run and supervise the worker processes until SIGTERM or SIGINT."""
    settings = get_settings()
    if settings.metrics_port:  # refused in one line here, before any process starts
        check_bind(settings.metrics_host, settings.metrics_token, settings.metrics_allow_open)
    devices, threads = plan_processes(args.gpus, args.cpu_procs)
    concurrency = args.concurrency or settings.prefetch_jobs
    launcher = CeleryLauncher(concurrency, args.loglevel, threads)
    return supervise(devices, launcher, on_death=hand_back_jobs)


def hand_back_jobs(pid: int) -> None:
    """Give a dead child's held jobs back to the queue now, not when its lease expires."""
    import redis

    from schema.queue import make_redis
    from workers.leases import hand_back

    try:
        count = hand_back(make_redis(get_settings(), socket_timeout_s=5), socket.gethostname(), pid)
    except redis.RedisError as exc:
        log.warning("could not hand back the jobs of process %d (%s): its lease expires", pid, exc)
        return
    if count:
        log.warning("handed back the %d jobs process %d held", count, pid)


def supervise(
    gpus: Sequence[str | None],
    launcher: Launcher,
    *,
    restart_delay_s: float = RESTART_DELAY_S,
    poll_s: float = POLL_S,
    on_death: Callable[[int], None] | None = None,
) -> int:
    """Run one process per GPU, restart each that dies, until SIGTERM or SIGINT; `on_death`
    gets the pid of each process that died (to hand its jobs back at once).

    The signal handler only notes the request; this loop does the stopping, so a process
    started while the signal arrived is recorded first and stopped with the others.
    """
    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    # Before the first start: a SIGTERM's default action would leave the children running.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    children = [
        Child(g, launcher.start(g, i), time.monotonic(), restart_delay_s)
        for i, g in enumerate(gpus)
    ]
    restart_at: dict[int, float] = {}
    while not stopping:
        now = time.monotonic()
        for i, child in enumerate(children):
            if i in restart_at:
                if now >= restart_at[i] and not stopping:
                    del restart_at[i]
                    children[i] = Child(
                        child.gpu, launcher.start(child.gpu, i), time.monotonic(), child.delay_s
                    )
            elif (code := child.proc.poll()) is not None:
                if on_death is not None:
                    on_death(child.proc.pid)
                child.delay_s = child.next_delay(now, restart_delay_s, code)
                restart_at[i] = now + child.delay_s
                log.warning(
                    "worker for %s exited with %s; restarting in %.0f s",
                    child.gpu or "cpu",
                    code,
                    child.delay_s,
                )
        time.sleep(poll_s)
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)  # warm shutdown: running jobs finish
    for child in children:
        child.proc.wait()
    return 0
