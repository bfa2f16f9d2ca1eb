"""Farm-wide Prometheus metrics, read on each scrape by `capworks status --serve-metrics PORT`.

Worker processes export what they do (workers/metrics.py); what no single worker knows comes
from here: the queue in Redis, dead letters and the last hour's counts in SQL, and the workers'
heartbeats. One collector process per farm is enough (it reads shared state). When Redis or
the database cannot be read, `capworks_farm_up{part=...}` is 0 and that part's figures are
left out of the scrape rather than failing it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from capworks.farm import read_activity, read_queue, worker_states
from capworks.schema.heartbeat import read_heartbeats, redis_now
from capworks.schema.tables import Failure

log = logging.getLogger(__name__)

# Every family this collector exports (tests/test_docker.py checks the dashboard against them).
FAMILIES = (
    "capworks_farm_up",
    "capworks_queue_jobs",
    "capworks_queue_images",
    "capworks_workers",
    "capworks_captioned_last_hour",
    "capworks_dead_lettered_last_hour",
    "capworks_dead_letters",
)


class FarmCollector(Collector):
    """Reads the farm's shared state when scraped."""

    def __init__(self, client: Any, db: Engine, queue: str, stale_after_s: float) -> None:
        self._redis, self._db, self._queue, self._stale_after_s = client, db, queue, stale_after_s

    def collect(self) -> Iterator[Metric]:
        """The farm's figures now."""
        up = GaugeMetricFamily("capworks_farm_up", "Whether a part could be read", labels=["part"])
        try:
            yield from self._from_redis()
            up.add_metric(["redis"], 1)
        except redis.RedisError as exc:
            log.warning("metrics: Redis unreadable: %s", exc)
            up.add_metric(["redis"], 0)
        try:
            yield from self._from_database()
            up.add_metric(["database"], 1)
        except SQLAlchemyError as exc:
            log.warning("metrics: database unreadable: %s", str(exc).splitlines()[0])
            up.add_metric(["database"], 0)
        yield up

    def _from_redis(self) -> Iterator[Metric]:
        depth = read_queue(self._redis, self._queue)
        workers = worker_states(
            read_heartbeats(self._redis, self._queue), self._stale_after_s, redis_now(self._redis)
        )
        jobs = GaugeMetricFamily("capworks_queue_jobs", "Jobs in the queue", labels=["state"])
        jobs.add_metric(["waiting"], depth.jobs_waiting)
        jobs.add_metric(["held"], depth.jobs_held)
        images = GaugeMetricFamily(
            "capworks_queue_images",
            "Images in the queue (waiting estimated from samples past 2,000 jobs)",
            labels=["state"],
        )
        images.add_metric(["waiting"], depth.images_waiting)
        images.add_metric(["held"], depth.images_held)
        alive = GaugeMetricFamily(
            "capworks_workers", "Worker processes with a heartbeat", labels=["state"]
        )
        live = [w for w in workers if not w.gone]
        alive.add_metric(["ok"], sum(not w.stale for w in live))
        alive.add_metric(["stale"], sum(w.stale for w in live))
        yield from (jobs, images, alive)

    def _from_database(self) -> Iterator[Metric]:
        activity = read_activity(self._db)
        with Session(self._db) as session:
            by_code = session.execute(select(Failure.code, func.count()).group_by(Failure.code))
            counts = [(str(code), int(n)) for code, n in by_code]
        captioned = GaugeMetricFamily(
            "capworks_captioned_last_hour", "Images captioned in the last hour"
        )
        captioned.add_metric([], activity.captioned_last_hour)
        dead_recent = GaugeMetricFamily(
            "capworks_dead_lettered_last_hour", "Images dead-lettered in the last hour"
        )
        dead_recent.add_metric([], activity.dead_lettered_last_hour)
        dead = GaugeMetricFamily("capworks_dead_letters", "Dead letters kept", labels=["code"])
        for code, n in counts:
            dead.add_metric([code], n)
        yield from (captioned, dead_recent, dead)
