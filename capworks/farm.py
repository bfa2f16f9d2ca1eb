"""The figures of a running farm, for `capworks status` and `capworks health`: the queue in
Redis, workers' heartbeats, what the database recorded in the last hour, and the crawls.

Queue depth: Celery's Redis transport keeps waiting messages in a list named after the queue
(LPUSH in, BRPOP out) and messages delivered but not yet acknowledged (prefetched or running)
in the `unacked` hash as `[message, exchange, routing key]`. A message's body is base64 JSON
`[args, kwargs, embed]` whose first argument is the job (`schema/jobs.py`). Jobs are counted
exactly (LLEN); images exactly up to `EXACT_JOBS` queued jobs, and beyond that estimated from
`SAMPLE_JOBS` jobs at each end of the list (the newest and the next to run).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from capworks.schema.heartbeat import Heartbeat, pid_space, read_heartbeats, redis_now
from capworks.schema.tables import Caption, Crawl, Failure, utcnow

UNACKED_KEY = "unacked"
EXACT_JOBS = 2_000
SAMPLE_JOBS = 500
PAGE_JOBS = 500
RATE_WINDOW_S = 300  # the throughput is measured over the last five minutes
RECENT_CRAWLS = 10


@dataclass(frozen=True)
class QueueDepth:
    """Jobs and images waiting in the queue and held by workers."""

    jobs_waiting: int
    images_waiting: int
    images_estimated: bool  # images_waiting extrapolated from samples
    jobs_held: int
    images_held: int


@dataclass(frozen=True)
class Activity:
    """What the database recorded lately."""

    captioned_last_hour: int
    dead_lettered_last_hour: int
    captioned_per_s: float  # over the last RATE_WINDOW_S


@dataclass(frozen=True)
class CrawlProgress:
    """One crawl's counts, listing rate and last progress."""

    id: str
    source: str
    state: str
    listed: int
    skipped: int
    enqueued: int
    jobs: int
    started: datetime
    updated: datetime
    listed_per_s: float


@dataclass(frozen=True)
class WorkerState:
    """A heartbeat as seen now: its age, and whether it is stale or its process gone."""

    heartbeat: Heartbeat
    age_s: float
    stale: bool
    gone: bool  # on this host and its process no longer exists


@dataclass(frozen=True)
class FarmStatus:
    """Everything `capworks status` shows."""

    queue: QueueDepth
    workers: list[WorkerState]
    activity: Activity
    crawls: list[CrawlProgress]
    drain_eta_s: float | None  # images waiting / captioned_per_s, when both are known
    taken_at: datetime = field(default_factory=utcnow)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able values (datetimes in ISO 8601)."""
        return json.loads(json.dumps(asdict(self), default=_iso))  # type: ignore[no-any-return]


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def images_in_message(raw: bytes | str) -> int:
    """How many images a queued Celery message's job holds (0 for a message that is not one)."""
    try:
        envelope = json.loads(raw)
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        return len(args[0]["images"])
    except (ValueError, KeyError, IndexError, TypeError):
        return 0


def read_queue(
    redis: Any, queue: str, exact_jobs: int = EXACT_JOBS, sample_jobs: int = SAMPLE_JOBS
) -> QueueDepth:
    """Jobs and images waiting in `queue` and held (unacknowledged) by workers."""
    jobs = int(redis.llen(queue))
    if jobs <= exact_jobs:
        images = sum(
            images_in_message(raw)
            for start in range(0, jobs, PAGE_JOBS)
            for raw in redis.lrange(queue, start, start + PAGE_JOBS - 1)
        )
        estimated = False
    else:
        sample = [*redis.lrange(queue, 0, sample_jobs - 1), *redis.lrange(queue, -sample_jobs, -1)]
        images = round(sum(map(images_in_message, sample)) / len(sample) * jobs)
        estimated = True
    held_jobs = held_images = 0
    for raw in redis.hvals(UNACKED_KEY):
        try:
            message, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        if routing_key == queue:
            held_jobs += 1
            held_images += images_in_message(json.dumps(message))
    return QueueDepth(jobs, images, estimated, held_jobs, held_images)


def worker_states(
    heartbeats: list[Heartbeat], stale_after_s: float, now: float
) -> list[WorkerState]:
    """Heartbeats judged at `now` (Redis's clock, `redis_now`): stale past `stale_after_s`;
    gone when its process was in this pid namespace and is there no more. Hostnames and pids
    repeat across containers, so only a heartbeat from our own pid space is judged by pid."""
    here = pid_space()
    return [
        WorkerState(
            hb,
            hb.age_s(now),
            hb.age_s(now) > stale_after_s,
            bool(here) and hb.pid_space == here and not _process_exists(hb.pid),
        )
        for hb in heartbeats
    ]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def read_activity(db: Engine) -> Activity:
    """Images captioned and dead-lettered in the last hour, and the recent caption rate."""
    now = utcnow()
    hour_ago, window_start = now - timedelta(hours=1), now - timedelta(seconds=RATE_WINDOW_S)
    with Session(db) as session:
        captioned = session.scalar(select(func.count()).where(Caption.created >= hour_ago))
        recent = session.scalar(select(func.count()).where(Caption.created >= window_start))
        dead = session.scalar(select(func.count()).where(Failure.last_seen >= hour_ago))
    return Activity(int(captioned or 0), int(dead or 0), int(recent or 0) / RATE_WINDOW_S)


def read_crawls(db: Engine, limit: int = RECENT_CRAWLS) -> list[CrawlProgress]:
    """Running crawls and the latest finished ones, most recently updated first."""
    query = select(Crawl).order_by((Crawl.state == "running").desc(), Crawl.updated.desc())
    with Session(db) as session:
        crawls = list(session.scalars(query.limit(limit)))
    progress = []
    for c in crawls:
        elapsed_s = (_aware(c.updated) - _aware(c.created)).total_seconds()
        rate = c.listed / elapsed_s if elapsed_s > 0 else 0.0
        progress.append(
            CrawlProgress(
                c.id,
                c.source,
                c.state,
                c.listed,
                c.skipped,
                c.enqueued,
                c.jobs,
                _aware(c.created),
                _aware(c.updated),
                rate,
            )
        )
    return progress


def _aware(moment: datetime) -> datetime:
    # SQLite gives back naive datetimes; every stored time is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


def ping_database(db: Engine) -> None:
    """Raise the driver's error when the database cannot be reached."""
    with db.connect() as conn:
        conn.execute(text("SELECT 1"))


def gather(redis: Any, db: Engine, queue: str, stale_after_s: float) -> FarmStatus:
    """Every figure of `capworks status`, read now."""
    depth = read_queue(redis, queue)
    workers = worker_states(read_heartbeats(redis, queue), stale_after_s, redis_now(redis))
    activity = read_activity(db)
    queued = depth.images_waiting + depth.images_held
    eta = queued / activity.captioned_per_s if activity.captioned_per_s else None
    return FarmStatus(depth, workers, activity, read_crawls(db), eta)


def health_problems(
    workers: list[WorkerState],
    host: str | None,
    stale_after_s: float,
    pid_space: str | None = None,
) -> tuple[list[str], list[str]]:
    """(problems, fine): with `host` (a hostname) or `pid_space` (this container or host's
    processes, `schema.heartbeat.pid_space`), there must be a live, fresh worker there; every
    worker considered (all, or those) must have beaten within `stale_after_s`. Twin containers
    share a hostname, so `capworks health --worker` asks by pid space, not by name."""
    considered = [
        w
        for w in workers
        if (host is None or w.heartbeat.host == host)
        and (pid_space is None or w.heartbeat.pid_space == pid_space)
    ]
    problems, fine = [], []
    live = [w for w in considered if not w.gone]
    for w in live:
        hb = w.heartbeat
        what = f"worker {hb.host}:{hb.pid} ({hb.device})"
        if w.stale:
            problems.append(
                f"{what} last beat {w.age_s:.0f} s ago (stale after {stale_after_s:g} s): "
                "its model thread is hung or the process is stuck"
            )
        else:
            fine.append(f"{what} beat {w.age_s:.0f} s ago, {hb.jobs_in_flight} jobs in flight")
    if pid_space is not None and not live:
        problems.append("no worker heartbeat from this host (its pid namespace)")
    elif host is not None and not live:
        problems.append(f"no worker heartbeat from host {host}")
    return problems, fine
