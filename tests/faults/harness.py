"""Fault injection for the fault suite and `bench/faults.py`: a supervised farm of worker
processes on one queue with the default lease and visibility settings, SIGKILLs at random
moments, and how long the jobs each killed process held took to come back (from the kill to the
first commit of one of them)."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline_support import Pipeline, instance_of, query
from sqlalchemy import create_engine, delete, func, select

from capworks.commands.worker import celery_worker_argv
from capworks.schema.heartbeat import heartbeat_key
from capworks.schema.tables import Caption, Failure, Image
from capworks.workers.leases import lease_key
from capworks.workers.ledger import DONE_KEY

CAPWORKS = Path(sys.executable).parent / "capworks"
# What `Pipeline.env` tunes for quick tests that this suite leaves at its defaults.
TUNED = ("CAPWORKS_VISIBILITY_TIMEOUT_S", "CAPWORKS_LEASE_S")


def default_env(p: Pipeline, **extra: str) -> dict[str, str]:
    """The pipeline's environment with the lease and visibility settings at their defaults."""
    env = {k: v for k, v in p.env.items() if k not in TUNED}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}


def jobs_held(r: Any, pid: int) -> list[str]:
    """The ids of the jobs a worker process holds: its lease names their delivery tags, and
    kombu's `unacked` hash holds their messages."""
    ids = []
    for tag in r.smembers(lease_key(instance_of(pid))):
        raw = r.hget("unacked", tag)
        if raw is None:  # acknowledged since the last renewal
            continue
        body = json.loads(base64.b64decode(json.loads(raw)[0]["body"]))
        ids.append(str(body[0][0]["id"]))
    return ids


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid` (a killed child not yet reaped is left out)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in path.read_text().split()] if path.exists() else []
    return [k for k in kids if _state(k) not in ("Z", "X", "")]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def rss_bytes(pid: int) -> int:
    """A process's resident set size, from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


@dataclass
class Kill:
    """One SIGKILL: when, which process, the jobs it held, and when the first came back."""

    at: float
    pid: int
    jobs: list[str]
    recovered_s: float | None = None
    restarted_s: float | None = None  # until every process was up again, model loaded

    @property
    def idle(self) -> bool:
        return not self.jobs


@dataclass
class Farm:
    """`capworks worker --gpus cpu --cpu-procs N`: one supervisor, N Celery worker processes it
    restarts when they die (handing their jobs back at once). With `bare`, N plain Celery worker
    processes and no supervisor, started again by `restart_dead`: their jobs come back by lease
    expiry alone, as when a whole host is lost."""

    env: dict[str, str]
    procs: int
    log: Path
    bare: bool = False
    supervisor: subprocess.Popen[bytes] | None = None
    plain: list[subprocess.Popen[bytes]] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)

    def start(self) -> None:
        if self.bare:
            self.plain = [self._plain(i) for i in range(self.procs)]
            return
        cmd = [str(CAPWORKS), "worker", "--gpus", "cpu", "--cpu-procs", str(self.procs)]
        out = self.log.open("ab")
        self.supervisor = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def _plain(self, i: int) -> subprocess.Popen[bytes]:
        cmd = celery_worker_argv(self.env["CAPWORKS_QUEUE_NAME"], 4, f"bare{i}-{time.time_ns()}@%h")
        out = self.log.open("ab")
        return subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def restart_dead(self) -> None:
        """Bare: start a dead worker process again (a supervisor does this by itself)."""
        for i, proc in enumerate(self.plain):
            if proc.poll() is not None:
                self.plain[i] = self._plain(i)

    def workers(self) -> list[int]:
        """The pids of the worker processes alive now."""
        if self.bare:
            return [p.pid for p in self.plain if p.poll() is None]
        assert self.supervisor is not None
        return children_of(self.supervisor.pid)

    def ready(self, r: Any) -> bool:
        """All N worker processes are alive and each has sent a heartbeat (its model is loaded)."""
        queue = self.env["CAPWORKS_QUEUE_NAME"]
        pids = self.workers()
        return len(pids) == self.procs and all(
            r.exists(heartbeat_key(queue, instance_of(pid))) for pid in pids
        )

    def wait_ready(self, r: Any, timeout_s: float = 300) -> None:
        """Until `ready`."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.ready(r):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"workers not ready:\n{self.log.read_text()[-3000:]}")
            self.restart_dead()
            time.sleep(0.5)

    def kill(self, r: Any, pid: int) -> Kill:
        """SIGKILL one worker process: no shutdown, no acknowledgement, no hand-back of its own."""
        kill = Kill(time.time(), pid, jobs_held(r, pid))
        os.kill(pid, signal.SIGKILL)
        self.kills.append(kill)
        return kill

    def note_recoveries(self, r: Any) -> None:
        """For each kill not yet recovered: has a job it held been committed since?"""
        for kill in self.kills:
            if kill.recovered_s is None and kill.jobs:
                if any(r.exists(DONE_KEY.format(j)) for j in kill.jobs):
                    kill.recovered_s = time.time() - kill.at

    def stop(self) -> None:
        for proc in self.plain:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.plain:
            proc.wait(timeout=120)
        if self.supervisor is not None and self.supervisor.poll() is None:
            self.supervisor.send_signal(signal.SIGTERM)
            try:
                self.supervisor.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.supervisor.kill()
                for pid in children_of(self.supervisor.pid):
                    os.kill(pid, signal.SIGKILL)


def run_with_kills(
    farm: Farm,
    r: Any,
    done: Callable[[], bool],
    kills: int,
    rng: random.Random,
    gap_s: tuple[float, float] = (3.0, 9.0),
    timeout_s: float = 1200,
) -> float:
    """Until `done()`: every `gap_s` seconds, once the whole farm is up, SIGKILL a random worker
    process among those holding jobs, `kills` times, noting when each one's jobs came back;
    returns the seconds it took."""
    started = time.monotonic()
    next_kill = started + rng.uniform(*gap_s)
    left = kills
    while not done():
        now = time.monotonic()
        if now - started > timeout_s:
            raise AssertionError(f"not done after {timeout_s} s:\n{farm.log.read_text()[-3000:]}")
        ready = farm.ready(r)
        if ready and farm.kills and farm.kills[-1].restarted_s is None:
            farm.kills[-1].restarted_s = time.time() - farm.kills[-1].at
        if left and now >= next_kill and ready:
            busy = [pid for pid in farm.workers() if jobs_held(r, pid)]
            if busy:
                farm.kill(r, rng.choice(busy))
                left -= 1
                next_kill = now + rng.uniform(*gap_s)
        farm.note_recoveries(r)
        farm.restart_dead()
        time.sleep(0.1)
    farm.note_recoveries(r)
    return time.monotonic() - started


def crawl(env: dict[str, str], uri: str) -> None:
    """`capworks enqueue URI --force`: every object again, as new jobs."""
    result = subprocess.run(
        [str(CAPWORKS), "enqueue", uri, "--no-progress", "--force"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr


def timed_crawl(
    farm: Farm,
    r: Any,
    uri: str,
    done: Callable[[], bool],
    kills: int,
    seed: int = 1234,
    gap_s: tuple[float, float] = (3.0, 9.0),
) -> float:
    """Start `farm`; once it is up (and, with kills, once one process was killed while idle),
    crawl `uri`, then caption until `done()` with `kills` SIGKILLs at random moments; the
    seconds from the crawl to done."""
    farm.start()
    try:
        farm.wait_ready(r)
        if kills:
            farm.kill(r, farm.workers()[0])  # idle: it holds nothing yet
            farm.wait_ready(r)
        started = time.monotonic()
        crawl(farm.env, uri)
        run_with_kills(farm, r, done, kills, random.Random(seed), gap_s)
        return time.monotonic() - started
    finally:
        farm.stop()


def distinct_captioned(db_url: str) -> int:
    """How many images have a caption (a second caption row of one image would not count)."""
    stmt = select(func.count(func.distinct(Caption.image_id)))
    return int(query(db_url, lambda conn: conn.scalar(stmt)) or 0)


def clear(db_url: str) -> None:
    """Empty the results, for a second run over the same bucket."""
    engine = create_engine(db_url)
    with engine.begin() as conn:
        for table in (Caption, Failure, Image):
            conn.execute(delete(table))
    engine.dispose()
