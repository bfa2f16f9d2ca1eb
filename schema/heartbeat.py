"""Worker heartbeats: each worker process says, from its batch loop, that it is alive.

The contract between workers (which write) and `capworks status` / `capworks health` (which
read): one Redis key per process, `capworks:heartbeat:<queue>:<instance>` (the process's random
instance id, `schema/instance.py`: hosts and pids repeat across containers), holding JSON
(instance, host, pid, the process's pid namespace, device, model, queue, jobs in flight, images
waiting for a batch, start and beat times in Unix seconds) and expiring `ttl_s` after the last
beat. The batch loop beats after every batch and while it waits for images, so a model thread
that hangs stops the beats while Celery itself still answers: its heartbeat goes stale (older
than `heartbeat_stale_s`), and the key disappears after the TTL. A process that stops cleanly
removes its key (`forget`).

Beat times are Redis's clock (`TIME`), and readers compare them with Redis's clock too: a host
whose own clock is off by minutes neither looks stale while it works nor fresh after it stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from capworks.schema.instance import instance_id

log = logging.getLogger(__name__)

KEY_PREFIX = "capworks:heartbeat:"
DEFAULT_TTL_S = 120


@dataclass(frozen=True)
class Heartbeat:
    """What one worker process last said about itself."""

    instance: str
    host: str
    pid: int
    device: str
    model: str
    queue: str
    jobs_in_flight: int
    images_waiting: int
    started_at: float  # Unix seconds, Redis's clock, when the process started beating
    beat_at: float  # Unix seconds, Redis's clock, the last beat
    # Where `pid` means something: the kernel's boot id and the pid namespace's inode. Twin
    # containers share a hostname and pids but not a pid namespace ("" from older workers).
    pid_space: str = ""
    # Celery's node name for the process (`cpu0@host`, `gpu1@host`): what Flower calls it, and
    # so what `capworks status` does ("" from older workers and plain `beat` callers).
    node: str = ""

    @property
    def key(self) -> str:
        """The Redis key of this process's heartbeat."""
        return heartbeat_key(self.queue, self.instance)

    def age_s(self, now: float) -> float:
        """Seconds since the last beat at `now` (Redis's clock, `redis_now`); never negative."""
        return max(0.0, now - self.beat_at)

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Heartbeat:
        """Parse a stored heartbeat; raise ValueError when it is not one."""
        try:
            data = json.loads(raw)
            return cls(
                instance=str(data["instance"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                device=str(data["device"]),
                model=str(data["model"]),
                queue=str(data["queue"]),
                jobs_in_flight=int(data["jobs_in_flight"]),
                images_waiting=int(data["images_waiting"]),
                started_at=float(data["started_at"]),
                beat_at=float(data["beat_at"]),
                pid_space=str(data.get("pid_space", "")),
                node=str(data.get("node", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a heartbeat: {exc}") from exc


_node: list[str] = []  # this process's Celery node name, once its worker has started


def name_node(node: str) -> None:
    """Record this process's Celery node name for its beats (the worker's start-up calls it)."""
    _node[:] = [node]


def heartbeat_key(queue: str, instance: str) -> str:
    """`capworks:heartbeat:<queue>:<instance>`: farms sharing a Redis keep apart by queue."""
    return f"{KEY_PREFIX}{queue}:{instance}"


def beat(
    redis: Any,
    *,
    device: str,
    model: str,
    queue: str,
    jobs_in_flight: int,
    images_waiting: int = 0,
    started_at: float | None = None,
    ttl_s: int = DEFAULT_TTL_S,
    instance: str | None = None,
    host: str | None = None,
    pid: int | None = None,
) -> Heartbeat:
    """Write this process's heartbeat (one SET with a TTL) and return it.

    Call it from the batch loop after each batch and on each idle wait. `started_at` defaults
    to this beat's time (a first beat). Redis errors are the caller's: a worker that cannot
    reach its broker has bigger problems than its heartbeat.
    """
    now = redis_now(redis)
    heartbeat = Heartbeat(
        instance=instance or instance_id(),
        host=host or socket.gethostname(),
        pid=os.getpid() if pid is None else pid,
        device=device,
        model=model,
        queue=queue,
        jobs_in_flight=jobs_in_flight,
        images_waiting=images_waiting,
        started_at=now if started_at is None else started_at,
        beat_at=now,
        pid_space=pid_space(),
        node=_node[0] if _node else "",
    )
    redis.set(heartbeat.key, heartbeat.to_json(), ex=ttl_s)
    return heartbeat


def redis_now(redis: Any) -> float:
    """Redis's clock (`TIME`), in Unix seconds: the one clock every host's beats and every
    reader's ages are measured on."""
    seconds, micros = redis.time()
    return float(seconds) + float(micros) / 1e6


@functools.cache
def pid_space() -> str:
    """This process's pid namespace, told apart across hosts and containers: the kernel's boot
    id and the namespace's inode ("" where /proc cannot say)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def forget(redis: Any, queue: str, instance: str | None = None) -> None:
    """Remove a process's heartbeat (this one's by default), as it stops cleanly."""
    redis.delete(heartbeat_key(queue, instance or instance_id()))


def read_heartbeats(redis: Any, queue: str | None = None) -> list[Heartbeat]:
    """Every live heartbeat (of workers on `queue`, or of all), by host and pid; a key that
    does not parse is logged and skipped."""
    pattern = f"{KEY_PREFIX}{_glob_escaped(queue)}:*" if queue else f"{KEY_PREFIX}*"
    keys = sorted(redis.scan_iter(match=pattern, count=1000))
    found = []
    for key, raw in zip(keys, redis.mget(keys) if keys else [], strict=True):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            found.append(Heartbeat.from_json(raw))
        except ValueError as exc:
            log.warning("skipping heartbeat key %r: %s", key, exc)
    # A queue named "a" also globs the keys of queue "a:b"; the stored queue tells them apart.
    return sorted((h for h in found if queue in (None, h.queue)), key=lambda h: (h.host, h.pid))


def _glob_escaped(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
