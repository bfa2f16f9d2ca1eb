"""`capworks worker`: one Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES
before torch starts (the parent never imports torch), restarted if it dies or hangs.

Each process gets a fresh random instance id (`CAPWORKS_INSTANCE_ID`) every time it is started:
its leases, heartbeat and fetching lists are named by it, so twin containers (one hostname, the
supervisor PID 1 in each) never hand back or hide behind each other's jobs. A child whose
heartbeat is older than `heartbeat_stale_s` (a model thread hung in a batch) is killed and its
jobs handed back; a child whose own lease renewer saw the hang exits by itself first."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from capworks.models import resolve_model
from capworks.schema.instance import new_instance_id
from capworks.schema.metrics_endpoint import check_bind
from capworks.schema.settings import Settings, get_settings

log = logging.getLogger(__name__)
RESTART_DELAY_S = 2.0
MAX_RESTART_DELAY_S = 60.0
STABLE_S = 60.0  # a process that ran this long before dying is restarted after the base delay
KILLED_DELAY_S = 0.5  # after a SIGKILL: its slot idles, its jobs are handed back already
POLL_S = 0.5
NO_FILE_ROOTS = (
    "no file roots: every local image path is dead-lettered as forbidden_path; give --file-root"
    " DIR or set CAPWORKS_FILE_ROOTS to let the workers read a folder"
)
CHECK_STALE_EVERY_S = 5.0  # how often the supervisor reads its children's heartbeats


@dataclass
class Child:
    """One worker process, the device it owns, its instance id, and how long to wait if it
    dies."""

    gpu: str | None
    proc: subprocess.Popen[bytes]
    started_s: float
    delay_s: float = RESTART_DELAY_S
    instance: str = ""

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
        "capworks.workers.tasks",
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

    def start(self, gpu: str | None, index: int, instance: str) -> subprocess.Popen[bytes]:
        """Start the `index`-th worker process, pinned to one GPU (or the CPU when None), as
        instance `instance`."""
        ...


@dataclass(frozen=True)
class CeleryLauncher:
    """Starts capworks Celery worker processes, each with its device and metrics port."""

    concurrency: int
    loglevel: str = "INFO"
    threads_per_process: int = 0  # CPU processes: torch and decode threads each (0: all cores)
    # Settings from the command line (`--model`, `--db`, `--file-root`) as CAPWORKS_* variables.
    overrides: tuple[tuple[str, str], ...] = ()

    def command(
        self, gpu: str | None, index: int, instance: str
    ) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of the `index`-th worker process."""
        settings = get_settings()
        env = worker_env(dict(os.environ), gpu, index, settings.metrics_port)
        env.update(self.overrides)
        env["CAPWORKS_INSTANCE_ID"] = instance
        if self.threads_per_process:
            env["CAPWORKS_TORCH_THREADS"] = str(self.threads_per_process)
            env["CAPWORKS_DECODE_THREADS"] = str(self.threads_per_process)
        name = f"gpu{gpu}@%h" if gpu is not None else f"cpu{index}@%h"
        return celery_worker_argv(settings.queue_name, self.concurrency, name, self.loglevel), env

    def start(self, gpu: str | None, index: int, instance: str) -> subprocess.Popen[bytes]:
        """Start the `index`-th Celery worker process, pinned to one GPU (or the CPU)."""
        cmd, env = self.command(gpu, index, instance)
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
    overrides = setting_overrides(settings, args.model, args.revision, args.db, args.file_root)
    served = dict(overrides)
    roots = served.get("CAPWORKS_FILE_ROOTS", os.pathsep.join(map(str, settings.file_roots)))
    if not roots:
        log.warning("%s", NO_FILE_ROOTS)
    config = resolve_model(
        served.get("CAPWORKS_MODEL", settings.model),
        served.get("CAPWORKS_REVISION", settings.revision),
        settings,
        say=say,
    )
    say(f"serving {config.model_id or config.model_dir} ({config.model_dir})")
    launcher = CeleryLauncher(concurrency, args.loglevel, threads, tuple(overrides.items()))
    return supervise(
        devices, launcher, on_death=hand_back_jobs, stale_for_s=heartbeat_age_s(settings)
    )


def setting_overrides(
    settings: Settings,
    model: str | None,
    revision: str | None,
    db: str | None,
    file_roots: Sequence[str],
) -> dict[str, str]:
    """The CAPWORKS_* variables the worker processes get from the command line: the workers
    read settings only from their environment, so an option is passed down as its variable.
    A `--file-root` is made absolute and must exist (a typo would refuse every image)."""
    out: dict[str, str] = {}
    if model is not None:
        out["CAPWORKS_MODEL"] = model
    if revision is not None:
        out["CAPWORKS_REVISION"] = revision
    if db is not None:
        out["CAPWORKS_DATABASE_URL"] = db
    if file_roots:
        added = []
        for root in file_roots:
            path = Path(root).expanduser().absolute()
            if not path.exists():
                raise ValueError(f"--file-root {root}: no such file or directory")
            added.append(str(path))
        out["CAPWORKS_FILE_ROOTS"] = os.pathsep.join([*map(str, settings.file_roots), *added])
    return out


def say(line: str) -> None:
    """A line for the person who started the command, at once, whatever the log level."""
    print(f"capworks worker: {line}", file=sys.stderr, flush=True)


def hand_back_jobs(instance: str) -> None:
    """Give a dead child's held jobs back to the queue now, not when its lease expires."""
    import redis

    from capworks.schema.queue import make_redis
    from capworks.workers.leases import hand_back

    try:
        count = hand_back(make_redis(get_settings(), socket_timeout_s=5), instance)
    except redis.RedisError as exc:
        log.warning("could not hand back the jobs of %s (%s): its leases expire", instance, exc)
        return
    if count:
        log.warning("handed back the %d jobs worker %s held", count, instance)


def heartbeat_age_s(settings: Settings) -> Callable[[str], float]:
    """How long ago a child (by instance id) last beat, in seconds; 0 when it has no heartbeat
    (still loading its model) or Redis cannot say. Measured on Redis's clock, the one the child
    wrote it with."""
    import redis

    from capworks.schema.heartbeat import Heartbeat, heartbeat_key, redis_now
    from capworks.schema.queue import make_redis

    client = make_redis(settings, socket_timeout_s=5)

    def age_s(instance: str) -> float:
        try:
            raw = client.get(heartbeat_key(settings.queue_name, instance))
            return Heartbeat.from_json(raw).age_s(redis_now(client)) if raw is not None else 0.0
        except (redis.RedisError, ValueError) as exc:
            log.warning("could not read the heartbeat of %s (%s)", instance, exc)
            return 0.0

    return age_s


def supervise(
    gpus: Sequence[str | None],
    launcher: Launcher,
    *,
    restart_delay_s: float = RESTART_DELAY_S,
    poll_s: float = POLL_S,
    on_death: Callable[[str], None] | None = None,
    stale_for_s: Callable[[str], float] | None = None,
    stale_after_s: float | None = None,
    check_every_s: float = CHECK_STALE_EVERY_S,
) -> int:
    """Run one process per GPU, restart each that dies, until SIGTERM or SIGINT; `on_death`
    gets the instance id of each process that died (to hand its jobs back at once). A process
    whose heartbeat `stale_for_s` says is `stale_after_s` old (default `heartbeat_stale_s`) is
    killed, and handled as one that died.

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
    if stale_after_s is None:
        stale_after_s = get_settings().heartbeat_stale_s

    def start(gpu: str | None, index: int, delay_s: float) -> Child:
        instance = new_instance_id()
        return Child(gpu, launcher.start(gpu, index, instance), time.monotonic(), delay_s, instance)

    children = [start(g, i, restart_delay_s) for i, g in enumerate(gpus)]
    restart_at: dict[int, float] = {}
    checked_s = time.monotonic()
    while not stopping:
        now = time.monotonic()
        if stale_for_s is not None and now - checked_s >= check_every_s:
            checked_s = now
            kill_stale(children, restart_at, stale_for_s, stale_after_s)
        for i, child in enumerate(children):
            if i in restart_at:
                if now >= restart_at[i] and not stopping:
                    del restart_at[i]
                    children[i] = start(child.gpu, i, child.delay_s)
            elif (code := child.proc.poll()) is not None:
                if on_death is not None:
                    on_death(child.instance)
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


def kill_stale(
    children: Sequence[Child],
    restarting: dict[int, float],
    stale_for_s: Callable[[str], float],
    stale_after_s: float,
) -> None:
    """SIGKILL each running child whose heartbeat is `stale_after_s` old: its model thread is
    hung, and only a new process gets the device back (the next poll hands its jobs back)."""
    for i, child in enumerate(children):
        if i in restarting or child.proc.poll() is not None:
            continue
        age = stale_for_s(child.instance)
        if age >= stale_after_s:
            log.error(
                "worker %s (pid %d) has not beaten for %.0f s: killing it",
                child.instance,
                child.proc.pid,
                age,
            )
            child.proc.kill()
